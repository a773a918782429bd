"""The clean step's Kubeflow Spark Operator SparkApplication (`kubetrain.cluster.spark`).

No Spark Operator runs here, so the document is checked field by field against
the operator's ``sparkoperator.k8s.io/v1beta2`` API (api/v1beta2/
sparkapplication_types.go: field names, enums, types; the pod templates as
Kubernetes pods with ``kubernetes-validate --strict``). Following runs against
status documents and a fake custom-objects API (409 re-attach, failures with
the driver's own error line, the timeout, transient errors); copying the splits
runs against real sharded datasets on the SeaweedFS S3 server; the container
command `kubetrain.cli.spark_pod` starts a real PySpark driver (local master)
and a real executor JVM from the pyspark wheel, as the image does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import yaml

from fakes import Clock, api_exception, backoff_sleeps, transient_errors
from kubetrain.cli import spark_clean, spark_pod
from kubetrain.cluster import backends, k8s, security
from kubetrain.cluster import spark as sp
from kubetrain.config import flags
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import CleanConfig, RunConfig
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data import shards
from kubetrain.data.datasets import Schema
from kubetrain.stages import CleanRequest

DIGEST = "sha256:" + "ab" * 32
CLUSTER = ClusterConfig(
    image_registry="registry.example.com/ml",
    cpu_image_digest=DIGEST,
    namespace="ml-team",
    cpu_node_selector="kubetrain.io/node-pool=cpu",
    s3_secret="team-s3",
    s3_endpoint_url="http://minio.kubeflow:9000",
    s3_region="eu-west-1",
    spark_executors=3,
    spark_executor_cores=2,
    spark_executor_memory="4g",
    spark_driver_memory="512m",
    ttl_seconds=3600,
)
RUN_ID = "5b0d6b1e-1b2b-4c4c-9a9a-123456789abc"
CLEAN = CleanConfig(
    engine="spark", impute="mean", outliers="iqr", outlier_threshold=1.5, test_fraction=0.25
)
SEED = 1234
TABLE = "minio://kubetrain/pipeline-root/run/ingest/table"


def _app(cluster: ClusterConfig = CLUSTER, name: str = "clean-abc", **kwargs) -> dict:
    place = sp.staging(cluster, RUN_ID)
    return sp.spark_application(
        name, cluster, CLEAN, SEED, TABLE, place.splits, place.meta, run_id=RUN_ID, **kwargs
    )


def _template(app: dict, role: str) -> dict:
    return app["spec"][role]["template"]["spec"]


# --- the document -------------------------------------------------------------------------


def test_spec_is_a_python_application_of_the_cpu_image_by_digest():
    app = _app()
    assert app["apiVersion"] == "sparkoperator.k8s.io/v1beta2"
    assert app["kind"] == "SparkApplication"
    assert app["metadata"]["name"] == "clean-abc"
    assert app["metadata"]["namespace"] == "ml-team"
    spec = app["spec"]
    assert (spec["type"], spec["pythonVersion"], spec["mode"]) == ("Python", "3", "cluster")
    assert spec["image"] == f"registry.example.com/ml/kubetrain:{CLUSTER.image_tag}-cpu@{DIGEST}"
    assert spec["restartPolicy"] == {"type": "Never"}  # the KFP task owns the retries
    assert spec["timeToLiveSeconds"] == 3600
    assert "timeToLiveSeconds" not in _app(dataclasses.replace(CLUSTER, ttl_seconds=0))["spec"]


def test_spark_version_is_the_pyspark_the_image_installs():
    import pyspark

    assert _app()["spec"]["sparkVersion"] == sp.SPARK_VERSION == pyspark.__version__
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'spark = ["pyspark=={sp.SPARK_VERSION}"]' in pyproject


def test_main_file_is_spark_clean_inside_the_image_venv():
    app = _app()
    assert app["spec"]["mainApplicationFile"] == f"local://{sp.MAIN_FILE}"
    # the same path below site-packages as this checkout's module (the image installs it
    # non-editable: docker/install.sh checks the file is there)
    package = (
        Path(spark_clean.__file__)
        .resolve()
        .relative_to(Path(sys.modules["kubetrain"].__file__).resolve().parents[1])
    )
    site = PurePosixPath(sp.VENV) / "lib/python3.11/site-packages"
    assert PurePosixPath(sp.MAIN_FILE) == site / package.as_posix()
    assert sp.VENV_PYTHON.startswith(sp.VENV + "/")


def test_arguments_are_the_uris_and_every_clean_setting_the_driver_parses_back():
    args = _app()["spec"]["arguments"]
    place = sp.staging(CLUSTER, RUN_ID)
    parsed = spark_clean.parser().parse_args(args)
    assert parsed.table == "s3://kubetrain/pipeline-root/run/ingest/table"  # minio:// -> s3://
    assert (parsed.train, parsed.validation, parsed.test) == place.splits
    assert parsed.meta == place.meta
    assert place.root == f"s3://kubetrain/pipeline-root/{RUN_ID}/spark-clean"
    given = flags.given(parsed, "clean")
    assert set(given) == {f.name for f in dataclasses.fields(CleanConfig)}  # all, not defaults
    rebuilt = RunConfig.from_flat({**given, "seed": parsed.seed})
    assert rebuilt == RunConfig(seed=SEED, clean=CLEAN)
    assert args[: args.index("--seed")][::2] == [f"--{u}" for u in spark_clean.URI_FLAGS]


def test_s3_keys_come_from_the_secret_and_never_as_values(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    text = yaml.safe_dump(_app())
    for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI"):
        assert secret not in text
    for role in ("driver", "executor"):
        (container,) = _template(_app(), role)["containers"]
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": "team-s3", "key": key}},
            }
        assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        assert env["S3_ENDPOINT_URL"]["value"] == "http://minio.kubeflow:9000"
        assert env["TMPDIR"]["value"] == "/tmp"
        assert [k for k, e in env.items() if "valueFrom" in e] == [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ]


def test_hadoop_conf_sets_s3a_without_any_credential():
    conf = _app()["spec"]["hadoopConf"]
    assert conf == {
        "fs.s3a.aws.credentials.provider": sp.S3A_CREDENTIALS,
        "fs.s3a.endpoint.region": "eu-west-1",
        "fs.s3a.endpoint": "http://minio.kubeflow:9000",
        "fs.s3a.path.style.access": "true",
        "fs.s3a.connection.ssl.enabled": "false",
    }
    aws = _app(dataclasses.replace(CLUSTER, s3_endpoint_url=""))["spec"]["hadoopConf"]
    assert set(aws) == {"fs.s3a.aws.credentials.provider", "fs.s3a.endpoint.region"}
    tls = dataclasses.replace(CLUSTER, s3_endpoint_url="https://u:p@ceph.example.com/")
    assert _app(tls)["spec"]["hadoopConf"]["fs.s3a.endpoint"] == "https://ceph.example.com"
    assert _app(tls)["spec"]["hadoopConf"]["fs.s3a.connection.ssl.enabled"] == "true"
    spark_conf = _app()["spec"]["sparkConf"]
    assert spark_conf == {
        "spark.pyspark.python": "/opt/venv/bin/python",
        "spark.pyspark.driver.python": "/opt/venv/bin/python",
    }


def test_resources_of_driver_and_executors():
    spec = _app()["spec"]
    driver = {k: v for k, v in spec["driver"].items() if k != "template"}
    assert driver == {
        "cores": 1,
        "coreRequest": "1",
        "coreLimit": "2",
        "memory": "512m",
        "memoryOverhead": "384m",  # Spark's floor: half of 512m would be less
        "serviceAccount": "kubetrain-spark",
    }
    executor = {k: v for k, v in spec["executor"].items() if k != "template"}
    assert executor == {
        "instances": 3,
        "cores": 2,
        "coreRequest": "2",
        "coreLimit": "4",
        "memory": "4g",
        "memoryOverhead": "2048m",  # half the heap again for the Python workers
        "serviceAccount": "kubetrain-workload",
        "deleteOnTermination": True,
    }
    assert sp.memory_mib("2g") == 2048 and sp.memory_mib("1t") == 1024 * 1024
    assert sp.memory_mib("2048k") == 2


def test_pods_run_restricted_driver_with_its_token_executors_without():
    app = _app()
    for role, container_name, account in (
        ("driver", sp.DRIVER_CONTAINER, "kubetrain-spark"),
        ("executor", sp.EXECUTOR_CONTAINER, "kubetrain-workload"),
    ):
        pod = _template(app, role)
        assert set(app["spec"][role]["template"]) == {"spec"}
        assert pod["serviceAccountName"] == account == app["spec"][role]["serviceAccount"]
        assert pod["securityContext"] == security.pod_security_context()
        assert pod["volumes"] == security.scratch_volumes()
        (container,) = pod["containers"]
        assert container["name"] == container_name
        assert container["command"] == [sp.VENV_PYTHON, "-m", "kubetrain.cli.spark_pod"]
        assert "args" not in container  # Spark appends driver/executor arguments
        assert container["securityContext"] == security.container_security_context()
        assert container["volumeMounts"] == security.scratch_mounts()
        # the CPU pool, never the GPU nodes; no GPU toleration
        assert pod["nodeSelector"] == {"kubetrain.io/node-pool": "cpu"}
        term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["nodeSelectorTerms"] == [
            {
                "matchExpressions": [
                    {"key": "kubetrain.io/node-pool", "operator": "NotIn", "values": ["gpu"]}
                ]
            }
        ]
        assert "tolerations" not in pod
    assert "automountServiceAccountToken" not in _template(app, "driver")  # creates executors
    assert _template(app, "executor")["automountServiceAccountToken"] is False
    executor_env = {
        e["name"]: e.get("value") for e in _template(app, "executor")["containers"][0]["env"]
    }
    assert executor_env["PYSPARK_PYTHON"] == sp.VENV_PYTHON


def test_labels_link_the_application_to_the_run():
    assert _app()["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "kubetrain",
        "app.kubernetes.io/component": "clean",
        "kubetrain.io/run-id": RUN_ID,
    }
    odd = sp._labels("local run_2026/01")  # not a label value: its hash instead
    assert re.fullmatch(r"run-[0-9a-f]{10}", odd["kubetrain.io/run-id"])


def test_names_are_deterministic_valid_and_short():
    name = sp.application_name(RUN_ID)
    assert name == sp.application_name(RUN_ID) != sp.application_name(RUN_ID + "x")
    assert re.fullmatch(r"kubetrain-clean-[0-9a-f]{10}", name) and len(name) <= sp.MAX_NAME
    assert name == k8s.run_name(RUN_ID, "kubetrain-clean", sp.MAX_NAME)
    with pytest.raises(KubetrainError, match="must be lower-case"):
        _app(name="Clean_ABC")
    with pytest.raises(KubetrainError, match="at most 40"):
        _app(name="c" * 41)
    with pytest.raises(KubetrainError, match="run id"):
        sp.staging(CLUSTER, "")


def test_the_spec_has_exactly_these_v1beta2_fields():
    spec = _app()["spec"]
    assert set(spec) == {
        "type",
        "pythonVersion",
        "mode",
        "sparkVersion",
        "image",
        "mainApplicationFile",
        "arguments",
        "sparkConf",
        "hadoopConf",
        "restartPolicy",
        "driver",
        "executor",
        "timeToLiveSeconds",
    }
    assert set(spec) <= sp.SPEC_FIELDS
    assert set(spec["driver"]) <= sp.DRIVER_FIELDS
    assert set(spec["executor"]) <= sp.EXECUTOR_FIELDS
    # the round trip through YAML (what render writes and kubectl applies) changes nothing
    assert sp.validate(yaml.safe_load(yaml.safe_dump(_app()))) == _app()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda a: a["spec"].update(pythonVerison="3"), "spec.pythonVerison unknown"),
        (lambda a: a["spec"]["driver"].update(cpu=1), "spec.driver.cpu unknown"),
        (lambda a: a["spec"]["driver"].update(instances=2), "spec.driver.instances unknown"),
        (lambda a: a["spec"]["executor"].update(cores="2"), "spec.executor.cores '2'"),
        (lambda a: a["spec"]["executor"].update(instances=0), "spec.executor.instances 0"),
        (lambda a: a["spec"].update(type="python"), "spec.type 'python'"),
        (lambda a: a["spec"].update(mode="local"), "spec.mode 'local'"),
        (lambda a: a["spec"]["restartPolicy"].update(type="OnError"), "restartPolicy.type"),
        (lambda a: a["spec"]["sparkConf"].update(x=1), "spec.sparkConf not a map of strings"),
        (lambda a: a["spec"]["arguments"].append(3), "spec.arguments not a list of strings"),
        (lambda a: a["spec"].pop("mainApplicationFile"), "spec.mainApplicationFile missing"),
        (lambda a: a.update(apiVersion="sparkoperator.k8s.io/v1beta1"), "apiVersion/kind"),
        (
            lambda a: a["spec"]["executor"]["template"]["spec"]["containers"][0].update(name="x"),
            "spec.executor.template needs spec.containers[spark-kubernetes-executor]",
        ),
    ],
)
def test_validate_rejects_what_the_v1beta2_api_does_not_define(change, problem):
    app = _app()
    change(app)
    with pytest.raises(KubetrainError) as info:
        sp.validate(app)
    assert problem in str(info.value) and "\n" not in str(info.value)


@pytest.mark.integration  # runs kubernetes-validate
def test_pod_templates_are_valid_kubernetes_pods(tmp_path):
    """The CRD keeps templates schemaless: validate them as a core/v1 PodTemplate."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": role},
            "template": _app()["spec"][role]["template"],
        }
        for role in ("driver", "executor")
    ]
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",
            "--quiet",
            "--kubernetes-version",
            "1.37.0",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_cluster_settings_of_spark_are_checked_in_one_line():
    cases = [
        ({"spark_executor_memory": "2Gi"}, "spark_executor_memory='2Gi' is not a Spark memory"),
        ({"spark_driver_memory": "1.5g"}, "spark_driver_memory='1.5g'"),
        ({"spark_executors": 0}, "spark_executors=0"),
        ({"spark_executor_cores": 0}, "spark_executor_cores=0"),
        ({"spark_service_account": "kubetrain-workload"}, "must differ"),
        ({"spark_service_account": "Spark_SA"}, "not a service account name"),
    ]
    for values, message in cases:
        with pytest.raises(KubetrainError) as info:
            ClusterConfig(**values)
        assert message in str(info.value) and "\n" not in str(info.value)
    # KFP hands ints back as floats inside the cluster dict
    cfg = ClusterConfig.from_dict({"spark_executors": 4.0, "spark_executor_cores": 2.0})
    assert (cfg.spark_executors, cfg.spark_executor_cores) == (4, 2)
    defaults = ClusterConfig()
    assert (
        defaults.spark_executors,
        defaults.spark_executor_cores,
        defaults.spark_executor_memory,
        defaults.spark_driver_memory,
        defaults.spark_service_account,
    ) == (2, 1, "2g", "1g", "kubetrain-spark")


