"""Tune on the cluster: one Katib `kubeflow.org/v1beta1` Experiment per run.

The Experiment is written from the same search space (`tuning.search_space`,
`tuning.for_algorithm`), algorithm names, median-stopping rule and trial limits
as the local Optuna backend, and every trial runs `python -m kubetrain.trial`,
which calls `tuning.run_trial`, the function each local trial calls. Local and
cluster tuning therefore share one search space and one trial function.

Katib's CRD carries no OpenAPI schema: its admission webhook validates an
Experiment, and the suggestion service validates the algorithm settings only
after the Experiment exists. `validate` repeats those checks here (read from
Katib's `pkg/webhook/v1beta1/experiment/validator/validator.go` and the
suggestion services' `ValidateAlgorithmSettings`), so a bad Experiment fails
at compile/submit time on a laptop, not minutes into a cluster run.

Following is split into pure functions over the documents the API returns
(`progress_of`, `follow`, `trial_row`), tested on status documents of each
phase, and a thin `run` that talks to the Kubernetes API.

Where Katib's suggestion services differ from the local Optuna samplers (read
from their sources): `random` and `tpe` run on hyperopt, whose TPE starts with
one batch of random trials and takes no `n_startup_trials`; goptuna (`cmaes`,
`sobol`) ignores `distribution: logUniform` and samples those ranges uniformly;
skopt (`bayesianoptimization`) ignores an int parameter's `step`. Same space,
same trial function, but not bit-identical suggestions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import threading
import time
from typing import Any, Callable, Mapping

from kubetrain import progress, tuning
from kubetrain.cluster_config import ClusterConfig
from kubetrain.config import TUNE_ALGORITHMS, RunConfig
from kubetrain.errors import KubetrainError

GROUP, VERSION = "kubeflow.org", "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"
EXPERIMENTS, TRIALS = "experiments", "trials"
EXPERIMENT_LABEL = "katib.kubeflow.org/experiment"  # Katib labels each Trial with it
PRIMARY_CONTAINER = "training"
ROLE_FILE = "manifests/base/role.yaml"

#: The regex Katib's StdOut/File metrics collector applies when no filter is set
#: (pkg/metricscollector/v1beta1/common: DefaultFilter). Trials print to match it.
DEFAULT_METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"

#: Katib's defaults for Job trials (experiment_defaults.go); written out so the
#: Experiment does not depend on the mutating webhook having run.
JOB_SUCCESS = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
JOB_FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'

#: Settings each algorithm's suggestion service accepts, per Katib's default
#: katib-config: random and tpe are served by hyperopt (which rejects any other
#: name, n_startup_trials included), multivariate-tpe and grid by optuna, cmaes
#: and sobol by goptuna (sobol reads none), bayesianoptimization by skopt.
ALGORITHM_SETTINGS: dict[str, frozenset[str]] = {
    "random": frozenset({"random_state"}),
    "tpe": frozenset({"random_state", "gamma", "prior_weight", "n_EI_candidates"}),
    "multivariate-tpe": frozenset({"random_state", "n_startup_trials", "n_ei_candidates"}),
    "grid": frozenset({"random_state"}),
    "cmaes": frozenset({"random_state", "sigma", "restart_strategy"}),
    "sobol": frozenset(),
    "bayesianoptimization": frozenset({"random_state", "n_initial_points", "base_estimator",
                                       "acq_func", "acq_optimizer"}),
}
_INT_SETTINGS = {"random_state", "n_startup_trials", "n_ei_candidates", "n_EI_candidates",
                 "n_initial_points", "min_trials_required", "start_step"}
EARLY_STOPPING = {"medianstop": frozenset(tuning.MEDIANSTOP)}
GOAL_TYPES = ("minimize", "maximize")
METRIC_STRATEGIES = ("min", "max", "latest")
RESUME_POLICIES = ("Never", "LongRunning", "FromVolume")
PARAMETER_TYPES = ("int", "double", "categorical", "discrete")
DISTRIBUTIONS = ("uniform", "logUniform", "normal", "logNormal")
COLLECTOR_KINDS = ("StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None",
                   "Push")
PHASES = ("Created", "Running", "Restarting", "Succeeded", "Failed")
#: Suggestion Service "<experiment>-<algorithm>" must be a 63-character DNS label and
#: trial Job names are "<experiment>-<8 chars>": 40 leaves room for both.
MAX_NAME = 40
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_PLACEHOLDER = re.compile(r"\$\{trialParameters\.([^}]*)\}")
#: Katib's StdOut collector joins command and args with spaces into `sh -c`, so
#: every argument must survive the shell unquoted.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


# --------------------------------------------------------------------------- build

def experiment_name(run_id: str, prefix: str = "kubetrain-tune") -> str:
    """A per-run Experiment name Katib accepts: `prefix-` + 10 hex digits of sha256(run_id).

    Hashing keeps any run id (KFP's UUIDs, local names with '_') inside the
    name rules and MAX_NAME, and a re-run of the same run id finds its Experiment.
    """
    import hashlib

    prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:MAX_NAME - 11] or "kt"
    if not prefix[0].isalpha():
        prefix = "kt-" + prefix[:MAX_NAME - 14]
    return f"{prefix}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def katib_name(field: str) -> str:
    """Katib parameter name of a RunConfig field: its CLI flag without dashes in front."""
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
    values = {"random_state": state, "n_startup_trials": str(startup),
              "n_initial_points": str(startup)}
    wanted = {"multivariate-tpe": ("random_state", "n_startup_trials"),
              "bayesianoptimization": ("random_state", "n_initial_points")}.get(
        algorithm, ("random_state",))
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
        out.append({"name": katib_name(p.name), "parameterType": p.type,
                    "feasibleSpace": feasible})
    return out


def grid_size(params: list[dict[str, Any]]) -> int:
    """How many points Katib's grid (optuna's GridSampler) can visit."""
    total = 1
    for p in params:
        fs = p.get("feasibleSpace") or {}
        if fs.get("list"):
            total *= len(fs["list"])
        else:
            lo, hi, step = float(fs["min"]), float(fs["max"]), float(fs["step"])
            total *= int(math.floor((hi - lo) / step + 1e-9)) + 1
    return total


def _flag(field: str, value: Any) -> list[str]:
    flag = "--" + katib_name(field)
    if isinstance(value, bool):
        return [flag if value else "--no-" + katib_name(field)]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def fixed_settings(cfg: RunConfig, space: list[tuning.Param]) -> dict[str, Any]:
    """Training settings every trial gets unchanged: the train stage's minus the searched ones.

    `epochs` is left out because trials train `tune_epochs`; derived, not listed,
    so a new training setting reaches Katib trials without touching this file.
    """
    searched = {p.name for p in space}
    fixed = {k: v for k, v in cfg.stage("train").items() if k not in searched and k != "epochs"}
    fixed.update(tune_epochs=cfg.tune_epochs, tune_objective=cfg.tune_objective)
    return fixed


def _pod_placement(cluster: ClusterConfig) -> dict[str, Any]:
    """Resources and scheduling of a trial pod, the same as the pipeline's GPU steps."""
    spec: dict[str, Any] = {}
    if cluster.gpus > 0:
        amounts = {"cpu": cluster.gpu_cpu, "memory": cluster.gpu_memory,
                   cluster.gpu_resource: str(cluster.gpus)}
        spec["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
        spec.update(cluster.gpu_scheduling())
    else:
        spec["resources"] = {"requests": {"cpu": cluster.cpu_cpu, "memory": cluster.cpu_memory},
                             "limits": {"cpu": cluster.cpu_limit(),
                                        "memory": cluster.cpu_memory}}
        if cluster.cpu_node_selector:
            key, value = cluster.cpu_node_selector.split("=", 1)
            spec["nodeSelector"] = {key: value}
    return spec


def _env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": cluster.s3_secret, "key": key}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env.append({"name": "AWS_DEFAULT_REGION", "value": cluster.s3_region})
    if cluster.s3_endpoint_url:
        env.append({"name": "S3_ENDPOINT_URL", "value": cluster.s3_endpoint_url})
    return env


def experiment(cfg: RunConfig, cluster: ClusterConfig, train_uri: str, val_uri: str,
               name: str, resume_policy: str = "Never") -> dict[str, Any]:
    """The Experiment manifest (a plain dict) for `cfg`'s tuning settings.

    Trials read both splits straight from the upstream artifacts' URIs (s3:// on
    the cluster), so no PVC is shared between the pipeline step and the trials.
    """
    if cfg.tune_trials < 1:
        raise KubetrainError("tune_trials is 0: tuning is skipped, so there is no Katib "
                             "Experiment to build; set --tune-trials 1 or more")
    if cluster.gpus == 0 and cfg.device == "cuda":
        raise KubetrainError("device=cuda but the cluster config requests no GPU (gpus=0); "
                             "use --device auto or cpu, or set --gpus 1")
    space = tuning.for_algorithm(tuning.search_space(), cfg.tune_algorithm)
    params = parameters(space)
    max_trials = cfg.tune_trials
    if cfg.tune_algorithm == "grid":  # optuna's grid refuses more trials than points
        max_trials = min(max_trials, grid_size(params))
    other = next(m for m in tuning.GOALS if m != cfg.tune_objective)
    command = ["python", "-m", "kubetrain.trial", "--train", str(train_uri),
               "--validation", str(val_uri)]
    for p in space:
        command += ["--" + katib_name(p.name), f"${{trialParameters.{trial_parameter(p.name)}}}"]
    for field, value in fixed_settings(cfg, space).items():
        command += _flag(field, value)
    placement = _pod_placement(cluster)
    container = {"name": PRIMARY_CONTAINER,
                 "image": cluster.image("cuda" if cluster.gpus > 0 else "cpu"),
                 "command": command, "env": _env(cluster), "resources": placement.pop("resources")}
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "spec": {
            "backoffLimit": 0,  # a failed trial is Katib's to count, not the Job's to retry
            "template": {
                # Istio's sidecar never exits, so a trial Job with one never completes.
                "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                "spec": {"restartPolicy": "Never",
                         "serviceAccountName": cluster.service_account,
                         **placement, "containers": [container]}}}}
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(RunConfig)}
    spec: dict[str, Any] = {
        "objective": {
            "type": tuning.GOALS[cfg.tune_objective],
            "objectiveMetricName": cfg.tune_objective,
            "additionalMetricNames": [other],
            # The trial prints the restored best epoch's metrics last: "latest" is
            # the value the local backend scores a trial by.
            "metricStrategies": [{"name": cfg.tune_objective, "value": "latest"},
                                 {"name": other, "value": "latest"}],
        },
        "algorithm": {"algorithmName": cfg.tune_algorithm,
                      "algorithmSettings": algorithm_settings(cfg.tune_algorithm, cfg.seed,
                                                              cfg.tune_trials)},
        "parallelTrialCount": min(cfg.tune_parallel, max_trials),
        "maxTrialCount": max_trials,
        # Katib fails the Experiment once failed >= maxFailedTrialCount; the local
        # backend once failed > tune_max_failed. +1 makes both stop at the same trial.
        "maxFailedTrialCount": min(cfg.tune_max_failed + 1, max_trials),
        "resumePolicy": resume_policy,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
        "parameters": params,
        "trialTemplate": {
            "primaryContainerName": PRIMARY_CONTAINER,
            "successCondition": JOB_SUCCESS,
            "failureCondition": JOB_FAILURE,
            "trialParameters": [{"name": trial_parameter(p.name), "reference": katib_name(p.name),
                                 "description": help_of.get(p.name, p.name)} for p in space],
            "trialSpec": job,
        },
    }
    if cfg.tune_early_stopping == "medianstop":
        spec["earlyStopping"] = {"algorithmName": "medianstop", "algorithmSettings": [
            {"name": k, "value": str(v)} for k, v in tuning.MEDIANSTOP.items()]}
    return {"apiVersion": API_VERSION, "kind": "Experiment",
            "metadata": {"name": name, "namespace": cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "kubetrain",
                                    "app.kubernetes.io/component": "tune"}},
            "spec": spec}


