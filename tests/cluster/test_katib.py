"""Cluster tuning (`kubetrain.cluster.katib`, `kubetrain.cli.trial`): the Experiment, its trials.

No cluster: the generated Experiment is checked the way Katib's admission
webhook and suggestion services check it (their rules re-implemented in
`katib.validate`), against Katib's own pydantic API models (lossless round
trip) and, for the trial Job, against the Kubernetes schema (strict). The
follow/timeout/failure logic runs on Experiment status documents of each phase
with a fake clock; `run` talks to a fake CustomObjectsApi (409 re-attach, transient
errors, the timeout) through `kubetrain.cluster.follow`. The trial entrypoint
runs as a real subprocess on real splits made by the ingest and clean stages,
from a local directory and from a real S3 server, and its stdout is parsed with
Katib's default metrics regex.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeflow_katib_api.models import V1beta1Experiment, V1beta1Trial
from kubernetes.client.exceptions import ApiException

from fakes import Clock, api_exception, backoff_sleeps, transient_errors
from kubetrain.cli import trial
from kubetrain.cluster import katib
from kubetrain.config import flags
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import TUNE_ALGORITHMS, RunConfig
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.training import tuning

KATIB_REGEX = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")
METRICS = ("validation-accuracy", "validation-loss")
NAME = "kubetrain-tune-abc12"
TRAIN_URI, VAL_URI = (
    "s3://kubetrain/pipeline-root/run-1/clean/train",
    "s3://kubetrain/pipeline-root/run-1/clean/validation",
)
SAMPLE = {
    "learningRate": "0.0012",
    "weightDecay": "3.5e-05",
    "dropout": "0.2",
    "width": "96",
    "batchSize": "64",
}


def make(
    algorithm: str = "tpe",
    early: str = "medianstop",
    cluster: ClusterConfig | None = None,
    **settings,
) -> dict:
    """The Experiment of these settings; without a time budget unless one is given, so
    maxTrialCount is tune_trials (the budget's cap has its own tests)."""
    cfg = RunConfig.from_flat(
        {
            "tune_algorithm": algorithm,
            "tune_early_stopping": early,
            "tune_time_budget": 0,
            **settings,
        }
    )
    return experiment_of(cfg, cluster)


def experiment_of(
    cfg: RunConfig,
    cluster: ClusterConfig | None = None,
    name: str = NAME,
    train_uri: str = TRAIN_URI,
    val_uri: str = VAL_URI,
) -> dict:
    """The Experiment of `cfg`'s sections, as the tune step builds it."""
    return katib.experiment(
        cfg.train, cfg.tune, cfg.seed, cluster or ClusterConfig(), train_uri, val_uri, name
    )


def job_of(exp: dict) -> dict:
    return exp["spec"]["trialTemplate"]["trialSpec"]


def container_of(exp: dict) -> dict:
    return job_of(exp)["spec"]["template"]["spec"]["containers"][0]


def substituted(command: list[str], values: dict[str, str] = SAMPLE) -> list[str]:
    """The command as Katib runs it: each ${trialParameters.x} replaced by a value."""
    return [
        re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: values[m.group(1)], a) for a in command
    ]


# ------------------------------------------------------------------ the Experiment


@pytest.mark.parametrize("early", ["medianstop", "none"])
@pytest.mark.parametrize("algorithm", TUNE_ALGORITHMS)
def test_experiment_passes_webhook_checks_and_round_trips(algorithm, early):
    exp = make(algorithm, early)
    katib.validate(exp)  # webhook + suggestion-service rules + pydantic round trip
    model = V1beta1Experiment.from_dict(exp)
    assert model.spec.algorithm.algorithm_name == algorithm
    assert model.to_dict() == exp  # nothing dropped or coerced by Katib's API types
    assert yaml.safe_load(katib.to_yaml(exp)) == exp
    spec = exp["spec"]
    assert ("earlyStopping" in spec) == (early == "medianstop")
    if early == "medianstop":
        assert {
            s["name"]: int(s["value"]) for s in spec["earlyStopping"]["algorithmSettings"]
        } == tuning.MEDIANSTOP
    assert spec["objective"] == {
        "type": "maximize",
        "objectiveMetricName": "validation-accuracy",
        "additionalMetricNames": ["validation-loss"],
        "metricStrategies": [
            {"name": "validation-accuracy", "value": "latest"},
            {"name": "validation-loss", "value": "latest"},
        ],
    }
    assert spec["metricsCollectorSpec"] == {"collector": {"kind": "StdOut"}}
    assert spec["resumePolicy"] == "Never"
    # the search space is the local backend's, in Katib's vocabulary
    space = tuning.for_algorithm(tuning.search_space(), algorithm)
    assert [p["name"] for p in spec["parameters"]] == [p.name.replace("_", "-") for p in space]
    assert [p["parameterType"] for p in spec["parameters"]] == [p.type for p in space]
    for p, param in zip(spec["parameters"], space, strict=True):
        fs = p["feasibleSpace"]
        for key in ("min", "max", "step"):
            if key in fs:
                assert isinstance(fs[key], str) and float(fs[key]) == getattr(param, key)
        assert fs.get("distribution") == ("logUniform" if param.log else None)
        assert fs.get("list", []) == list(param.values)


def test_feasible_space_survives_yaml_as_strings():
    exp = make("tpe")
    text = katib.to_yaml(exp)
    assert "min: '1e-06'" in text  # PyYAML alone would write 1e-06 bare: a float to kubectl
    loaded = yaml.safe_load(text)
    for p in loaded["spec"]["parameters"]:
        for key, value in p["feasibleSpace"].items():
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, str) for v in values), (p["name"], key, value)
    # any YAML 1.1/1.2 loader: every scalar that looks like a number is quoted
    tricky = {
        "a": "1e-05",
        "b": "1E5",
        "c": "yes",
        "d": "0x1F",
        "e": ".5",
        "f": "text",
        "g": "on",
        "h": "-3",
        "i": "1_000",
    }
    dumped = katib.to_yaml(tricky)
    assert yaml.safe_load(dumped) == tricky
    for key, value in tricky.items():
        if key != "f":
            assert f"{key}: '{value}'" in dumped