def test_render_writes_the_spark_application(tmp_path, capsys):
    from kubetrain.cli.main import main

    code = main(
        [
            "render",
            "--engine",
            "spark",
            "--spark-executors",
            "5",
            "--cpu-image-digest",
            DIGEST,
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    app = sp.validate(yaml.safe_load((tmp_path / "sparkapplication.yaml").read_text()))
    assert app["metadata"]["name"] == "kubetrain-clean-rendered"
    assert app["spec"]["executor"]["instances"] == 5
    assert app["spec"]["image"].endswith(f"-cpu@{DIGEST}")
    args = spark_clean.parser().parse_args(app["spec"]["arguments"])
    assert args.table == "s3://kubetrain/pipeline-root/rendered/ingest/table"
    assert args.engine == "spark"
    out = capsys.readouterr().out
    assert "sparkapplication.yaml" in out and "engine=local" not in out
    assert main(["render", "--output-dir", str(tmp_path)]) == 0
    assert "SparkApplication is what --engine spark would create" in capsys.readouterr().out


# --- status and following -----------------------------------------------------------------


def _status(state: str = "", executors: dict | None = None, message: str = "", pod: str = ""):
    status: dict = {"driverInfo": {"podName": pod} if pod else {}}
    if state:
        status["applicationState"] = {"state": state}
        if message:
            status["applicationState"]["errorMessage"] = message
    if executors:
        status["executorState"] = executors
    return status


def _with(app: dict, **status) -> dict:
    return {**app, "status": _status(**status)}


def test_progress_of_reads_state_driver_and_executors():
    app = _app()
    assert sp.progress_of(app).state == "NEW"  # the operator has not seen it yet
    running = sp.progress_of(
        _with(
            app,
            state="RUNNING",
            pod="clean-abc-driver",
            executors={"e-1": "RUNNING", "e-2": "RUNNING", "e-3": "PENDING"},
        )
    )
    assert (running.state, running.running, running.driver_pod) == (
        "RUNNING",
        2,
        "clean-abc-driver",
    )
    assert running.line() == (
        "SparkApplication clean-abc: RUNNING | driver clean-abc-driver | executors "
        "2 running, 1 pending"
    )
    failed = sp.progress_of(
        _with(app, state="FAILED", message="driver container failed with\n ExitCode: 2")
    )
    assert failed.message == "driver container failed with ExitCode: 2"
    assert failed.pod == "clean-abc-driver"  # the operator's name when none is reported


def _sequence(docs: list[dict]):
    it = iter(docs)
    last: dict = {}

    def get():
        nonlocal last
        last = next(it, last)
        return last

    return get


def test_follow_logs_each_change_once_with_the_elapsed_time():
    app = _app()
    docs = [
        _with(app, state="SUBMITTED"),
        _with(app, state="RUNNING", pod="d", executors={"a": "PENDING"}),
        _with(app, state="RUNNING", pod="d", executors={"a": "RUNNING"}),
        _with(app, state="RUNNING", pod="d", executors={"a": "RUNNING"}),
        _with(app, state="SUCCEEDING", pod="d", executors={"a": "COMPLETED"}),
        _with(app, state="COMPLETED", pod="d", executors={"a": "COMPLETED"}),
    ]
    clock, logs = Clock(), []
    final = sp.follow(
        _sequence(docs), 3600, poll_s=5, sleep=clock.sleep, now=clock.now, log=logs.append
    )
    assert final is docs[-1]
    assert logs == [
        "SparkApplication clean-abc: SUBMITTED | driver - | executors 0 running (0 s)",
        "SparkApplication clean-abc: RUNNING | driver d | executors 0 running, 1 pending (5 s)",
        "SparkApplication clean-abc: RUNNING | driver d | executors 1 running (10 s)",
        "SparkApplication clean-abc: SUCCEEDING | driver d | executors 0 running, "
        "1 completed (20 s)",
        "SparkApplication clean-abc: COMPLETED | driver d | executors 0 running, "
        "1 completed (25 s)",
    ]


DRIVER_LOG = """26/01/01 INFO SparkContext: Running Spark version 4.3.0
kubetrain | clean | error: s3://bucket/table is not a table: no meta.json; re-run ingest
26/01/01 INFO ShutdownHookManager: Shutdown hook called
"""


@pytest.mark.parametrize("state", ["FAILED", "SUBMISSION_FAILED"])
def test_follow_fails_with_the_operators_message_and_the_drivers_error(state):
    failed = _with(_app(), state=state, message="driver container failed", pod="clean-abc-driver")
    asked = []

    def pod_log(namespace, pod):
        asked.append((namespace, pod))
        return DRIVER_LOG

    clock = Clock()
    with pytest.raises(KubetrainError) as info:
        sp.follow(
            lambda: failed,
            60,
            sleep=clock.sleep,
            now=clock.now,
            log=lambda m: None,
            pod_log=pod_log,
        )
    message = str(info.value)
    assert message.startswith(f"SparkApplication ml-team/clean-abc {state}: driver container")
    assert "the driver says: s3://bucket/table is not a table: no meta.json" in message
    assert "kubectl -n ml-team logs clean-abc-driver --tail 50" in message
    assert "\n" not in message and asked == [("ml-team", "clean-abc-driver")]


def test_a_driver_log_that_cannot_be_read_does_not_hide_the_failure():
    failed = _with(_app(), state="FAILED")

    def broken(namespace, pod):
        raise api_exception(403, "pods/log is forbidden")

    with pytest.raises(KubetrainError) as info:
        sp.follow(lambda: failed, 60, log=lambda m: None, pod_log=broken)
    assert "FAILED: no error message from the Spark Operator" in str(info.value)
    assert "the driver says" not in str(info.value)


def test_follow_times_out_naming_wait_timeout_and_the_operator_when_never_picked_up():
    clock = Clock()
    running = _with(_app(), state="RUNNING", executors={"a": "RUNNING"})
    with pytest.raises(KubetrainError) as info:
        sp.follow(
            lambda: running, 60, poll_s=25, sleep=clock.sleep, now=clock.now, log=lambda m: None
        )
    assert clock.t == 60 and clock.sleeps == [25, 25, 10]
    message = str(info.value)
    assert "ml-team/clean-abc did not finish within 60 s" in message and "RUNNING" in message
    assert "kubectl -n ml-team describe sparkapplication clean-abc" in message
    assert "raise --wait-timeout" in message and "never picked up" not in message
    clock = Clock()
    with pytest.raises(KubetrainError, match="spark.jobNamespaces"):
        sp.follow(lambda: _app(), 30, sleep=clock.sleep, now=clock.now, log=lambda m: None)


# --- the Kubernetes API (fake) ------------------------------------------------------------


class FakeApi:
    """CustomObjectsApi's three calls; `statuses` are what successive gets report.

    `existing` is an object already on the server under the name: create answers
    409 and gets return it (with the statuses). `on_create(body)` plays the
    operator and the driver: it may write outputs and returns the status.
    """

    def __init__(
        self, statuses=(), create_error=None, get_errors=(), on_create=None, existing=None
    ):
        self.statuses, self.create_error = list(statuses), create_error
        self.get_errors, self.on_create = list(get_errors), on_create
        self.created, self.deleted, self.gets = [], [], 0
        self.app = existing
        if existing is not None and create_error is None:
            self.create_error = api_exception(409, 'sparkapplications "clean-abc" already exists')

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural))
        if self.create_error:
            raise self.create_error
        self.app = body
        if self.on_create:
            self.statuses = [self.on_create(body)]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        if self.get_errors:
            raise self.get_errors.pop(0)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {**(self.app or {}), "status": status}

    def delete_namespaced_custom_object(
        self, group, version, namespace, plural, name, propagation_policy=None
    ):
        self.deleted.append((namespace, name, propagation_policy))