# ------------------------------------------------------------------------ validate

def _is_int(text: Any) -> bool:
    return isinstance(text, str) and re.fullmatch(r"[+-]?\d+", text.strip()) is not None


def _is_number(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_settings(where: str, settings: Any, allowed: frozenset[str], algorithm: str,
                    problems: list[str]) -> None:
    for s in settings or []:
        name, value = s.get("name"), s.get("value")
        if name not in allowed:
            problems.append(f"{where}: setting {name!r} is not accepted by Katib's {algorithm} "
                            f"service (accepted: {', '.join(sorted(allowed)) or 'none'})")
        elif not isinstance(value, str):
            problems.append(f"{where}: setting {name} must be a string, got {value!r}")
        elif name in _INT_SETTINGS and not (_is_int(value) and int(value) >= 0):
            problems.append(f"{where}: setting {name}={value!r} must be a whole number >= 0")


def _check_counts(spec: Mapping[str, Any], problems: list[str]) -> None:
    counts = {k: spec.get(k) for k in ("maxTrialCount", "parallelTrialCount",
                                       "maxFailedTrialCount")}
    for key, value in counts.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            problems.append(f"spec.{key} must be an integer, got {value!r}")
            return
    most, parallel, failed = counts.values()
    if most is not None and most <= 0:
        problems.append(f"spec.maxTrialCount must be greater than 0, got {most}")
    if parallel is not None and parallel <= 0:
        problems.append(f"spec.parallelTrialCount must be greater than 0, got {parallel}")
    if failed is not None and failed < 0:
        problems.append(f"spec.maxFailedTrialCount must not be negative, got {failed}")
    if most is not None and parallel is not None and parallel > most:
        problems.append(f"spec.parallelTrialCount ({parallel}) must not exceed "
                        f"spec.maxTrialCount ({most})")
    if most is not None and failed is not None and failed > most:
        problems.append(f"spec.maxFailedTrialCount ({failed}) must not exceed "
                        f"spec.maxTrialCount ({most})")


def _check_objective(obj: Any, problems: list[str]) -> None:
    if not isinstance(obj, Mapping):
        problems.append("spec.objective must be specified")
        return
    if obj.get("type") not in GOAL_TYPES:
        problems.append(f"spec.objective.type {obj.get('type')!r} is unknown; use "
                        f"{' or '.join(GOAL_TYPES)}")
    name = obj.get("objectiveMetricName")
    if not name:
        problems.append("spec.objective.objectiveMetricName must be specified")
    if name in (obj.get("additionalMetricNames") or []):
        problems.append("spec.objective.additionalMetricNames must not contain the "
                        f"objective metric {name!r}")
    known = {name, *(obj.get("additionalMetricNames") or [])}
    for s in obj.get("metricStrategies") or []:
        if s.get("value") not in METRIC_STRATEGIES:
            problems.append(f"spec.objective.metricStrategies: {s.get('value')!r} for "
                            f"{s.get('name')} is unknown; use {', '.join(METRIC_STRATEGIES)}")
        if s.get("name") not in known:
            problems.append(f"spec.objective.metricStrategies names {s.get('name')!r}, "
                            "which is neither the objective nor an additional metric")


def _check_parameter(i: int, p: Mapping[str, Any], problems: list[str]) -> None:
    where = f"spec.parameters[{i}] ({p.get('name')})"
    kind, fs = p.get("parameterType"), p.get("feasibleSpace")
    if kind not in PARAMETER_TYPES:
        problems.append(f"{where}: parameterType {kind!r} is not supported; use "
                        f"{', '.join(PARAMETER_TYPES)}")
    if not isinstance(fs, Mapping) or not fs:
        problems.append(f"{where}: feasibleSpace must be specified")
        return
    for key in ("min", "max", "step", "distribution"):
        if key in fs and not isinstance(fs[key], str):
            problems.append(f"{where}: feasibleSpace.{key} must be a string (Katib types it "
                            f"string; quote it in YAML), got {type(fs[key]).__name__} "
                            f"{fs[key]!r}")
    values = fs.get("list")
    if values is not None and (not isinstance(values, list)
                               or not all(isinstance(v, str) for v in values)):
        problems.append(f"{where}: feasibleSpace.list must be a list of strings (quote numbers "
                        f"in YAML), got {values!r}")
    if "distribution" in fs and fs["distribution"] not in DISTRIBUTIONS:
        problems.append(f"{where}: distribution {fs['distribution']!r} is not supported; use "
                        f"{', '.join(DISTRIBUTIONS)}")
    if kind in ("int", "double"):
        if values:
            problems.append(f"{where}: feasibleSpace.list is not supported for "
                            f"parameterType {kind}; use min/max")
        if "min" not in fs or "max" not in fs:
            problems.append(f"{where}: feasibleSpace.min and max must be specified for "
                            f"parameterType {kind}")
            return
        parse = _is_int if kind == "int" else _is_number
        bad = [k for k in ("min", "max", "step") if k in fs and not parse(fs[k])]
        if any(not isinstance(fs[k], str) for k in bad):
            return  # reported above as "must be a string"
        if bad:
            problems.append(f"{where}: feasibleSpace.{bad[0]}={fs[bad[0]]!r} is not "
                            f"{'an integer' if kind == 'int' else 'a number'}")
            return
        lo, hi = float(fs["min"]), float(fs["max"])
        if lo >= hi:
            problems.append(f"{where}: feasibleSpace.min ({fs['min']}) must be below max "
                            f"({fs['max']})")
        if "step" in fs and float(fs["step"]) <= 0:
            problems.append(f"{where}: feasibleSpace.step must be positive")
        if fs.get("distribution") in ("logUniform", "logNormal") and lo <= 0:
            problems.append(f"{where}: a {fs['distribution']} range needs min > 0")
    elif kind in ("categorical", "discrete"):
        if any(k in fs for k in ("min", "max", "step")):
            problems.append(f"{where}: feasibleSpace min/max/step are not supported for "
                            f"parameterType {kind}; use list")
        if not values:
            problems.append(f"{where}: feasibleSpace.list must hold at least one value")


def _check_algorithm(spec: Mapping[str, Any], problems: list[str]) -> None:
    algorithm = spec.get("algorithm")
    if not isinstance(algorithm, Mapping) or not algorithm.get("algorithmName"):
        problems.append("spec.algorithm.algorithmName must be specified")
        return
    name = algorithm["algorithmName"]
    if name not in TUNE_ALGORITHMS:
        problems.append(f"spec.algorithm.algorithmName {name!r} is unknown; use one of "
                        f"{', '.join(TUNE_ALGORITHMS)}")
        return
    _check_settings("spec.algorithm", algorithm.get("algorithmSettings"),
                    ALGORITHM_SETTINGS[name], name, problems)
    params = [p for p in spec.get("parameters") or [] if isinstance(p, Mapping)]
    if name == "cmaes" and sum(p.get("parameterType") in ("int", "double") for p in params) < 2:
        problems.append("cmaes needs at least two int/double parameters (Katib's goptuna "
                        "service refuses a smaller continuous space)")
    if name == "grid":
        unbounded = [p.get("name") for p in params if p.get("parameterType") == "double"
                     and "step" not in (p.get("feasibleSpace") or {})]
        if unbounded:
            problems.append(f"grid needs a step or a list for every double parameter; "
                            f"{', '.join(map(str, unbounded))} has neither")
        elif params and isinstance(spec.get("maxTrialCount"), int):
            try:
                size = grid_size(params)
            except (KeyError, TypeError, ValueError):
                return  # the parameter checks report the malformed feasible space
            if spec["maxTrialCount"] > size:
                problems.append(f"grid has {size} points but spec.maxTrialCount is "
                                f"{spec['maxTrialCount']}; Katib's grid service refuses that")


def _check_template(spec: Mapping[str, Any], problems: list[str]) -> None:
    tt = spec.get("trialTemplate")
    if not isinstance(tt, Mapping):
        problems.append("spec.trialTemplate must be specified")
        return
    if not tt.get("primaryContainerName"):
        problems.append("spec.trialTemplate.primaryContainerName must be specified")
    if not tt.get("successCondition") or not tt.get("failureCondition"):
        problems.append("spec.trialTemplate successCondition and failureCondition must be "
                        "specified")
    trial_spec = tt.get("trialSpec")
    if not isinstance(trial_spec, Mapping):
        problems.append("spec.trialTemplate.trialSpec must be specified")
        return
    text = json.dumps(trial_spec)
    names = [p.get("name") for p in spec.get("parameters") or []]
    seen_names: set[str] = set()
    seen_refs: set[str] = set()
    for i, tp in enumerate(tt.get("trialParameters") or []):
        name, ref = tp.get("name"), tp.get("reference")
        if not name or not ref or "{" in name or "}" in name:
            problems.append(f"spec.trialTemplate.trialParameters[{i}]: name and reference "
                            "must be specified and the name must not contain '{' or '}'")
            continue
        if name in seen_names or ref in seen_refs:
            problems.append(f"spec.trialTemplate.trialParameters[{i}]: {name}/{ref} is "
                            "defined twice")
            continue
        seen_names.add(name)
        seen_refs.add(ref)
        if ref not in names and not ref.startswith("${trialSpec."):
            problems.append(f"trial parameter {name} references {ref!r}, which is not in "
                            f"spec.parameters ({', '.join(map(str, names))})")
        if f"${{trialParameters.{name}}}" not in text:
            problems.append(f"trial parameter {name} is never used in the trial template")
    undefined = sorted(set(_PLACEHOLDER.findall(text)) - seen_names)
    if undefined:
        problems.append("the trial template uses undefined trial parameter(s) "
                        + ", ".join(f"${{trialParameters.{u}}}" for u in undefined)
                        + "; define them in spec.trialTemplate.trialParameters")
    if not trial_spec.get("apiVersion") or not trial_spec.get("kind"):
        problems.append("spec.trialTemplate.trialSpec needs apiVersion and kind")
    meta = trial_spec.get("metadata") or {}
    if meta.get("name") or meta.get("namespace"):
        problems.append("spec.trialTemplate.trialSpec must not set metadata.name or namespace")
    if (trial_spec.get("apiVersion"), trial_spec.get("kind")) == ("batch/v1", "Job"):
        pod = ((trial_spec.get("spec") or {}).get("template") or {}).get("spec") or {}
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append("the trial Job's pod restartPolicy must be Never or OnFailure")
        containers = {c.get("name"): c for c in pod.get("containers") or []}
        primary = containers.get(tt.get("primaryContainerName"))
        if primary is None:
            problems.append(f"the trial Job has no container named "
                            f"{tt.get('primaryContainerName')!r} (primaryContainerName)")
        else:
            for arg in list(primary.get("command") or []) + list(primary.get("args") or []):
                if not _SHELL_SAFE.fullmatch(_PLACEHOLDER.sub("x", str(arg))):
                    problems.append(f"trial argument {arg!r} is not shell-safe: Katib's "
                                    "StdOut collector runs the command through `sh -c`")
                    break


def _check_model(exp: Mapping[str, Any], problems: list[str]) -> None:
    """Validate against Katib's generated pydantic models and demand a lossless round trip."""
    from pydantic import ValidationError

    from kubeflow_katib_api.models import V1beta1Experiment

    try:
        model = V1beta1Experiment.model_validate(exp)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        problems.append(f"Katib API model rejects {where}: {err['msg']} "
                        f"(got {err.get('input')!r})")
        return
    back = model.to_dict()
    if back != json.loads(json.dumps(exp)):
        problems.append(f"field {_first_difference(exp, back)} is not part of Katib's "
                        "Experiment API (lost in a round trip through kubeflow-katib-api)")


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key}".lstrip(".")
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path.lstrip(".") or "<root>"