def test_algorithm_settings_match_the_local_samplers_and_katibs_services():
    trials, seed = 12, 7
    startup = min(10, max(2, trials // 3))
    space = tuning.search_space()

    def settings(algorithm):
        exp = make(algorithm, tune_trials=trials, seed=seed)
        return {s["name"]: s["value"] for s in exp["spec"]["algorithm"]["algorithmSettings"]}

    mtpe = tuning.make_sampler("multivariate-tpe", seed, space, trials)
    assert settings("multivariate-tpe") == {
        "random_state": "7",
        "n_startup_trials": str(mtpe._n_startup_trials),
    }
    gp = tuning.make_sampler("bayesianoptimization", seed, space, trials)
    assert settings("bayesianoptimization") == {
        "random_state": "7",
        "n_initial_points": str(gp._n_startup_trials),
    }
    assert gp._n_startup_trials == startup
    # hyperopt serves tpe and random in Katib's default config and refuses n_startup_trials
    for algorithm in ("tpe", "random", "grid", "cmaes"):
        assert settings(algorithm) == {"random_state": "7"}
    assert settings("sobol") == {}  # goptuna's sobol reads no settings


def test_grid_is_all_categorical_and_capped_at_its_size():
    exp = make("grid", tune_trials=1000, tune_parallel=4)
    params = exp["spec"]["parameters"]
    assert all(p["parameterType"] == "categorical" for p in params)
    assert [p["feasibleSpace"]["list"] for p in params] == [
        list(p.values) for p in tuning.for_algorithm(tuning.search_space(), "grid")
    ]
    size = 1
    for p in params:
        size *= len(p["feasibleSpace"]["list"])
    assert exp["spec"]["maxTrialCount"] == size < 1000
    katib.validate(exp)
    too_many = copy.deepcopy(exp)
    too_many["spec"]["maxTrialCount"] = size + 1
    with pytest.raises(KubetrainError, match=f"grid has {size} points"):
        katib.validate(too_many)


def test_trial_limits_follow_katibs_counting():
    spec = make(tune_trials=5, tune_parallel=2, tune_max_failed=1)["spec"]
    assert (spec["maxTrialCount"], spec["parallelTrialCount"]) == (5, 2)
    # Katib fails the Experiment at failed >= maxFailedTrialCount; locally failed > max fails
    assert spec["maxFailedTrialCount"] == 2
    assert make(tune_trials=2, tune_max_failed=3)["spec"]["maxFailedTrialCount"] == 2
    with pytest.raises(KubetrainError, match="tune_trials is 0"):
        make(tune_trials=0)


def test_the_trial_time_estimate_is_a_start_plus_rows_times_epochs():
    assert (katib.TRIAL_START_S, katib.SECONDS_PER_ROW_EPOCH) == (30.0, 1e-5)
    assert katib.trial_seconds(0, 10) == 30.0
    assert katib.trial_seconds(65_004, 10) == pytest.approx(36.5004)
    assert katib.trial_seconds(1_000_000, 10) == pytest.approx(130.0)


@pytest.mark.parametrize(
    ("budget", "trials", "parallel", "rows", "expected"),
    [
        # a 50,000-row table (65,004 rows after augmentation) at the default 120 s budget:
        # floor(120 / 36.5004) = 3 waves of 1 trial
        (120, 8, 1, 65_004, 3),
        (120, 8, 2, 65_004, 6),  # 3 waves of 2
        (120, 4, 2, 65_004, 4),  # never more than asked
        (20, 8, 2, 65_004, 1),  # not even one trial's time: still one trial
        (120, 8, 1, 0, 4),  # rows unknown: the start alone, floor(120 / 30)
        (3600, 200, 4, 1_000_000, 108),  # floor(3600 / 130) = 27 waves of 4
        (0, 8, 1, 65_004, 8),  # no budget: tune_trials
        (-1, 8, 1, 65_004, 8),
    ],
)
def test_the_time_budget_caps_max_trial_count(budget, trials, parallel, rows, expected):
    tune = RunConfig.from_flat(
        {"tune_time_budget": budget, "tune_trials": trials, "tune_parallel": parallel}
    ).tune
    assert katib.budgeted_trials(tune, trials, rows) == expected
    exp = katib.experiment(
        RunConfig().train, tune, 42, ClusterConfig(), TRAIN_URI, VAL_URI, NAME, train_rows=rows
    )
    spec = exp["spec"]
    assert spec["maxTrialCount"] == expected
    assert spec["parallelTrialCount"] == min(parallel, expected)
    assert spec["maxFailedTrialCount"] == min(tune.tune_max_failed + 1, expected)
    katib.validate(exp)


def test_the_time_budget_caps_a_grid_below_its_size():
    assert make("grid", tune_trials=1000, tune_time_budget=120)["spec"]["maxTrialCount"] == 4


def test_tune_records_the_budgeted_trial_count():
    cfg = RunConfig.from_flat({"tune_trials": 8, "tune_time_budget": 120})
    api = FakeApi(
        [status_doc("Created", "Running", "Succeeded", succeeded=1, best=BEST)],
        [trial_doc("aaaaaaaa", "Succeeded", "2025-03-01T10:00:00Z")],
    )
    created = []
    real_create = api.create_namespaced_custom_object

    def create(group, version, namespace, plural, body):  # the body the API server got
        created.append(body)
        return real_create(group, version, namespace, plural, body)

    api.create_namespaced_custom_object = create
    _, _, meta = katib.tune(
        cfg.train,
        cfg.tune,
        cfg.seed,
        ClusterConfig(),
        TRAIN_URI,
        VAL_URI,
        NAME,
        api=api,
        train_rows=65_004,
        poll_s=5,
        sleep=Clock().sleep,
        now=Clock().now,
        log=lambda stage, line: None,
    )
    assert created[0]["spec"]["maxTrialCount"] == 3
    assert meta["max_trial_count"] == 3 and meta["time_budget_s"] == 120
    assert meta["estimated_trial_s"] == 36.5 and meta["trials_run"] == 1


def test_the_cluster_tune_step_counts_the_training_rows_from_the_manifest(tmp_path):
    import numpy as np

    from kubetrain.cluster import backends
    from kubetrain.data import shards
    from kubetrain.data.datasets import Schema

    X, y = np.zeros((250, 3), np.float32), np.arange(250) % 2
    schema = Schema("table", ["a", "b", "c"], ["n", "p"])
    shards.write(tmp_path / "train", X, y, schema, max_rows_per_shard=100)
    facts = backends._split_facts(str(tmp_path / "train"), "auto")
    assert facts == {"train_rows": 250, "regression": False, "width": True}
    missing = backends._split_facts(str(tmp_path / "missing"), "auto")
    assert missing["train_rows"] == 0  # the estimate: start only
    # 16x16 RGB images get a ResNet, whose channels are not searched
    image = Schema("image", [f"pixel_{i}" for i in range(768)], ["n", "p"], [3, 16, 16])
    shards.write(tmp_path / "images", np.zeros((20, 768), np.float32), y[:20], image)
    assert backends._split_facts(str(tmp_path / "images"), "auto")["width"] is False


def test_trial_job_runs_the_entrypoint_on_the_gpu_pool_with_s3_credentials():
    cluster = ClusterConfig(
        s3_endpoint_url="http://minio.kubeflow:9000",
        gpus=2,
        gpu_node_selector="pool=a100",
        gpu_toleration="gpu:NoSchedule",
    )
    exp = make(cluster=cluster)
    job = job_of(exp)
    pod = job["spec"]["template"]["spec"]
    c = container_of(exp)
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"sidecar.istio.io/inject": "false"}
    assert pod["serviceAccountName"] == cluster.workload_service_account  # not the runner's
    assert c["name"] == exp["spec"]["trialTemplate"]["primaryContainerName"] == "training"
    assert c["image"] == cluster.image("cuda")
    assert c["command"][:7] == [
        "python",
        "-m",
        "kubetrain.cli.trial",
        "--train",
        TRAIN_URI,
        "--validation",
        VAL_URI,
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["limits"]["cpu"] == cluster.gpu_cpu
    assert c["resources"]["requests"]["memory"] == cluster.gpu_memory
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    env = {e["name"]: e for e in c["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "kubetrain-s3", "key": key}}
    assert env["AWS_DEFAULT_REGION"]["value"] == cluster.s3_region
    assert env["S3_ENDPOINT_URL"]["value"] == "http://minio.kubeflow:9000"
    # data come from s3://, no PVC: the only volumes are the restricted profile's emptyDirs
    assert all(set(v) == {"name", "emptyDir"} for v in pod["volumes"])
    # Katib's webhook converts the template to a batch/v1 Job and rejects unknown fields
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_trial_pods_run_restricted_as_the_workload_account_without_a_token():
    cluster = ClusterConfig(gpus=1, workload_service_account="team-workload")
    exp = make(cluster=cluster)
    pod = job_of(exp)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "team-workload" != cluster.service_account
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert pod["containers"] and not pod.get("initContainers")
    for c in pod["containers"]:  # every container the template defines
        ctx = c["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes[mounts["/tmp"]]["emptyDir"] == {}
        assert volumes[mounts["/home/kubetrain/.cache"]]["emptyDir"] == {}
        env = {e["name"]: e for e in c["env"]}
        assert env["TMPDIR"]["value"] == "/tmp"
        assert env["XDG_CACHE_HOME"]["value"] == "/home/kubetrain/.cache"
        # the only credentials are the S3 keys, by reference to the Secret
        assert [k for k, e in env.items() if "valueFrom" in e] == [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ]
        assert all(
            e["valueFrom"]["secretKeyRef"]["name"] == cluster.s3_secret
            for e in env.values()
            if "valueFrom" in e
        )
    katib.validate(exp)  # still what Katib's webhook and API models accept
    kubernetes_validate.validate(job_of(exp), kubernetes_validate.latest_version(), strict=True)


def test_cpu_only_cluster_gets_the_cpu_image_and_no_gpu_placement():
    cluster = ClusterConfig(gpus=0, cpu_node_selector="pool=cpu")
    exp = make(cluster=cluster)
    c, pod = container_of(exp), job_of(exp)["spec"]["template"]["spec"]
    assert c["image"] == cluster.image("cpu")
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    assert c["resources"]["limits"]["cpu"] == "2"  # twice the request, like CPU steps
    assert pod["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in pod
    katib.validate(exp)
    with pytest.raises(KubetrainError, match="device=cuda but the cluster config requests no GPU"):
        make(cluster=cluster, device="cuda")


def test_template_command_is_the_trial_cli_with_every_placeholder_defined():
    cfg = RunConfig.from_flat(
        {
            "model": "mlp",
            "optimizer": "sgd",
            "momentum": 0.8,
            "l1": 1e-5,
            "patience": 3,
            "seed": 5,
            "tune_epochs": 4,
            "tune_objective": "validation-loss",
        }
    )
    exp = experiment_of(cfg)
    assert exp["spec"]["objective"]["type"] == "minimize"
    command = container_of(exp)["command"]
    used = set(re.findall(r"\$\{trialParameters\.(\w+)\}", json.dumps(job_of(exp))))
    defined = {p["name"] for p in exp["spec"]["trialTemplate"]["trialParameters"]}
    assert used == defined == set(SAMPLE)
    refs = {p["reference"] for p in exp["spec"]["trialTemplate"]["trialParameters"]}
    assert refs == {p["name"] for p in exp["spec"]["parameters"]}
    # the command parses with the trial's own parser into the same settings
    args = trial.build_parser().parse_args(substituted(command)[3:])
    parsed = flags.from_arguments(args, *trial.SECTIONS)
    assert (args.train, args.validation) == (TRAIN_URI, VAL_URI)
    fixed = katib.fixed_settings(cfg.train, cfg.tune, cfg.seed, tuning.search_space())
    for field, value in fixed.items():
        assert parsed.flat()[field] == value, field
    assert (parsed.hyper.learning_rate, parsed.hyper.width, parsed.hyper.batch_size) == (
        0.0012,
        96,
        64,
    )
    assert (parsed.train, parsed.tune.tune_epochs, parsed.seed) == (cfg.train, 4, 5)
    assert set(trial.METRICS) == set(tuning.GOALS)
    assert set(tuning.TASK_METRICS[False]) == set(METRICS)  # what a classifier trial prints


def test_trial_command_line_is_pinned():
    """Flag names, their order and the Katib parameter names of the default trial command."""
    command = container_of(make("tpe"))["command"]
    assert command == [
        "python",
        "-m",
        "kubetrain.cli.trial",
        "--train",
        TRAIN_URI,
        "--validation",
        VAL_URI,
        "--checkpoint-root",
        "s3://kubetrain/pipeline-root/kubetrain-checkpoints/trials",
        "--learning-rate",
        "${trialParameters.learningRate}",
        "--weight-decay",
        "${trialParameters.weightDecay}",
        "--dropout",
        "${trialParameters.dropout}",
        "--width",
        "${trialParameters.width}",
        "--batch-size",
        "${trialParameters.batchSize}",
        "--model",
        "auto",
        "--regression-loss",
        "mse",
        "--optimizer",
        "adamw",
        "--momentum",
        "0.9",
        "--l1",
        "0.0",
        "--lr-schedule",
        "cosine",
        "--patience",
        "6",
        "--device",
        "auto",
        "--torch-compile",
        "auto",
        "--seed",
        "42",
        "--tune-epochs",
        "10",
        "--tune-objective",
        "validation-accuracy",
        "--cv-folds",
        "-1",
    ]
    assert [p["name"] for p in make("tpe")["spec"]["parameters"]] == [
        "learning-rate",
        "weight-decay",
        "dropout",
        "width",
        "batch-size",
    ]


@pytest.mark.parametrize("algorithm", ["tpe", "grid"])
def test_a_resnets_search_leaves_out_the_width_it_has_not(algorithm):
    cfg = RunConfig.from_flat({"tune_algorithm": algorithm})
    exp = katib.experiment(
        cfg.train, cfg.tune, cfg.seed, ClusterConfig(), TRAIN_URI, VAL_URI, NAME, width=False
    )
    katib.validate(exp)
    names = [p["name"] for p in exp["spec"]["parameters"]]
    assert names == ["learning-rate", "weight-decay", "dropout", "batch-size"]
    command = " ".join(container_of(exp)["command"])
    assert "--width" not in command and "--batch-size" in command


BAD = {
    "unknown goal": (
        lambda s: s["objective"].update(type="maximise"),
        "objective.type 'maximise' is unknown",
    ),
    "unknown algorithm": (
        lambda s: s["algorithm"].update(algorithmName="annealing"),
        "algorithmName 'annealing' is unknown",
    ),
    "numeric min": (
        lambda s: s["parameters"][1]["feasibleSpace"].update(min=1e-06),
        r"feasibleSpace.min must be a string .*got float 1e-06",
    ),
    "numeric list": (
        lambda s: s["parameters"][4]["feasibleSpace"].update(list=[32, 64]),
        "feasibleSpace.list must be a list of strings",
    ),
    "undefined placeholder": (
        lambda s: s["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0][
            "command"
        ].extend(["--momentum", "${trialParameters.y}"]),
        r"undefined trial parameter\(s\) \$\{trialParameters.y\}",
    ),
    "parallel over max": (
        lambda s: s.update(parallelTrialCount=9, maxTrialCount=8),
        r"parallelTrialCount \(9\) must not exceed spec.maxTrialCount \(8\)",
    ),
    "failed over max": (
        lambda s: s.update(maxFailedTrialCount=9),
        r"maxFailedTrialCount \(9\) must not exceed",
    ),
    "tpe setting hyperopt refuses": (
        lambda s: s["algorithm"]["algorithmSettings"].append(
            {"name": "n_startup_trials", "value": "3"}
        ),
        "setting 'n_startup_trials' is not accepted by Katib's tpe service",
    ),
    "unknown early stopping": (
        lambda s: s["earlyStopping"].update(algorithmName="hyperband"),
        "earlyStopping.algorithmName 'hyperband' is unknown",
    ),
    "unknown reference": (
        lambda s: s["trialTemplate"]["trialParameters"][0].update(reference="lr"),
        "references 'lr', which is not in spec.parameters",
    ),
    "unused trial parameter": (
        lambda s: s["trialTemplate"]["trialParameters"].append(
            {"name": "momentum", "reference": "dropout-2"}
        ),
        "momentum is never used",
    ),
    "min above max": (
        lambda s: s["parameters"][0]["feasibleSpace"].update(min="0.5"),
        r"min \(0.5\) must be below max",
    ),
    "list on a double": (
        lambda s: s["parameters"][2]["feasibleSpace"].update(list=["0.1"]),
        "feasibleSpace.list is not supported for parameterType double",
    ),
    "categorical with min": (
        lambda s: s["parameters"][4]["feasibleSpace"].update(min="1"),
        "min/max/step are not supported for parameterType categorical",
    ),
    "unknown parameter type": (
        lambda s: s["parameters"][3].update(parameterType="integer"),
        "parameterType 'integer' is not supported",
    ),
    "bad resume policy": (
        lambda s: s.update(resumePolicy="Always"),
        "resumePolicy 'Always' is unknown",
    ),
    "unsafe shell argument": (
        lambda s: s["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0][
            "command"
        ].__setitem__(4, "s3://b/my data"),
        "is not shell-safe",
    ),
    "field Katib does not know": (
        lambda s: s.update(maxTrialsCount=3),
        "field spec.maxTrialsCount is not part of Katib's",
    ),
    "wrong type for Katib's model": (
        lambda s: s.update(maxTrialCount="8"),
        "maxTrialCount must be an integer",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validate_rejects_what_katib_rejects_in_one_line(case):
    mutate, message = BAD[case]
    exp = make("tpe")
    mutate(exp["spec"])
    with pytest.raises(KubetrainError, match=message) as info:
        katib.validate(exp)
    assert "\n" not in str(info.value) and str(info.value).startswith(
        f"invalid Katib Experiment {NAME}: "
    )


def test_experiment_names_are_valid_and_stable():
    for run_id in ("3f2c9a1e-58d4-4a8e-9b1f-0c6d2e7a9b10", "local_Run 7", ""):
        name = katib.experiment_name(run_id)
        assert name == katib.experiment_name(run_id) and len(name) <= katib.MAX_NAME
        katib.validate(experiment_of(RunConfig(), name=name))
    assert katib.experiment_name("a") != katib.experiment_name("b")
    assert katib.experiment_name("a", prefix="9 Weird_Prefix" * 5).startswith("kt-9-weird")


def test_validate_rejects_bad_names_and_small_cmaes_spaces():
    exp = make("cmaes")
    exp["metadata"]["name"] = "Tune_1"
    exp["spec"]["parameters"] = [
        p
        for p in exp["spec"]["parameters"]
        if p["parameterType"] == "categorical" or p["name"] == "dropout"
    ]
    with pytest.raises(KubetrainError) as info:
        katib.validate(exp)
    assert "Experiment name 'Tune_1'" in str(info.value)
    assert "cmaes needs at least two int/double parameters" in str(info.value)


# ------------------------------------------------------------- following status


def status_doc(
    *phases: str,
    succeeded=0,
    failed=0,
    running=0,
    pending=0,
    early_stopped=0,
    best: dict | None = None,
    reason: str = "",
    message: str = "",
    base: dict | None = None,
) -> dict:
    """An Experiment as `kubectl get experiment -o json` shows it in the given phases."""
    doc = copy.deepcopy(base or make("tpe"))
    doc["metadata"].update(
        uid="1b0c2c5e-2f7a-4c1e-9d1a-7e0e6f1f0a11", creationTimestamp="2025-03-01T10:00:00Z"
    )
    conditions = []
    for i, phase in enumerate(phases):
        last = i == len(phases) - 1
        conditions.append(
            {
                "type": phase,
                "status": "True" if last or phase == "Created" else "False",
                "reason": reason if last and reason else f"Experiment{phase}",
                "message": message if last and message else f"Experiment is {phase.lower()}",
                "lastUpdateTime": f"2025-03-01T10:0{i}:00Z",
                "lastTransitionTime": f"2025-03-01T10:0{i}:00Z",
            }
        )
    status = {
        "startTime": "2025-03-01T10:00:00Z",
        "conditions": conditions,
        "trials": succeeded + failed + running + pending + early_stopped,
        "trialsSucceeded": succeeded,
        "trialsFailed": failed,
        "trialsRunning": running,
        "trialsPending": pending,
        "trialsEarlyStopped": early_stopped,
    }
    if best:
        status["currentOptimalTrial"] = {
            "bestTrialName": best["trial"],
            "parameterAssignments": [{"name": k, "value": v} for k, v in best["params"].items()],
            "observation": {
                "metrics": [
                    {
                        "name": "validation-accuracy",
                        "latest": best["accuracy"],
                        "max": "0.99",
                        "min": "0.5",
                    },
                    {"name": "validation-loss", "latest": "0.0612", "max": "0.9", "min": "0.05"},
                ]
            },
        }
    doc["status"] = status
    V1beta1Experiment.from_dict(doc)  # a document Katib's API types accept
    return doc


BEST = {
    "trial": f"{NAME}-x7k2p9qd",
    "accuracy": "0.9812",
    "params": {
        "learning-rate": "0.0012",
        "weight-decay": "3.5e-05",
        "dropout": "0.2",
        "width": "96",
        "batch-size": "64",
    },
}


def follow(docs: list[dict], timeout_s: float = 600, poll_s: float = 10):
    clock, lines, it = Clock(), [], iter(docs)
    state = {"last": None}

    def get():
        state["last"] = next(it, state["last"])
        return state["last"]

    try:
        return katib.follow(
            get,
            timeout_s,
            poll_s,
            sleep=clock.sleep,
            now=clock.now,
            log=lambda stage, msg: lines.append(f"{stage} | {msg}"),
        ), lines
    finally:
        follow.lines, follow.clock = lines, clock  # for tests that expect an error


def test_follow_created_running_succeeded_returns_typed_best_hyperparameters():
    docs = [
        status_doc("Created"),
        status_doc("Created", "Running", running=1, pending=1),
        status_doc("Created", "Running", running=1, pending=1),  # no change: no line
        status_doc("Created", "Running", succeeded=1, running=1, best=BEST),
        status_doc(
            "Created",
            "Running",
            "Succeeded",
            succeeded=3,
            early_stopped=1,
            failed=1,
            best=BEST,
            reason="ExperimentMaxTrialsReached",
        ),
    ]
    result, lines = follow(docs)
    assert result["hyperparameters"] == {
        "learning_rate": 0.0012,
        "weight_decay": 3.5e-05,
        "dropout": 0.2,
        "width": 96,
        "batch_size": 64,
    }
    assert type(result["hyperparameters"]["width"]) is int
    assert type(result["hyperparameters"]["batch_size"]) is int
    assert type(result["hyperparameters"]["learning_rate"]) is float
    assert (result["value"], result["trial"], result["phase"]) == (
        0.9812,
        BEST["trial"],
        "Succeeded",
    )
    assert result["trials"]["succeeded"] == 3 and result["done"] == 5
    assert len(lines) == 4  # one per change, none for the repeated document
    assert "Created | trials 0/8 done" in lines[0]
    assert (
        "Running | trials 0/8 done: 0 succeeded, 0 failed, 0 early-stopped; 1 running, "
        "1 pending | best -" in lines[1]
    )
    assert "best validation-accuracy 0.9812 (learning_rate 0.0012" in lines[2]
    assert "Succeeded | trials 5/8 done: 3 succeeded, 1 failed, 1 early-stopped" in lines[3]
    assert follow.clock.sleeps == [10, 10, 10, 10]


def test_follow_failed_experiment_raises_with_reason_and_message():
    docs = [
        status_doc("Created", "Running", running=1),
        status_doc(
            "Created",
            "Running",
            "Failed",
            failed=1,
            reason="ExperimentFailed",
            message="Suggestion service tpe is not ready",
        ),
    ]
    with pytest.raises(KubetrainError) as info:
        follow(docs)
    text = str(info.value)
    assert (
        f"Katib Experiment {NAME} failed (ExperimentFailed: Suggestion service tpe is "
        "not ready)" in text
    )
    assert f"kubectl -n kubetrain describe experiment {NAME}" in text


def test_follow_stops_when_failed_trials_reach_the_limit():
    exp = make("tpe", tune_max_failed=1)  # maxFailedTrialCount 2
    docs = [
        status_doc("Created", "Running", failed=1, running=1, base=exp),
        status_doc("Created", "Running", failed=2, running=1, base=exp),
    ]
    with pytest.raises(KubetrainError, match=r"2 trials failed \(maxFailedTrialCount 2\)") as info:
        follow(docs)
    assert f"logs -l katib.kubeflow.org/experiment={NAME} -c training" in str(info.value)
    assert len(follow.lines) == 2


def test_follow_times_out_with_a_clear_message():
    docs = [status_doc("Created", "Running", succeeded=2, failed=1, running=1)]
    with pytest.raises(KubetrainError) as info:
        follow(docs, timeout_s=25, poll_s=10)
    assert str(info.value) == (
        f"Katib Experiment {NAME} did not finish within 25 s (phase Running, 3/8 trials done); "
        f"raise --wait-timeout or check `kubectl -n kubetrain describe experiment {NAME}`"
    )
    assert follow.clock.sleeps == [10, 10, 5]  # never sleeps past the deadline
    assert len(follow.lines) == 1


def test_follow_succeeded_without_metrics_is_an_error():
    with pytest.raises(KubetrainError, match="no trial reported validation-accuracy"):
        follow([status_doc("Created", "Running", "Succeeded", succeeded=2)])


def test_progress_phase_is_the_latest_true_condition():
    assert katib.progress_of({"metadata": {"name": "x"}})["phase"] == "Pending"
    doc = status_doc("Created", "Running", "Succeeded", "Restarting")
    assert katib.progress_of(doc)["phase"] == "Restarting"
    doc = status_doc("Created", "Running", succeeded=1, best={**BEST, "accuracy": "unavailable"})
    p = katib.progress_of(doc)
    assert p["phase"] == "Running" and p["best"]["value"] is None


# ---------------------------------------------------------------------- trials


def trial_doc(
    suffix: str, condition: str, created: str, accuracy: str | None = "0.97", message: str = ""
) -> dict:
    """A Trial as `kubectl get trial -o json` shows it (trimmed runSpec)."""
    exp = make("tpe")
    doc = {
        "apiVersion": "kubeflow.org/v1beta1",
        "kind": "Trial",
        "metadata": {
            "name": f"{NAME}-{suffix}",
            "namespace": "kubetrain",
            "creationTimestamp": created,
            "labels": {"katib.kubeflow.org/experiment": NAME},
            "ownerReferences": [
                {
                    "apiVersion": "kubeflow.org/v1beta1",
                    "kind": "Experiment",
                    "name": NAME,
                    "uid": "1b0c2c5e",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "objective": exp["spec"]["objective"],
            "parameterAssignments": [{"name": k, "value": v} for k, v in BEST["params"].items()],
            "primaryContainerName": "training",
            "successCondition": katib.JOB_SUCCESS,
            "failureCondition": katib.JOB_FAILURE,
            "metricsCollector": {"collector": {"kind": "StdOut"}},
            "runSpec": {"apiVersion": "batch/v1", "kind": "Job"},
        },
        "status": {
            "startTime": "2025-03-01T10:00:00Z",
            "completionTime": "2025-03-01T10:02:30Z",
            "conditions": [
                {"type": "Created", "status": "True", "reason": "TrialCreated"},
                {"type": "Running", "status": "False", "reason": "TrialRunning"},
                {
                    "type": condition,
                    "status": "True",
                    "reason": f"Trial{condition}",
                    "message": message or f"Trial has {condition.lower()}",
                },
            ],
        },
    }
    if accuracy is not None:
        doc["status"]["observation"] = {
            "metrics": [
                {"name": "validation-accuracy", "latest": accuracy, "max": "0.98", "min": "0.6"},
                {"name": "validation-loss", "latest": "0.081", "max": "0.7", "min": "0.08"},
            ]
        }
    V1beta1Trial.from_dict(doc)
    return doc


def test_trial_rows_look_like_local_rows():
    items = [
        trial_doc("bbbbbbbb", "EarlyStopped", "2025-03-01T10:01:00Z", accuracy="0.91"),
        trial_doc("aaaaaaaa", "Succeeded", "2025-03-01T10:00:00Z"),
        trial_doc(
            "cccccccc",
            "Failed",
            "2025-03-01T10:02:00Z",
            accuracy=None,
            message="Job has reached the specified backoff limit",
        ),
        trial_doc("dddddddd", "MetricsUnavailable", "2025-03-01T10:03:00Z", accuracy="unavailable"),
    ]
    rows = katib.trial_rows(items)
    assert [(r["number"], r["name"][-8:], r["state"]) for r in rows] == [
        (0, "aaaaaaaa", "COMPLETE"),
        (1, "bbbbbbbb", "PRUNED"),
        (2, "cccccccc", "FAIL"),
        (3, "dddddddd", "FAIL"),
    ]
    done = rows[0]
    assert done["value"] == 0.97 and done["seconds"] == 150.0
    assert done["params"] == {
        "learning_rate": 0.0012,
        "weight_decay": 3.5e-05,
        "dropout": 0.2,
        "width": 96,
        "batch_size": 64,
    }
    assert done["metrics"] == {"validation-accuracy": 0.97, "validation-loss": 0.081}
    assert rows[1]["value"] == 0.91
    assert rows[2]["value"] is None
    assert rows[2]["error"] == "TrialFailed: Job has reached the specified backoff limit"
    assert rows[3]["value"] is None
    # the same keys the local backend writes, so the report and plot code take both
    assert {"number", "state", "value", "params", "intermediate", "seconds"} <= set(done)
    assert tuning.best_of(rows, "maximize")["name"] == items[1]["metadata"]["name"]


# ------------------------------------------------------------------ run (fake API)


class FakeApi:
    """The four CustomObjectsApi calls `run` makes, scripted.

    `get_errors` are raised by the first gets, in order; then `docs` are returned.
    """

    def __init__(
        self,
        docs: list[dict],
        trials: list[dict] | None = None,
        create_error: ApiException | None = None,
        get_errors: list[Exception] | None = None,
    ):
        self.docs, self.trials, self.create_error = list(docs), trials or [], create_error
        self.get_errors = list(get_errors or [])
        self.calls: list[tuple] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.create_error:
            raise self.create_error

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", plural, name))
        if self.get_errors:
            raise self.get_errors.pop(0)
        return self.docs.pop(0) if len(self.docs) > 1 else self.docs[0]

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector):
        self.calls.append(("list", plural, label_selector))
        return {"items": self.trials}

    def delete_namespaced_custom_object(
        self, group, version, namespace, plural, name, propagation_policy=None
    ):
        self.calls.append(("delete", plural, name))


def run(api: FakeApi, exp: dict | None = None, **kwargs):
    clock, lines = Clock(), []
    kwargs.setdefault("timeout_s", 600)
    try:
        return katib.run(
            exp or make("tpe"),
            "kubetrain",
            api=api,
            poll_s=5,
            sleep=clock.sleep,
            now=clock.now,
            log=lambda s, m: lines.append(m),
            **kwargs,
        )
    finally:
        run.lines, run.clock = lines, clock


def test_run_creates_follows_reads_trials_and_deletes():
    items = [trial_doc("aaaaaaaa", "Succeeded", "2025-03-01T10:00:00Z")]
    api = FakeApi(
        [
            status_doc("Created", "Running", running=1),
            status_doc("Created", "Running", "Succeeded", succeeded=1, best=BEST),
        ],
        items,
    )
    best, rows = run(api)
    assert best["hyperparameters"]["width"] == 96 and len(rows) == 1
    assert api.calls[0] == ("create", "kubeflow.org", "v1beta1", "kubetrain", "experiments", NAME)
    assert ("list", "trials", f"katib.kubeflow.org/experiment={NAME}") in api.calls
    assert api.calls[-1] == ("delete", "experiments", NAME)
    assert any(line.startswith(f"created Katib Experiment {NAME}") for line in run.lines)

    kept = FakeApi([status_doc("Created", "Running", "Succeeded", succeeded=1, best=BEST)], items)
    run(kept, keep=True)
    assert not any(c[0] == "delete" for c in kept.calls)
    assert any("kept Katib Experiment" in line for line in run.lines)


def test_run_deletes_on_timeout_and_names_the_first_failed_trial():
    api = FakeApi([status_doc("Created", "Running", running=1)])
    with pytest.raises(KubetrainError, match="did not finish within 12 s"):
        run(api, timeout_s=12)
    assert api.calls[-1] == ("delete", "experiments", NAME)

    items = [
        trial_doc("cccccccc", "Failed", "2025-03-01T10:02:00Z", accuracy=None, message="OOMKilled")
    ]
    api = FakeApi([status_doc("Created", "Running", "Failed", failed=4)], items)
    with pytest.raises(
        KubetrainError, match=f"first failed trial {NAME}-cccccccc: TrialFailed: OOMKilled"
    ):
        run(api)
    assert api.calls[-1] == ("delete", "experiments", NAME)


def test_run_deletes_when_the_step_is_terminated():
    import os
    import signal

    class Cancelled(FakeApi):
        def get_namespaced_custom_object(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)  # what a cancelled KFP run sends the pod
            return super().get_namespaced_custom_object(*args)

    before = signal.getsignal(signal.SIGTERM)
    api = Cancelled([status_doc("Created", "Running", running=1)])
    with pytest.raises(SystemExit, match="terminated by signal"):
        run(api)
    assert api.calls[-1] == ("delete", "experiments", NAME)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize(
    "status, message",
    [
        (404, r"Katib is not installed \(no experiments.kubeflow.org CRD\)"),
        (403, r"may not create Katib .* manifests/base/role.yaml"),
        (409, f"Katib Experiment {NAME} already exists in namespace kubetrain"),
        (400, "Katib rejected Experiment .*: admission webhook denied it"),
    ],
)
def test_run_turns_api_errors_into_one_line(status, message):
    error = ApiException(status=status, reason="Nope")
    error.body = json.dumps({"message": "admission webhook denied it"})
    api = FakeApi([{}], create_error=error)
    with pytest.raises(KubetrainError, match=message) as info:
        run(api)
    assert "\n" not in str(info.value)
    assert not any(c[0] == "delete" for c in api.calls)  # never delete what we did not create


def test_run_rides_out_transient_api_errors_with_capped_backoff():
    """No answer, 5xx and 429 while following: back off (poll interval doubled) and retry."""
    items = [trial_doc("aaaaaaaa", "Succeeded", "2025-03-01T10:00:00Z")]
    errors = transient_errors()
    api = FakeApi(
        [status_doc("Created", "Running", "Succeeded", succeeded=1, best=BEST)],
        items,
        get_errors=errors,
    )
    best, rows = run(api)
    assert best["hyperparameters"]["width"] == 96 and len(rows) == 1
    assert run.clock.sleeps == backoff_sleeps(5, len(errors)) == [5, 10, 20, 40]
    retries = [line for line in run.lines if "Kubernetes API unavailable" in line]
    assert len(retries) == len(errors)
    assert retries[0] == (
        f"Kubernetes API unavailable while trying to get Katib Experiment "
        f"{NAME} (503 etcdserver: leader changed); retry 1 in 5 s"
    )
    assert [c[0] for c in api.calls].count("create") == 1
    assert api.calls[-1] == ("delete", "experiments", NAME)


def test_run_keeps_retrying_until_the_wait_timeout_names_the_flag():
    api = FakeApi([{}], get_errors=[api_exception(503, "down")] * 100)
    with pytest.raises(KubetrainError) as info:
        run(api, timeout_s=300)
    message = str(info.value)
    assert message.startswith(f"Katib Experiment {NAME} did not finish within 300 s")
    assert "raise --wait-timeout" in message and "--tune-timeout" not in message
    assert "got no answer from the Kubernetes API" in message
    assert sum(run.clock.sleeps) == 300 and max(run.clock.sleeps) == 60  # capped, not cut short
    assert api.calls[-1] == ("delete", "experiments", NAME)


def test_run_fails_at_once_on_a_refusal_while_following():
    api = FakeApi([{}], get_errors=[api_exception(403, "forbidden")])
    with pytest.raises(KubetrainError, match=r"may not get Katib experiments/trials"):
        run(api)
    assert run.clock.sleeps == []
    assert api.calls[-1] == ("delete", "experiments", NAME)  # ours: created by this call


def test_a_refusal_names_the_pipeline_runner_not_the_trials_account():
    cfg = RunConfig.from_flat({"tune_trials": 3})
    api = FakeApi([{}], create_error=api_exception(403, "forbidden"))
    with pytest.raises(KubetrainError) as info:
        katib.tune(
            cfg.train,
            cfg.tune,
            cfg.seed,
            ClusterConfig(),
            TRAIN_URI,
            VAL_URI,
            NAME,
            api=api,
            poll_s=5,
            sleep=Clock().sleep,
            now=Clock().now,
            log=lambda stage, line: None,
        )
    assert "ServiceAccount kubetrain-pipeline-runner may not create" in str(info.value)
    assert "kubetrain-workload" not in str(info.value)


def test_409_on_create_reattaches_to_this_runs_experiment():
    """A preempted tune step's retry finds its Experiment by name and follows it, not a copy."""
    items = [trial_doc("aaaaaaaa", "Succeeded", "2025-03-01T10:00:00Z")]
    api = FakeApi(
        [
            status_doc("Created", "Running", running=1),
            status_doc("Created", "Running", "Succeeded", succeeded=1, best=BEST),
        ],
        items,
        create_error=api_exception(409, f'experiments "{NAME}" already exists'),
    )
    best, rows = run(api)
    assert best["trial"] == BEST["trial"] and len(rows) == 1
    assert [c[0] for c in api.calls].count("create") == 1  # no second create
    assert any(line.startswith(f"re-attached to Katib Experiment {NAME}") for line in run.lines)
    assert not any(line.startswith("created Katib Experiment") for line in run.lines)
    assert api.calls[-1] == ("delete", "experiments", NAME)  # now ours to clean up


def test_tune_reads_wait_and_keep_from_the_cluster_config():
    cfg = RunConfig.from_flat({"tune_trials": 3})
    api = FakeApi(
        [status_doc("Created", "Running", "Succeeded", succeeded=1, best=BEST)],
        [trial_doc("aaaaaaaa", "Succeeded", "2025-03-01T10:00:00Z")],
    )
    clock, lines = Clock(), []
    best, rows, meta = katib.tune(
        cfg.train,
        cfg.tune,
        cfg.seed,
        ClusterConfig(finished_jobs="keep", wait_timeout=120),
        TRAIN_URI,
        VAL_URI,
        NAME,
        api=api,
        poll_s=5,
        sleep=clock.sleep,
        now=clock.now,
        log=lambda stage, line: lines.append(line),
    )
    assert best["width"] == 96 and len(rows) == 1
    assert meta["kept"] is True and meta["best_trial"] == BEST["trial"]
    assert not any(c[0] == "delete" for c in api.calls)
    exp = api.calls[0]
    assert exp[:5] == ("create", "kubeflow.org", "v1beta1", "kubetrain", "experiments")


# ------------------------------------------------------------ the trial entrypoint


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[Path, Path]:
    """Real train/validation split directories from the ingest and clean stages' functions."""
    from kubetrain.data.clean import clean
    from kubetrain.data.ingest import ingest

    root = tmp_path_factory.mktemp("katib-data")
    cfg = RunConfig.from_flat({"dataset": "breast_cancer"})
    ingest(cfg.data.dataset, cfg.data.label_column, str(root / "table"))
    clean(
        str(root / "table"),
        str(root / "train"),
        str(root / "validation"),
        str(root / "test"),
        cfg.clean,
        cfg.seed,
    )
    return root / "train", root / "validation"


def trial_command(train: str, val: str, root: str, epochs: int = 2, cv_folds: int = 0) -> list[str]:
    """The trial template's own command, with placeholders filled as Katib fills them.

    `root` is where trials keep checkpoints: the pipeline root's when it is an
    s3:// URI, else a local folder put in place of it. One validation split unless
    `cv_folds` says otherwise (a cross-validated trial reports per fold, not per epoch).
    """
    cfg = RunConfig.from_flat({"tune_epochs": epochs, "device": "cpu", "cv_folds": cv_folds})
    placement = ClusterConfig(gpus=0, **({"pipeline_root": root} if "://" in root else {}))
    exp = experiment_of(cfg, placement, train_uri=train, val_uri=val)
    command = substituted(container_of(exp)["command"])
    assert command[0] == "python"
    if "://" not in root:
        command[command.index("--checkpoint-root") + 1] = root
    return [sys.executable] + command[1:]


def check_katib_output(stdout: str, epochs: int) -> list[tuple[str, str, float]]:
    """Parse like Katib's StdOut collector: metric lines, their timestamps and values."""
    reports = []
    for line in stdout.splitlines():
        if not any(m in line for m in METRICS):
            continue  # the collector skips lines without a metric name
        stamp, _, rest = line.partition(" ")
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # RFC 3339
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), line
        found = KATIB_REGEX.findall(line)
        assert len(found) == 1, line
        name, value = found[0][0], found[0][1]
        assert name in METRICS and f"{name}={value}" == rest, line  # the whole value parsed
        reports.append((when, name, float(value)))
    assert [r[0] for r in reports] == sorted(r[0] for r in reports)
    names = [r[1] for r in reports]
    assert names == list(METRICS) * (epochs + 1)  # both per epoch, then the final pair
    for _when, name, value in reports:
        if name == "validation-accuracy":
            assert 0.0 <= value <= 1.0
        else:
            assert value > 0
    per_epoch = [(reports[i][2], reports[i + 1][2]) for i in range(0, 2 * epochs, 2)]
    final = (reports[-2][2], reports[-1][2])
    assert final == min(per_epoch, key=lambda accuracy_loss: accuracy_loss[1])  # best epoch
    return reports


@pytest.mark.integration  # a subprocess
def test_trial_subprocess_prints_metrics_katib_parses(splits, tmp_path):
    train, val = splits
    out = subprocess.run(
        trial_command(str(train), str(val), str(tmp_path / "root")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    check_katib_output(out.stdout, epochs=2)


def test_a_cross_validated_trial_reports_the_running_mean_after_each_fold(splits, tmp_path):
    train, val = splits
    command = trial_command(str(train), str(val), str(tmp_path / "root"), epochs=1, cv_folds=3)
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = [
        KATIB_REGEX.findall(line)[0] for line in out.stdout.splitlines() if "validation-" in line
    ]
    values = [(name, float(value)) for name, value, *_ in found]
    assert [n for n, _ in values] == list(METRICS) * 4  # a report per fold, then the final
    assert values[-2:] == values[4:6]  # the final mean is the running mean after fold 3


def test_trial_reads_splits_straight_from_s3(splits, s3_env, s3_server):
    bucket = s3_env
    for split in splits:
        storage.upload(split, f"s3://{bucket}/run-1/clean/{split.name}")
    command = trial_command(
        f"s3://{bucket}/run-1/clean/train",
        f"s3://{bucket}/run-1/clean/validation",
        f"s3://{bucket}/pipeline-root",
        epochs=2,
    )
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)  # S3 env from s3_env
    assert out.returncode == 0, out.stderr
    first = check_katib_output(out.stdout, epochs=2)
    stored = storage.list_uris(f"s3://{bucket}/pipeline-root/kubetrain-checkpoints/trials/")
    assert [u for u in stored if u.endswith("/last.pt")], stored
    # the pod re-created after a preemption: the checkpoint on S3 has every epoch done,
    # so it trains nothing more and reports the same final metrics
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    final = [line.split(" ", 1)[1] for line in again.stdout.splitlines() if "validation-" in line]
    assert final == [f"{name}={value!r}" for _, name, value in first[-2:]]


@pytest.mark.integration  # a subprocess
def test_trial_bad_arguments_exit_2_with_one_line(splits, capsys):
    out = subprocess.run(
        [sys.executable, "-m", "kubetrain.cli.trial", "--train", str(splits[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert "--validation" in out.stderr
    for argv, message in [
        (
            ["--train", str(splits[0]), "--validation", str(splits[1]), "--width", "abc"],
            "width must be a int",
        ),
        (
            ["--train", str(splits[0]), "--validation", str(splits[1]), "--batch-size", "-8"],
            "batch_size=-8 is out of range",
        ),
        (
            ["--train", "/nonexistent/train", "--validation", str(splits[1])],
            "is not a kubetrain dataset artifact",
        ),
        (
            ["--train", str(splits[0]), "--validation", str(splits[1]), "--bogus", "1"],
            "unrecognized arguments: --bogus 1",
        ),
    ]:
        assert trial.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
        assert message in captured.err


def test_trial_entrypoint_calls_the_shared_run_trial(splits, monkeypatch, capsys, tmp_path):
    calls = []

    def fake_run_trial(
        train, hyper, tune, seed, train_data, val_data, schema, hook, checkpoint_dir=None
    ):
        calls.append((train, hyper, tune, seed, len(train_data[0]), len(val_data[0]), schema.kind))
        assert hook(1, {"validation-accuracy": 0.5, "validation-loss": 1.25e-7}) is False
        return {"validation-accuracy": 0.75, "validation-loss": 0.5, "epochs": 1, "stopped": False}

    monkeypatch.setattr(tuning, "run_trial", fake_run_trial)
    argv = substituted(container_of(make("tpe"))["command"])[3:]
    argv[argv.index("--train") + 1], argv[argv.index("--validation") + 1] = map(str, splits)
    argv[argv.index("--checkpoint-root") + 1] = str(tmp_path / "checkpoints")
    assert trial.main(argv) == 0
    train, hyper, tune, seed, n_train, n_val, kind = calls[0]
    assert hyper.to_dict() == {
        "learning_rate": 0.0012,
        "weight_decay": 3.5e-05,
        "dropout": 0.2,
        "width": 96,
        "batch_size": 64,
    }
    assert (tune.tune_epochs, train.device, kind) == (10, "auto", "table")
    assert seed == RunConfig().seed
    assert n_train > n_val > 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation-" in line]
    assert [line.split(" ", 1)[1] for line in lines] == [
        "validation-accuracy=0.5",
        "validation-loss=1.25e-07",
        "validation-accuracy=0.75",
        "validation-loss=0.5",
    ]
    assert KATIB_REGEX.findall(lines[1])[0][1] == "1.25e-07"


def test_preempted_trial_pods_are_recreated_and_resume():
    """An evicted pod is not a failed trial: the Job makes a new pod, which resumes."""
    exp = make("tpe")
    job = job_of(exp)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
    assert job["spec"]["backoffLimit"] == 0
    command = container_of(exp)["command"]
    root = command[command.index("--checkpoint-root") + 1]
    assert root == katib.trial_checkpoint_root(ClusterConfig())


@pytest.mark.parametrize(
    "root, expected",
    [
        ("s3://bk/root", "s3://bk/root/kubetrain-checkpoints/trials"),
        ("minio://mlpipeline/v2", "s3://mlpipeline/v2/kubetrain-checkpoints/trials"),
        ("gs://bk/root", None),  # kubetrain's storage writes S3 only: no trial checkpoints
    ],
)
def test_trial_checkpoints_live_beside_the_pipeline_root(root, expected):
    exp = experiment_of(RunConfig(), ClusterConfig(pipeline_root=root))
    command = container_of(exp)["command"]
    if expected is None:
        assert "--checkpoint-root" not in command
    else:
        assert command[command.index("--checkpoint-root") + 1] == expected


def test_a_regression_experiment_maximizes_r2_and_collects_rmse_and_loss() -> None:
    cfg = RunConfig.from_flat({"tune_time_budget": 0})
    exp = katib.experiment(
        cfg.train, cfg.tune, cfg.seed, ClusterConfig(), TRAIN_URI, VAL_URI, NAME, regression=True
    )
    objective = exp["spec"]["objective"]
    assert (objective["type"], objective["objectiveMetricName"]) == ("maximize", "validation-r2")
    assert objective["additionalMetricNames"] == ["validation-rmse", "validation-loss"]
    assert [s["name"] for s in objective["metricStrategies"]] == [
        "validation-r2",
        "validation-rmse",
        "validation-loss",
    ]
    command = container_of(exp)["command"]
    assert command[command.index("--tune-objective") + 1] == "validation-r2"
    rmse = RunConfig.from_flat({"tune_time_budget": 0, "tune_objective": "validation-rmse"})
    exp = katib.experiment(
        rmse.train, rmse.tune, 1, ClusterConfig(), TRAIN_URI, VAL_URI, NAME, regression=True
    )
    assert exp["spec"]["objective"]["type"] == "minimize"
    wrong = RunConfig.from_flat({"tune_objective": "validation-accuracy"})
    with pytest.raises(KubetrainError, match="does not apply to a regression"):
        katib.experiment(
            wrong.train, wrong.tune, 1, ClusterConfig(), TRAIN_URI, VAL_URI, NAME, regression=True
        )