COMPLETED = _status("COMPLETED", {"a": "COMPLETED"})
DELETED = [("ml-team", "clean-abc", "Background")]


def _run(api, app=None, **kwargs):
    clock, logs = Clock(), []
    kwargs.setdefault("poll_s", 1)
    kwargs.setdefault("pod_log", lambda namespace, pod: DRIVER_LOG)
    try:
        return sp.run(
            app or _app(), api=api, sleep=clock.sleep, now=clock.now, log=logs.append, **kwargs
        )
    finally:
        _run.clock, _run.logs = clock, logs


def test_run_creates_follows_and_deletes_unless_kept():
    api = FakeApi([_status("SUBMITTED"), _status("RUNNING", {"a": "RUNNING"}), COMPLETED])
    final = _run(api)
    assert api.created == [("sparkoperator.k8s.io", "v1beta2", "ml-team", "sparkapplications")]
    assert api.app == _app() and final["status"] == COMPLETED and api.gets == 3
    assert api.deleted == DELETED
    assert _run.logs[0] == (
        "created SparkApplication ml-team/clean-abc: 3 executor(s) x 2 core(s), image "
        f"registry.example.com/ml/kubetrain:{CLUSTER.image_tag}-cpu@{DIGEST}"
    )
    assert _run.logs[-1] == "deleted SparkApplication ml-team/clean-abc"
    kept = FakeApi([COMPLETED])
    _run(kept, keep=True)
    assert kept.deleted == []
    assert "kubectl -n ml-team delete sparkapplication clean-abc" in _run.logs[-1]