def problems_of(exp: Mapping[str, Any]) -> list[str]:
    """Everything Katib's webhook (and its suggestion services) would refuse in `exp`."""
    problems: list[str] = []
    if exp.get("apiVersion") != API_VERSION or exp.get("kind") != "Experiment":
        problems.append(f"not a Katib Experiment: apiVersion {exp.get('apiVersion')!r}, "
                        f"kind {exp.get('kind')!r} (want {API_VERSION}, Experiment)")
    name = str((exp.get("metadata") or {}).get("name") or "")
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        problems.append(f"Experiment name {name!r} must be lower-case letters, digits and "
                        f"'-', start with a letter, end with a letter or digit, and be at "
                        f"most {MAX_NAME} characters")
    spec = exp.get("spec")
    if not isinstance(spec, Mapping):
        return problems + ["spec must be specified"]
    _check_counts(spec, problems)
    _check_objective(spec.get("objective"), problems)
    _check_algorithm(spec, problems)
    early = spec.get("earlyStopping")
    if early is not None:
        name = early.get("algorithmName")
        if name not in EARLY_STOPPING:
            problems.append(f"spec.earlyStopping.algorithmName {name!r} is unknown; use "
                            f"{', '.join(EARLY_STOPPING)} or leave earlyStopping out")
        else:
            _check_settings("spec.earlyStopping", early.get("algorithmSettings"),
                            EARLY_STOPPING[name], name, problems)
    if spec.get("resumePolicy", "Never") not in RESUME_POLICIES + ("",):
        problems.append(f"spec.resumePolicy {spec.get('resumePolicy')!r} is unknown; use "
                        f"{', '.join(RESUME_POLICIES)}")
    params = spec.get("parameters") or []
    if not params:
        problems.append("spec.parameters must list at least one parameter")
    names = [p.get("name") for p in params]
    if len(set(names)) != len(names):
        problems.append(f"spec.parameters names must be unique, got {names}")
    for i, p in enumerate(params):
        _check_parameter(i, p, problems)
    _check_template(spec, problems)
    kind = ((spec.get("metricsCollectorSpec") or {}).get("collector") or {}).get("kind", "StdOut")
    if kind not in COLLECTOR_KINDS:
        problems.append(f"spec.metricsCollectorSpec.collector.kind {kind!r} is unknown; use "
                        f"{', '.join(COLLECTOR_KINDS)}")
    _check_model(exp, problems)
    return problems


