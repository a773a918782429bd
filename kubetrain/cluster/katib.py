"""Tune on the cluster: one Katib `kubeflow.org/v1beta1` Experiment per run.

The Experiment is written from the same search space (`tuning.search_space`,
`tuning.for_algorithm`), algorithm names, median-stopping rule and trial limits
as the local Optuna backend, and every trial runs `python -m kubetrain.cli.trial`,
which calls `tuning.run_trial`, the function each local trial calls. Local and
cluster tuning therefore share one search space and one trial function.

This module builds the Experiment and runs the whole step (`tune`); what Katib
accepts is checked in `kubetrain.cluster.katib_checks`, following and deleting it is
`kubetrain.cluster.katib_follow`. Their public names are re-exported here, so callers
need only `kubetrain.cluster.katib`.

Where Katib's suggestion services differ from the local Optuna samplers (read
from their sources): `random` and `tpe` run on hyperopt, whose TPE starts with
one batch of random trials and takes no `n_startup_trials`; goptuna (`cmaes`,
`sobol`) ignores `distribution: logUniform` and samples those ranges uniformly;
skopt (`bayesianoptimization`) ignores an int parameter's `step`. Same space,
same trial function, but not bit-identical suggestions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from kubetrain.cluster import k8s, security

# Used here, and re-exported so callers need only `kubetrain.cluster.katib`:
from kubetrain.cluster.katib_checks import (  # noqa: F401
    ALGORITHM_SETTINGS,
    API_VERSION,
    MAX_NAME,
    grid_size,
    problems_of,
    validate,
)
from kubetrain.cluster.katib_follow import (  # noqa: F401
    PRIMARY_CONTAINER,
    api_error,
    cast_params,
    follow,
    progress_of,
    run,
    trial_row,
    trial_rows,
    trial_table,
)
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import SEED, TrainConfig, TuneConfig, fields_of
from kubetrain.core.errors import KubetrainError
from kubetrain.training import tuning

#: The regex Katib's StdOut/File metrics collector applies when no filter is set
#: (pkg/metricscollector/v1beta1/common: DefaultFilter). Trials print to match it.
DEFAULT_METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"

#: Katib's defaults for Job trials (experiment_defaults.go); written out so the
#: Experiment does not depend on the mutating webhook having run.
JOB_SUCCESS = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
JOB_FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'

#: How long one trial is assumed to take, to turn --tune-time-budget into maxTrialCount
#: (`budgeted_trials`): a fixed start (pod scheduled, container started, Python and
#: torch imported, both splits read from S3) plus a cost per training row per epoch,
#: that of a CPU trial pod (a GPU trial is faster). Erring long means fewer trials
#: and an Experiment that ends before the budget rather than after it.
TRIAL_START_S = 30.0
SECONDS_PER_ROW_EPOCH = 1e-5


# --------------------------------------------------------------------------- build


def experiment_name(run_id: str, prefix: str = "kubetrain-tune") -> str:
    """The run's Experiment name, within Katib's name rules and MAX_NAME."""
    return k8s.run_name(run_id, prefix, MAX_NAME)


def katib_name(field: str) -> str:
    """Katib parameter name of a setting: its CLI flag without the leading dashes."""
    return field.replace("_", "-")


def trial_parameter(field: str) -> str:
    """Trial template placeholder (camelCase, Katib's convention): learning_rate -> learningRate."""
    head, *rest = field.split("_")
    return head + "".join(part.title() for part in rest)


def algorithm_settings(algorithm: str, seed: int, trials: int) -> list[dict[str, str]]:
    """The settings matching `tuning.make_sampler`, limited to what Katib's service accepts.

    hyperopt's tpe fixes its random start-up to one suggestion batch and refuses
    `n_startup_trials`, so only multivariate-tpe (optuna) gets the local value.
    """
    startup = min(10, max(2, trials // 3))
    state = str(seed % 2**31)  # hyperopt/skopt want 0 <= random_state < 2**32
    values = {
        "random_state": state,
        "n_startup_trials": str(startup),
        "n_initial_points": str(startup),
    }
    wanted = {
        "multivariate-tpe": ("random_state", "n_startup_trials"),
        "bayesianoptimization": ("random_state", "n_initial_points"),
    }.get(algorithm, ("random_state",))
    allowed = ALGORITHM_SETTINGS.get(algorithm, frozenset())
    return [{"name": k, "value": values[k]} for k in wanted if k in allowed]


def parameters(space: list[tuning.Param]) -> list[dict[str, Any]]:
    """Katib `spec.parameters`: every feasible-space value a string, as the API types it."""
    out = []
    for p in space:
        if p.type == "categorical":
            feasible: dict[str, Any] = {"list": [str(v) for v in p.values]}
        else:
            num = (lambda v: str(int(v))) if p.type == "int" else (lambda v: repr(float(v)))
            feasible = {"min": num(p.min), "max": num(p.max)}
            if p.step is not None:
                feasible["step"] = num(p.step)
            if p.log:
                feasible["distribution"] = "logUniform"
        out.append({"name": katib_name(p.name), "parameterType": p.type, "feasibleSpace": feasible})
    return out


def _flag(field: str, value: Any) -> list[str]:
    flag = "--" + katib_name(field)
    if isinstance(value, bool):
        return [flag if value else "--no-" + katib_name(field)]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def fixed_settings(
    train: TrainConfig, tune: TuneConfig, seed: int, space: list[tuning.Param]
) -> dict[str, Any]:
    """Flat settings every trial gets unchanged: the shared recipe, the seed, the trial length.

    The recipe (`TrainConfig`) minus anything searched, the seed, and
    `tune_epochs`/`tune_objective`/`cv_folds`. Derived, not listed, so a new recipe setting
    reaches Katib trials without touching this file. No `HyperConfig` value is
    passed: like a local Optuna trial, a trial starts from the defaults and
    applies the searched values (the space covers every tunable).
    """
    searched = {p.name for p in space}
    # an empty text setting (no initial weights) is the trial's default: no '' argument,
    # which Katib's `sh -c` would not pass through
    fixed = {
        k: v for k, v in {**train.to_dict(), SEED: seed}.items() if k not in searched and v != ""
    }
    fixed.update(
        tune_epochs=tune.tune_epochs, tune_objective=tune.tune_objective, cv_folds=tune.cv_folds
    )
    return fixed


def trial_seconds(rows: int, epochs: int) -> float:
    """Estimated wall time of one trial on `rows` training rows for `epochs` epochs."""
    return TRIAL_START_S + rows * epochs * SECONDS_PER_ROW_EPOCH


def budgeted_trials(tune: TuneConfig, trials: int, rows: int) -> int:
    """maxTrialCount under `tune_time_budget`: Katib has no wall-clock limit on an
    Experiment, so the budget becomes a trial count.

    ``min(trials, max(1, floor(budget / trial_seconds(rows, tune_epochs)) * tune_parallel))``:
    as many waves of `tune_parallel` trials as fit in the budget, at least one trial,
    never more than asked. `rows` is the training split's row count (0 when unknown:
    then a trial is its start time alone); trial pods may train on a sample of an
    over-budget split (`tuning.tuning_split`), so the estimate is an upper bound. A
    budget of 0 or less leaves `trials` as it is. The estimate can be wrong either
    way: the follower's --wait-timeout stays the hard stop.
    """
    if tune.tune_time_budget <= 0:
        return trials
    waves = math.floor(tune.tune_time_budget / trial_seconds(rows, tune.tune_epochs))
    return min(trials, max(1, waves * tune.tune_parallel))


def _pod_placement(cluster: ClusterConfig) -> dict[str, Any]:
    """Resources and scheduling of a trial pod, the same as the pipeline's GPU steps."""
    spec: dict[str, Any] = {}
    if cluster.gpus > 0:
        amounts = {
            "cpu": cluster.gpu_cpu,
            "memory": cluster.gpu_memory,
            cluster.gpu_resource: str(cluster.gpus),
        }
        spec["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
        spec.update(cluster.gpu_scheduling())
    else:
        spec["resources"] = {
            "requests": {"cpu": cluster.cpu_cpu, "memory": cluster.cpu_memory},
            "limits": {"cpu": cluster.cpu_limit(), "memory": cluster.cpu_memory},
        }
        if cluster.cpu_node_selector:
            key, value = cluster.cpu_node_selector.split("=", 1)
            spec["nodeSelector"] = {key: value}
    return spec


def trial_checkpoint_root(cluster: ClusterConfig) -> str:
    """Where trials keep their checkpoints: beside the final training's, by trial key."""
    return f"{cluster.checkpoint_root}/trials" if cluster.checkpoint_root else ""


def experiment(
    train: TrainConfig,
    tune: TuneConfig,
    seed: int,
    cluster: ClusterConfig,
    train_uri: str,
    val_uri: str,
    name: str,
    resume_policy: str = "Never",
    train_rows: int = 0,
    regression: bool = False,
    width: bool = True,
) -> dict[str, Any]:
    """The Experiment manifest (a plain dict): `tune`'s search over trials of the `train` recipe.

    Trials read both splits straight from the upstream artifacts' URIs (s3:// on
    the cluster), so no PVC is shared between the pipeline step and the trials.
    maxTrialCount is `tune_trials`, capped by the grid's size and by the time budget
    (`budgeted_trials`, from `train_rows`). ``width`` False leaves the width out of the
    search (`tuning.search_space`: a ResNet has none to set).
    """
    if tune.tune_trials < 1:
        raise KubetrainError(
            "tune_trials is 0: tuning is skipped, so there is no Katib "
            "Experiment to build; set --tune-trials 1 or more"
        )
    if cluster.gpus == 0 and train.device == "cuda":
        raise KubetrainError(
            "device=cuda but the cluster config requests no GPU (gpus=0); "
            "use --device auto or cpu, or set --gpus 1"
        )
    space = tuning.for_algorithm(tuning.search_space(width), tune.tune_algorithm)
    params = parameters(space)
    max_trials = tune.tune_trials
    if tune.tune_algorithm == "grid":  # optuna's grid refuses more trials than points
        max_trials = min(max_trials, grid_size(params))
    max_trials = budgeted_trials(tune, max_trials, train_rows)
    tune = tuning.objective_for(tune, regression)
    others = [m for m in tuning.TASK_METRICS[regression] if m != tune.tune_objective]
    command = [
        "python",
        "-m",
        "kubetrain.cli.trial",
        "--train",
        str(train_uri),
        "--validation",
        str(val_uri),
    ]
    if trial_checkpoint_root(cluster):  # a re-created (preempted) trial pod resumes from it
        command += ["--checkpoint-root", trial_checkpoint_root(cluster)]
    for p in space:
        command += ["--" + katib_name(p.name), f"${{trialParameters.{trial_parameter(p.name)}}}"]
    for field, value in fixed_settings(train, tune, seed, space).items():
        command += _flag(field, value)
    placement = _pod_placement(cluster)
    container = {
        "name": PRIMARY_CONTAINER,
        "image": cluster.image("cuda" if cluster.gpus > 0 else "cpu"),
        "command": command,
        "env": cluster.s3_env(),
        "resources": placement.pop("resources"),
    }
    # Restricted profile (`security`): uid 10001, read-only root with /tmp and cache
    # emptyDirs, and the workload service account without an API token: trial pods
    # run training code and never call the Kubernetes API (S3 keys come as env above).
    pod = security.harden_pod_spec(
        {"restartPolicy": "Never", **placement, "containers": [container]},
        cluster.workload_service_account,
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "backoffLimit": 0,  # a failed trial is Katib's to count, not the Job's to retry
            # ...but a pod evicted or preempted (node drain, spot reclaim) is not a failed
            # trial: the Job makes a new pod, which resumes from the trial's checkpoint.
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {
                # Istio's sidecar never exits, so a trial Job with one never completes.
                "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                "spec": pod,
            },
        },
    }
    help_of = {f.name: f.metadata["help"] for f in fields_of()}
    spec: dict[str, Any] = {
        "objective": {
            "type": tuning.GOALS[tune.tune_objective],
            "objectiveMetricName": tune.tune_objective,
            "additionalMetricNames": others,
            # The trial prints the restored best epoch's metrics last: "latest" is
            # the value the local backend scores a trial by.
            "metricStrategies": [
                {"name": m, "value": "latest"} for m in (tune.tune_objective, *others)
            ],
        },
        "algorithm": {
            "algorithmName": tune.tune_algorithm,
            "algorithmSettings": algorithm_settings(tune.tune_algorithm, seed, tune.tune_trials),
        },
        "parallelTrialCount": min(tune.tune_parallel, max_trials),
        "maxTrialCount": max_trials,
        # Katib fails the Experiment once failed >= maxFailedTrialCount; the local
        # backend once failed > tune_max_failed. +1 makes both stop at the same trial.
        "maxFailedTrialCount": min(tune.tune_max_failed + 1, max_trials),
        "resumePolicy": resume_policy,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
        "parameters": params,
        "trialTemplate": {
            "primaryContainerName": PRIMARY_CONTAINER,
            "successCondition": JOB_SUCCESS,
            "failureCondition": JOB_FAILURE,
            "trialParameters": [
                {
                    "name": trial_parameter(p.name),
                    "reference": katib_name(p.name),
                    "description": help_of.get(p.name, p.name),
                }
                for p in space
            ],
            "trialSpec": job,
        },
    }
    if tune.tune_early_stopping == "medianstop":
        spec["earlyStopping"] = {
            "algorithmName": "medianstop",
            "algorithmSettings": [
                {"name": k, "value": str(v)} for k, v in tuning.MEDIANSTOP.items()
            ],
        }
    return {
        "apiVersion": API_VERSION,
        "kind": "Experiment",
        "metadata": {
            "name": name,
            "namespace": cluster.namespace,
            "labels": k8s.labels("tune"),
        },
        "spec": spec,
    }


# --------------------------------------------------------------------------- YAML

#: Plain scalars a YAML 1.1 or 1.2 loader (PyYAML, go-yaml behind kubectl) reads
#: as something other than a string. PyYAML's own resolver misses e.g. "1e-05".
_NON_STRING = re.compile(
    r"[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?"
    r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)|0[xX][0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+"
    r"|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?"
    r"|~|null|Null|NULL|true|True|TRUE|false|False|FALSE|yes|Yes|YES|no|No|NO"
    r"|on|On|ON|off|Off|OFF|y|Y|n|N|=|<<"
)


def to_yaml(exp: Mapping[str, Any]) -> str:
    """YAML for kubectl/the UI; every string that could read back as a number is quoted."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str):
        style = "'" if _NON_STRING.fullmatch(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(
        dict(exp), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000
    )


# ----------------------------------------------------------------------- the step


def tune(
    train: TrainConfig,
    tune: TuneConfig,
    seed: int,
    cluster: ClusterConfig,
    train_uri: str,
    val_uri: str,
    name: str,
    resume_policy: str = "Never",
    api=None,
    train_rows: int = 0,
    regression: bool = False,
    width: bool = True,
    **follow_options: Any,
) -> tuple[dict[str, Any], list[dict], dict[str, Any]]:
    """Build, validate, run: (best hyperparameters, trial rows, meta for the artifacts).

    How long to wait and whether to keep the finished Experiment come from
    `cluster` (wait_timeout, finished_jobs) unless `follow_options` say
    otherwise (timeout_s, keep, poll_s, sleep, now, log: see `run`). `train_rows`
    sizes the time budget's maxTrialCount (`budgeted_trials`).
    """
    exp = experiment(
        train,
        tune,
        seed,
        cluster,
        train_uri,
        val_uri,
        name,
        resume_policy,
        train_rows,
        regression,
        width,
    )
    options = {
        "timeout_s": cluster.wait_timeout,
        "keep": cluster.finished_jobs == "keep",
        **follow_options,
    }
    result, rows = run(
        exp, cluster.namespace, api=api, service_account=cluster.service_account, **options
    )
    meta = {
        "backend": "katib",
        "experiment": name,
        "namespace": cluster.namespace,
        "kept": options["keep"],
        "best_trial": result["trial"],
        "best_value": result["value"],
        "trials_summary": result["trials"],
        "trials_run": len(rows),
        "time_budget_s": max(tune.tune_time_budget, 0.0),
        "max_trial_count": exp["spec"]["maxTrialCount"],
        "estimated_trial_s": round(trial_seconds(train_rows, tune.tune_epochs), 1),
    }
    return result["hyperparameters"], rows, meta