def test_a_failed_application_is_still_deleted():
    api = FakeApi([_status("FAILED", message="driver container failed with ExitCode: 2")])
    with pytest.raises(KubetrainError, match="ExitCode: 2; the driver says: s3://bucket"):
        _run(api)
    assert api.deleted == DELETED


def test_409_reattaches_to_this_runs_application_never_to_a_strangers():
    api = FakeApi([_status("RUNNING"), COMPLETED], existing=_app())
    assert _run(api)["status"] == COMPLETED and len(api.created) == 1
    assert _run.logs[0] == (
        "re-attached to SparkApplication ml-team/clean-abc: an earlier attempt of this step "
        "created it"
    )
    foreign = FakeApi(
        [{}],
        existing={
            "apiVersion": sp.API_VERSION,
            "kind": sp.KIND,
            "metadata": {"name": "clean-abc", "namespace": "ml-team"},
        },
    )
    with pytest.raises(KubetrainError, match="already exists in ml-team and was not created"):
        _run(foreign)
    assert foreign.deleted == []


def test_missing_operator_rbac_and_webhook_refusals_are_named():
    cases = [
        (
            api_exception(404, "the server could not find the requested resource"),
            "the Kubeflow Spark Operator is not installed (no sparkapplications."
            "sparkoperator.k8s.io CRD)",
        ),
        (api_exception(404, 'namespaces "ml-team" not found'), "namespace 'ml-team' does not"),
        (
            api_exception(403, 'User "system:serviceaccount:ml-team:runner" cannot create'),
            "not allowed to create sparkapplications.sparkoperator.k8s.io in namespace ml-team",
        ),
        (
            api_exception(403, 'admission webhook "validate.sparkapplication" denied it'),
            "the API server rejected SparkApplication clean-abc: admission webhook",
        ),
        (api_exception(422, "spec.driver.cores: Invalid value"), "rejected SparkApplication"),
    ]
    for exc, message in cases:
        api = FakeApi(create_error=exc)
        with pytest.raises(KubetrainError) as info:
            _run(api)
        assert message in str(info.value), str(info.value)
        assert api.deleted == []  # nothing was created, nothing to delete