def validate(exp: Mapping[str, Any]) -> None:
    """Raise one KubetrainError line listing what Katib would reject, else return."""
    problems = problems_of(exp)
    if problems:
        name = (exp.get("metadata") or {}).get("name", "?")
        raise KubetrainError(f"invalid Katib Experiment {name}: " + "; ".join(problems))


# --------------------------------------------------------------------------- YAML

#: Plain scalars a YAML 1.1 or 1.2 loader (PyYAML, go-yaml behind kubectl) reads
#: as something other than a string. PyYAML's own resolver misses e.g. "1e-05".
_NON_STRING = re.compile(
    r"[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?"
    r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)|0[xX][0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+"
    r"|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?"
    r"|~|null|Null|NULL|true|True|TRUE|false|False|FALSE|yes|Yes|YES|no|No|NO"
    r"|on|On|ON|off|Off|OFF|y|Y|n|N|=|<<")


def to_yaml(exp: Mapping[str, Any]) -> str:
    """YAML for kubectl/the UI; every string that could read back as a number is quoted."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str):
        style = "'" if _NON_STRING.fullmatch(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(dict(exp), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=1000)


# ------------------------------------------------------------------------- follow

def _true_conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    conditions = ((obj.get("status") or {}).get("conditions")) or []
    return [c for c in conditions if str(c.get("status")) == "True"]


def _metric_value(metrics: list[Mapping[str, Any]], name: str, strategy: str = "latest"
                  ) -> float | None:
    for m in metrics or []:
        if m.get("name") == name:
            raw = m.get(strategy) or m.get("latest")
            try:
                value = float(raw)
            except (TypeError, ValueError):
                return None  # "unavailable": the trial printed no such metric
            return value if math.isfinite(value) else None
    return None


def _strategy(spec: Mapping[str, Any], metric: str) -> str:
    for s in ((spec.get("objective") or {}).get("metricStrategies")) or []:
        if s.get("name") == metric:
            return s.get("value") or "latest"
    return "latest"


def cast_params(assignments: list[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Katib's string assignments back to RunConfig names and Python types (tuning.Param.cast)."""
    space = {p.name: p for p in tuning.search_space()}
    out: dict[str, Any] = {}
    for a in assignments or []:
        field = str(a.get("name")).replace("-", "_")
        param = space.get(field) or tuning.Param(field, "categorical")
        out[field] = param.cast(a.get("value"))
    return out


def progress_of(exp_obj: Mapping[str, Any]) -> dict[str, Any]:
    """Phase, trial counts and best trial so far of an Experiment document."""
    meta, spec = exp_obj.get("metadata") or {}, exp_obj.get("spec") or {}
    status = exp_obj.get("status") or {}
    true = [c for c in _true_conditions(exp_obj) if c.get("type") in PHASES]
    terminal = [c for c in true if c.get("type") in ("Succeeded", "Failed")]
    current = (terminal or true or [{}])[-1]
    count = lambda key: int(status.get(key) or 0)  # noqa: E731
    counts = {"succeeded": count("trialsSucceeded"), "failed": count("trialsFailed"),
              "running": count("trialsRunning"), "pending": count("trialsPending"),
              "early_stopped": count("trialsEarlyStopped"), "killed": count("trialsKilled"),
              "metrics_unavailable": count("trialMetricsUnavailable")}
    objective = (spec.get("objective") or {}).get("objectiveMetricName", "")
    optimal = status.get("currentOptimalTrial") or {}
    best = None
    if optimal.get("bestTrialName"):
        best = {"trial": optimal["bestTrialName"],
                "value": _metric_value((optimal.get("observation") or {}).get("metrics"),
                                       objective, _strategy(spec, objective)),
                "params": cast_params(optimal.get("parameterAssignments"))}
    return {"name": meta.get("name", "?"), "namespace": meta.get("namespace", ""),
            "phase": current.get("type", "Pending"), "reason": current.get("reason", ""),
            "message": current.get("message", ""), "objective": objective,
            "max_trials": spec.get("maxTrialCount"),
            "max_failed": spec.get("maxFailedTrialCount"),
            # what Katib counts toward maxTrialCount and maxFailedTrialCount
            "done": counts["succeeded"] + counts["failed"] + counts["killed"]
            + counts["early_stopped"] + counts["metrics_unavailable"],
            "failed_total": counts["failed"] + counts["metrics_unavailable"],
            "trials": counts, "best": best}