def test_transient_errors_follow_the_one_policy_and_a_deleted_application_fails():
    errors = transient_errors()
    api = FakeApi([COMPLETED], get_errors=errors)
    assert _run(api, poll_s=5)["status"] == COMPLETED and api.gets == len(errors) + 1
    assert _run.clock.sleeps == backoff_sleeps(5, len(errors))
    gone = FakeApi([COMPLETED], get_errors=[api_exception(404, "not found")])
    with pytest.raises(KubetrainError, match="disappeared"):
        _run(gone)
    assert _run.clock.sleeps == []


# --- collecting the outputs ---------------------------------------------------------------

SCHEMA = Schema("table", ["a", "b", "c"], ["no", "yes"])


def _write_split(uri: str, rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 3)).astype(np.float32)
    y = rng.integers(0, 2, rows)
    return shards.write(uri, X, y, SCHEMA, max_rows_per_shard=rows // 3 + 1)


def test_copy_split_verifies_every_shard_against_the_manifest(s3_env, tmp_path):
    uri = f"s3://{s3_env}/root/run/spark-clean/train"
    written = _write_split(uri, 100, 0)
    assert len(written["shards"]) == 3
    manifest = sp.copy_split(uri, tmp_path / "train")
    assert manifest == written
    X, y, schema = shards.read_all(tmp_path / "train")
    X0, y0, _ = shards.read_all(uri)
    assert np.array_equal(X, X0) and np.array_equal(y, y0) and schema == SCHEMA
    # a shard replaced behind the manifest's back: the copy fails, nothing lands
    name = written["shards"][1]["name"]
    storage.write_bytes(f"{uri}/{name}", b"not parquet")
    with pytest.raises(KubetrainError) as info:
        sp.copy_split(uri, tmp_path / "again")
    assert f"{uri}/{name} does not match its manifest" in str(info.value)
    assert "re-run the clean step" in str(info.value)
    assert not (tmp_path / "again").exists()
    with pytest.raises(KubetrainError, match="holds no complete dataset"):
        sp.copy_split(f"s3://{s3_env}/root/run/spark-clean/nothing", tmp_path / "x")


def _driver(staging: sp.Staging, meta: dict):
    """Plays the operator and the driver: writes what spark_clean writes, reports COMPLETED."""

    def on_create(app: dict) -> dict:
        args = spark_clean.parser().parse_args(app["spec"]["arguments"])
        assert (args.train, args.validation, args.test, args.meta) == (
            *staging.splits,
            staging.meta,
        )
        for i, uri in enumerate(staging.splits):
            _write_split(uri, (70, 15, 15)[i], i)
        storage.write_bytes(staging.meta, json.dumps(meta).encode())
        return COMPLETED

    return on_create


def test_the_clean_backend_runs_follows_and_copies_into_the_step_outputs(
    s3_env, tmp_path, monkeypatch
):
    cluster = ClusterConfig(pipeline_root=f"minio://{s3_env}/pipeline-root", namespace="ml-team")
    meta = {"stage": "clean", "splits": {"train": {"rows": 70}}, "duplicates_removed": 0}
    place = sp.staging(cluster, RUN_ID)
    assert place.root == f"s3://{s3_env}/pipeline-root/{RUN_ID}/spark-clean"
    api = FakeApi(on_create=_driver(place, meta))
    monkeypatch.setattr(k8s, "custom_objects_api", lambda: api)
    monkeypatch.setattr(sp, "read_driver_log", lambda namespace, pod: "")
    cleaner = backends.cleaner_for(CLEAN, dataclasses.asdict(cluster), RUN_ID)
    out = tmp_path / "outputs"
    req = CleanRequest(
        str(tmp_path / "table"),
        str(out / "train"),
        str(out / "validation"),
        str(out / "test"),
        CLEAN,
        SEED,
        table_uri=f"minio://{s3_env}/pipeline-root/{RUN_ID}/ingest/table",
        run_id=RUN_ID,
    )
    assert cleaner(req) == meta
    app = api.app
    assert app["metadata"]["name"] == sp.application_name(RUN_ID)
    args = spark_clean.parser().parse_args(app["spec"]["arguments"])
    assert args.table == f"s3://{s3_env}/pipeline-root/{RUN_ID}/ingest/table"
    for name, rows in (("train", 70), ("validation", 15), ("test", 15)):
        assert shards.read_manifest(out / name)["rows"] == rows
    assert api.deleted == [("ml-team", app["metadata"]["name"], "Background")]


def test_a_completed_application_without_outputs_is_a_user_error(s3_env, tmp_path):
    cluster = ClusterConfig(pipeline_root=f"s3://{s3_env}/root", namespace="ml-team")
    with pytest.raises(KubetrainError, match="wrote no .*meta.json; see the driver's log"):
        sp.clean_on_cluster(
            cluster,
            RUN_ID,
            CLEAN,
            SEED,
            f"s3://{s3_env}/table",
            *(str(tmp_path / n) for n in ("a", "b", "c")),
            api=FakeApi([COMPLETED]),
            sleep=Clock().sleep,
            log=lambda m: None,
            pod_log=lambda n, p: "",
        )
    with pytest.raises(KubetrainError, match="needs the table artifact's URI"):
        sp.clean_on_cluster(cluster, RUN_ID, CLEAN, SEED, "", "a", "b", "c", api=FakeApi())


@pytest.mark.integration  # the real driver program with PySpark in local mode
def test_the_applications_arguments_run_the_real_driver_program(s3_env, tmp_path):
    """spark_clean.py with exactly the SparkApplication's arguments, against real S3."""
    from sklearn.datasets import load_breast_cancer

    from kubetrain.data.datasets import save_table

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.drop(columns=["target"])
    frame["label"] = [data.target_names[i] for i in data.target]  # ingest's text labels
    schema = Schema("table", list(data.feature_names), list(data.target_names))
    save_table(tmp_path / "table", frame, schema)
    table = f"s3://{s3_env}/root/run/ingest/table"
    storage.upload(tmp_path / "table", table)
    cluster = ClusterConfig(pipeline_root=f"s3://{s3_env}/root", namespace="ml-team")
    place = sp.staging(cluster, RUN_ID)
    app = sp.spark_application(
        "clean-e2e", cluster, CLEAN, SEED, table, place.splits, place.meta, run_id=RUN_ID
    )
    assert spark_clean.main(app["spec"]["arguments"]) == 0
    out = [tmp_path / "out" / name for name in ("train", "validation", "test")]
    meta = sp.collect(place, *map(str, out), lambda message: None)
    for name, path in zip(("train", "validation", "test"), out, strict=True):
        assert shards.read_manifest(path)["rows"] == meta["splits"][name]["rows"]


# --- the container command (kubetrain.cli.spark_pod) --------------------------------------

EXECUTOR_ENV = {
    "SPARK_EXECUTOR_MEMORY": "2g",
    "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@clean-abc-svc:7078",
    "SPARK_EXECUTOR_ID": "3",
    "SPARK_EXECUTOR_CORES": "2",
    "SPARK_APPLICATION_ID": "spark-0123",
    "SPARK_EXECUTOR_POD_IP": "10.0.0.7",
    "SPARK_RESOURCE_PROFILE_ID": "0",
    "SPARK_EXECUTOR_POD_NAME": "clean-abc-exec-3",
    "SPARK_CONF_DIR": "/opt/spark/conf",
    "SPARK_JAVA_OPT_10": "-Dten",
    "SPARK_JAVA_OPT_2": "-Dtwo",
    "SPARK_JAVA_OPT_0": "-Dzero",
    "JAVA_HOME": "/usr/lib/jvm/java-17",
    "SPARK_HOME": "/spark",
}


def test_executor_command_is_the_backend_jvm_the_driver_describes():
    cmd, env = spark_pod.command(["executor"], EXECUTOR_ENV)
    assert env["SPARK_HOME"] == "/spark"
    assert cmd[:6] == [
        "/usr/lib/jvm/java-17/bin/java",
        "-Dzero",
        "-Dtwo",
        "-Dten",
        "-Xms2g",
        "-Xmx2g",
    ]
    assert cmd[6] == "-cp"
    assert cmd[7].split(":")[:2] == ["/opt/spark/conf", "/spark/jars/*"]
    assert cmd[8] == spark_pod.EXECUTOR_BACKEND
    assert cmd[9:] == [
        "--driver-url",
        "spark://CoarseGrainedScheduler@clean-abc-svc:7078",
        "--executor-id",
        "3",
        "--cores",
        "2",
        "--app-id",
        "spark-0123",
        "--hostname",
        "10.0.0.7",
        "--resourceProfileId",
        "0",
        "--podName",
        "clean-abc-exec-3",
    ]


def test_driver_command_is_spark_submit_in_client_mode_on_the_pod_ip():
    import pyspark

    argv = ["driver", "--properties-file", "/opt/spark/conf/spark.properties", "app.py", "--x"]
    cmd, env = spark_pod.command(argv, {"SPARK_DRIVER_BIND_ADDRESS": "10.0.0.5"})
    home = str(Path(pyspark.__file__).parent)  # the wheel is the Spark install
    assert env["SPARK_HOME"] == home
    assert cmd == [
        f"{home}/bin/spark-submit",
        "--conf",
        "spark.driver.bindAddress=10.0.0.5",
        "--conf",
        "spark.executorEnv.SPARK_DRIVER_POD_IP=10.0.0.5",
        "--deploy-mode",
        "client",
        "--properties-file",
        "/opt/spark/conf/spark.properties",
        "app.py",
        "--x",
    ]


def test_the_container_command_fails_in_one_line_outside_a_spark_pod(capsys):
    assert spark_pod.main(["driver"]) == 2
    assert spark_pod.main(["shell"]) == 2
    env = {k: v for k, v in EXECUTOR_ENV.items() if k != "SPARK_DRIVER_URL"}
    with pytest.raises(KubetrainError, match="SPARK_DRIVER_URL is not set"):
        spark_pod.command(["executor"], env)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "kubetrain | spark | error: SPARK_DRIVER_BIND_ADDRESS is not set: `driver` runs "
        "inside a pod that Spark on Kubernetes started, which sets it",
        "kubetrain | spark | error: expected `driver` or `executor` as the first argument, "
        f"got 'shell' ({spark_pod.USAGE})",
    ]


def _pod_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_", "PYSPARK_"))}
    return {**env, **extra}


@pytest.mark.integration  # starts a JVM
def test_the_executor_command_starts_sparks_kubernetes_executor_backend(tmp_path):
    env = {k: v for k, v in EXECUTOR_ENV.items() if k not in ("JAVA_HOME", "SPARK_HOME")}
    env.update(
        SPARK_DRIVER_URL="spark://CoarseGrainedScheduler@127.0.0.1:1", SPARK_CONF_DIR=str(tmp_path)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetrain.cli.spark_pod", "executor"],
        env=_pod_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    # the backend parsed every flag and went for the driver, which is not there
    assert proc.returncode != 0
    assert "KubernetesExecutorBackend: Started daemon" in proc.stderr, proc.stderr[-3000:]
    assert "Failed to connect to /127.0.0.1:1" in proc.stderr


@pytest.mark.integration  # runs a PySpark driver (local master) through spark-submit
def test_the_driver_command_runs_a_pyspark_application(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(
        "import sys\n"
        "from pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.getOrCreate()\n"
        "total = spark.range(int(sys.argv[1])).selectExpr('sum(id) AS s').collect()[0]['s']\n"
        "open(sys.argv[2], 'w').write(str(total))\n"
        "spark.stop()\n"
    )
    properties = tmp_path / "spark.properties"
    properties.write_text(
        "spark.master=local[1]\nspark.ui.enabled=false\nspark.app.name=kubetrain-test\n"
        f"spark.pyspark.python={sys.executable}\nspark.pyspark.driver.python={sys.executable}\n"
    )
    out = tmp_path / "out.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetrain.cli.spark_pod",
            "driver",
            "--properties-file",
            str(properties),
            "--class",
            "org.apache.spark.deploy.PythonRunner",
            str(app),
            "100",
            str(out),
        ],
        env=_pod_env(SPARK_DRIVER_BIND_ADDRESS="127.0.0.1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == "4950"