def _describe(p: Mapping[str, Any]) -> str:
    t = p["trials"]
    best = p["best"]
    best_text = "best -"
    if best and best["value"] is not None:
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in best["params"].items())
        best_text = f"best {p['objective']} {best['value']:.4f} ({params})"
    return (f"Katib Experiment {p['name']}: {p['phase']} | trials {p['done']}/"
            f"{p['max_trials'] or '?'} done: {t['succeeded']} succeeded, {t['failed']} failed, "
            f"{t['early_stopped']} early-stopped; {t['running']} running, {t['pending']} "
            f"pending | {best_text}")


def _hint(p: Mapping[str, Any]) -> str:
    ns = f"-n {p['namespace']} " if p["namespace"] else ""
    return f"check `kubectl {ns}describe experiment {p['name']}`"


def follow(get: Callable[[], Mapping[str, Any]], timeout_s: float, poll_s: float = 10.0,
           sleep: Callable[[float], None] = time.sleep,
           now: Callable[[], float] = time.monotonic,
           log: Callable[[str, str], None] = progress.log) -> dict[str, Any]:
    """Poll the Experiment until it ends; return the best hyperparameters and the counts.

    Raises on a Failed Experiment, on failed trials reaching maxFailedTrialCount
    (Katib's own rule: failed >= max, so the step fails even before the
    controller flips the phase) and when `timeout_s` passes.
    """
    started, last = now(), None
    while True:
        p = progress_of(get())
        seen = (p["phase"], p["done"], tuple(p["trials"].values()),
                p["best"] and (p["best"]["trial"], p["best"]["value"]))
        if seen != last:
            log("tune", _describe(p))
            last = seen
        if p["phase"] == "Failed":
            why = ": ".join(x for x in (p["reason"], p["message"]) if x) or "no reason given"
            raise KubetrainError(f"Katib Experiment {p['name']} failed ({why}); {_hint(p)}")
        limit = p["max_failed"]
        if limit is not None and p["failed_total"] and p["failed_total"] >= limit:
            raise KubetrainError(
                f"Katib Experiment {p['name']}: {p['failed_total']} trials failed "
                f"(maxFailedTrialCount {limit}); see the trial logs with `kubectl "
                f"{'-n ' + p['namespace'] + ' ' if p['namespace'] else ''}logs -l "
                f"{EXPERIMENT_LABEL}={p['name']} -c {PRIMARY_CONTAINER}`")
        if p["phase"] == "Succeeded":
            best = p["best"]
            if not best or best["value"] is None:
                raise KubetrainError(
                    f"Katib Experiment {p['name']} succeeded but no trial reported "
                    f"{p['objective']}; check that trials print `{p['objective']}=<value>` "
                    f"lines and {_hint(p)}")
            return {"name": p["name"], "hyperparameters": best["params"],
                    "value": best["value"], "trial": best["trial"], "phase": p["phase"],
                    "reason": p["reason"], "trials": p["trials"], "done": p["done"]}
        elapsed = now() - started
        if elapsed >= timeout_s:
            raise KubetrainError(
                f"Katib Experiment {p['name']} did not finish within {timeout_s:g} s (phase "
                f"{p['phase']}, {p['done']}/{p['max_trials'] or '?'} trials done); raise "
                f"--tune-timeout or {_hint(p)}")
        sleep(max(0.0, min(poll_s, timeout_s - elapsed)))


# ------------------------------------------------------------------------- trials

def _state(trial: Mapping[str, Any]) -> str:
    types = {c.get("type") for c in _true_conditions(trial)}
    for katib, ours in (("Failed", "FAIL"), ("MetricsUnavailable", "FAIL"), ("Killed", "KILLED"),
                        ("EarlyStopped", "PRUNED"), ("Succeeded", "COMPLETE"),
                        ("Running", "RUNNING")):
        if katib in types:
            return ours
    return "PENDING"


def _seconds(status: Mapping[str, Any]) -> float | None:
    from datetime import datetime

    try:
        start = datetime.fromisoformat(str(status["startTime"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(status["completionTime"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return round((end - start).total_seconds(), 3)


def trial_row(trial: Mapping[str, Any], number: int) -> dict[str, Any]:
    """One Katib Trial as a row of the local trial table (number, state, value, params...)."""
    spec, status = trial.get("spec") or {}, trial.get("status") or {}
    objective = (spec.get("objective") or {}).get("objectiveMetricName", "")
    metrics = (status.get("observation") or {}).get("metrics") or []
    state = _state(trial)
    value = None if state == "FAIL" else _metric_value(metrics, objective,
                                                       _strategy(spec, objective))
    row: dict[str, Any] = {
        "number": number, "name": (trial.get("metadata") or {}).get("name", ""),
        "state": state, "value": value, "params": cast_params(spec.get("parameterAssignments")),
        "metrics": {m["name"]: _metric_value(metrics, m["name"]) for m in metrics
                    if m.get("name")},
        "intermediate": [],  # per-epoch values live in Katib's DB, not on the Trial
        "seconds": _seconds(status)}
    if state == "FAIL":
        failed = [c for c in _true_conditions(trial)
                  if c.get("type") in ("Failed", "MetricsUnavailable")]
        row["error"] = ": ".join(x for x in (failed[-1].get("reason"), failed[-1].get("message"))
                                 if x) if failed else "failed"
    return row


def trial_rows(items: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of all Trials, numbered in creation order like Optuna's trial numbers."""
    ordered = sorted(items, key=lambda t: (str((t.get("metadata") or {}).get(
        "creationTimestamp", "")), str((t.get("metadata") or {}).get("name", ""))))
    return [trial_row(t, i) for i, t in enumerate(ordered)]


# ------------------------------------------------------------------ Kubernetes API

def custom_objects_api():
    """A CustomObjectsApi from the pod's ServiceAccount, else the local kubeconfig."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, FileNotFoundError, OSError, TypeError) as e:
            raise KubetrainError(
                "no Kubernetes credentials: not running in a pod with a ServiceAccount and no "
                f"usable kubeconfig ({' '.join(str(e).split())[:120]}); run inside the "
                "cluster or set KUBECONFIG") from None
    return client.CustomObjectsApi()


def api_error(exc: Exception, action: str, namespace: str, name: str,
              service_account: str = "") -> KubetrainError:
    """One line naming the cause and the fix of a Kubernetes API failure."""
    status = getattr(exc, "status", None)
    detail = ""
    try:
        detail = json.loads(getattr(exc, "body", "") or "{}").get("message", "")
    except (ValueError, AttributeError):
        detail = str(getattr(exc, "reason", "") or "")
    who = f"ServiceAccount {service_account}" if service_account else "this identity"
    if status == 404 and action == "create":
        return KubetrainError(
            f"Katib is not installed (no experiments.kubeflow.org CRD) or namespace "
            f"{namespace} does not exist; check `kubectl get crd experiments.kubeflow.org` "
            f"and `kubectl get namespace {namespace}`")
    if status == 404:
        return KubetrainError(f"Katib Experiment {name} is gone from namespace {namespace} "
                              f"(deleted while kubetrain was following it?)")
    if status == 403:
        return KubetrainError(
            f"{who} may not {action} Katib experiments/trials in namespace {namespace}; "
            f"apply the Role and RoleBinding in {ROLE_FILE} (`kubectl apply -k manifests/base`)")
    if status == 409:
        return KubetrainError(
            f"Katib Experiment {name} already exists in namespace {namespace}; delete it "
            f"(`kubectl -n {namespace} delete experiment {name}`) or use another name")
    if status in (400, 422):
        return KubetrainError(f"Katib rejected Experiment {name}: {detail or exc}")
    return KubetrainError(f"Kubernetes API error while trying to {action} Katib Experiment "
                          f"{name} in {namespace}: {status or ''} {detail or exc}")


def _service_account(exp: Mapping[str, Any]) -> str:
    job = ((exp.get("spec") or {}).get("trialTemplate") or {}).get("trialSpec") or {}
    return ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get(
        "serviceAccountName", "")


def trial_table(api, namespace: str, name: str, service_account: str = "") -> list[dict]:
    """The Experiment's Trials (label katib.kubeflow.org/experiment=NAME) as table rows."""
    try:
        listing = api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, TRIALS, label_selector=f"{EXPERIMENT_LABEL}={name}")
    except Exception as e:  # ApiException; the kubernetes package is imported lazily
        if getattr(e, "status", None) is None:
            raise
        raise api_error(e, "list", namespace, name, service_account) from None
    return trial_rows(listing.get("items") or [])


def run(exp: dict[str, Any], namespace: str, api=None, timeout_s: float = 6 * 3600,
        keep: bool = False, poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.monotonic,
        log: Callable[[str, str], None] = progress.log) -> tuple[dict[str, Any], list[dict]]:
    """Create the Experiment, follow it, read its trials; delete it unless `keep`.

    Deletion happens in a `finally`, so a timeout or a failure does not leave
    GPU trials running; an Experiment this call did not create (409) is never
    touched. Returns (follow's result, trial rows).
    """
    validate(exp)
    name = exp["metadata"]["name"]
    exp = {**exp, "metadata": {**exp["metadata"], "namespace": namespace}}
    account = _service_account(exp)
    api = api or custom_objects_api()
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, exp)
    except Exception as e:
        if getattr(e, "status", None) is None:
            raise
        raise api_error(e, "create", namespace, name, account) from None
    log("tune", f"created Katib Experiment {name} in namespace {namespace} "
                f"({exp['spec']['algorithm']['algorithmName']}, "
                f"{exp['spec']['maxTrialCount']} trials, "
                f"{exp['spec']['parallelTrialCount']} in parallel)")
    last: dict[str, Any] = {}

    def get() -> Mapping[str, Any]:
        nonlocal last
        try:
            last = api.get_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, name)
        except Exception as e:
            status = getattr(e, "status", None)
            if status is not None and status < 500 and status != 429:
                raise api_error(e, "get", namespace, name, account) from None
            if not last:  # nothing known yet: no progress to report from
                last = exp
            log("tune", f"Kubernetes API unavailable ({status or type(e).__name__}); retrying")
        return last

    previous = _raise_on_sigterm()
    try:
        try:
            result = follow(get, timeout_s, poll_s, sleep=sleep, now=now, log=log)
        except KubetrainError as e:
            rows = _rows_or_empty(api, namespace, name, account)
            first = next((r for r in rows if r["state"] == "FAIL" and r.get("error")), None)
            if first is None:
                raise
            raise KubetrainError(f"{e}; first failed trial {first['name']}: "
                                 f"{first['error']}") from None
        rows = trial_table(api, namespace, name, account)
        return result, rows
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if keep:
            log("tune", f"kept Katib Experiment {name} (delete it with `kubectl -n "
                        f"{namespace} delete experiment {name}`)")
        else:
            _delete(api, namespace, name, log)


def _raise_on_sigterm():
    """Make SIGTERM (a cancelled KFP run stops its pods with it) unwind through `finally`,
    so the Experiment and its GPU trials are deleted; returns the handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(f"terminated by signal {signum} while following a Katib Experiment")

    return signal.signal(signal.SIGTERM, handler)


def _rows_or_empty(api, namespace: str, name: str, account: str) -> list[dict]:
    try:
        return trial_table(api, namespace, name, account)
    except Exception:  # reporting the original failure matters more than the detail
        return []


def _delete(api, namespace: str, name: str, log: Callable[[str, str], None]) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, name)
        log("tune", f"deleted Katib Experiment {name} (and its trials)")
    except Exception as e:
        if getattr(e, "status", None) == 404:
            return
        log("tune", f"could not delete Katib Experiment {name} ({getattr(e, 'status', '')} "
                    f"{type(e).__name__}); delete it with `kubectl -n {namespace} delete "
                    f"experiment {name}`")


def tune(cfg: RunConfig, cluster: ClusterConfig, train_uri: str, val_uri: str, name: str,
         timeout_s: float = 6 * 3600, keep: bool = False, resume_policy: str = "Never",
         api=None, poll_s: float = 10.0) -> tuple[dict[str, Any], list[dict], dict[str, Any]]:
    """Build, validate, run: (best hyperparameters, trial rows, meta for the artifacts)."""
    exp = experiment(cfg, cluster, train_uri, val_uri, name, resume_policy)
    result, rows = run(exp, cluster.namespace, api=api, timeout_s=timeout_s, keep=keep,
                       poll_s=poll_s)
    meta = {"backend": "katib", "experiment": name, "namespace": cluster.namespace,
            "kept": keep, "best_trial": result["trial"], "best_value": result["value"],
            "trials_summary": result["trials"]}
    return result["hyperparameters"], rows, meta
