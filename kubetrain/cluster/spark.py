"""The clean stage on the cluster as a Kubeflow Spark Operator ``SparkApplication``.

With ``engine=spark`` on a cluster the clean step does not clean: it creates a
``sparkoperator.k8s.io/v1beta2`` SparkApplication, follows it, and copies what
its driver wrote into the step's KFP output artifacts. The document, as the
Spark Operator's API defines it:

* ``spec``: ``type: Python``, ``pythonVersion: "3"``, ``mode: cluster``,
  ``sparkVersion`` of the pyspark in the image, the project's CPU image (by
  digest when ``cpu_image_digest`` is set), ``mainApplicationFile`` the
  `kubetrain.cli.spark_clean` file inside the image's venv (``local://``: it is
  in the image, nothing is uploaded), ``arguments`` the table, split and meta
  URIs plus every clean setting and the seed as ``--flag value``, and
  ``restartPolicy: Never`` (the KFP task's retries are the only retries).
* ``driver`` / ``executor``: cores (request, limit twice), JVM ``memory`` and a
  ``memoryOverhead`` of half of it for the Python workers, which hold the
  pandas/Arrow batches outside the JVM; the executor count; service accounts:
  the driver runs as ``spark_service_account`` (a Role to create, watch and
  delete its executors: manifests/base/spark-role.yaml), the executors as the
  workload account (no Role, no token).
* The pod fields go in ``driver.template`` / ``executor.template`` (Spark's pod
  templates, operator 2.1+): the restricted profile of
  `kubetrain.cluster.security`, the CPU pool's placement, the S3 env (keys as
  ``secretKeyRef`` only), the scratch emptyDirs, and the container command
  `kubetrain.cli.spark_pod`, which turns Spark's ``driver``/``executor``
  arguments into a process (the image has no Spark entrypoint). Spark builds
  the pods from the templates itself, so nothing depends on the operator's
  mutating webhook, which the operator skips for pods with a template.
* S3: the kubetrain engine reads and writes through pyarrow's S3 filesystem in
  the Python driver and workers, configured from the standard AWS variables
  and ``S3_ENDPOINT_URL``, hence the env on both pod templates; no hadoop-aws
  jar has to match the image's Hadoop. ``hadoopConf`` also configures s3a
  (endpoint, path-style access, credentials from those variables) for
  Spark-native ``s3a://`` reads in an image that adds hadoop-aws.

The driver writes the splits (sharded datasets) and the stage metadata under
``<pipeline_root>/<run id>/spark-clean/``; `collect` copies them into the
step's outputs, checking each shard against the sha256 in its manifest.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetrain.cluster import follow as follower
from kubetrain.cluster import k8s, security
from kubetrain.config import flags
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import CleanConfig, RunConfig, fields_of
from kubetrain.core import progress, storage
from kubetrain.core.errors import KubetrainError, require

GROUP, VERSION, PLURAL, KIND = (
    "sparkoperator.k8s.io",
    "v1beta2",
    "sparkapplications",
    "SparkApplication",
)
API_VERSION = f"{GROUP}/{VERSION}"
#: pyspark in the CPU image (pyproject's spark extra, constraints.txt).
SPARK_VERSION = "4.3.0"
#: The images' venv (docker/Dockerfile.*) and the driver program inside it: a
#: non-editable install, so the file lives in site-packages (docker/install.sh checks).
VENV = "/opt/venv"
VENV_PYTHON = f"{VENV}/bin/python"
MAIN_FILE = f"{VENV}/lib/python3.11/site-packages/kubetrain/cli/spark_clean.py"
#: The container command of driver and executor pods (see `kubetrain.cli.spark_pod`).
POD_COMMAND = (VENV_PYTHON, "-m", "kubetrain.cli.spark_pod")
#: Container names the operator tells Spark to take from the pod templates.
DRIVER_CONTAINER = "spark-kubernetes-driver"
EXECUTOR_CONTAINER = "spark-kubernetes-executor"
#: Spark and the operator name pods and services after the application
#: (<name>-driver, <name>-ui-svc, ...); 40 leaves room within a 63-character label.
MAX_NAME = 40
NAME_PREFIX = "kubetrain-clean"
#: Folder of the driver's outputs under <pipeline_root>/<run id>/.
STAGING_DIR = "spark-clean"
META_FILE = "meta.json"
RUN_LABEL = "kubetrain.io/run-id"
#: Off-heap memory per pod for the Python workers, as a share of the JVM heap (at least
#: Spark's own floor of 384 MiB).
PYTHON_OVERHEAD = 0.5
MIN_OVERHEAD_MIB = 384
#: The line `kubetrain.cli.spark_clean` prints before it exits 2.
DRIVER_ERROR = "kubetrain | clean | error:"
#: Lines of the driver's log searched for that line when the application failed.
LOG_TAIL = 200
#: Credentials provider of hadoop-aws 3.4+ (AWS SDK v2) that reads AWS_ACCESS_KEY_ID and
#: AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN): the variables the pods get.
S3A_CREDENTIALS = "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider"
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SPARK_MEMORY = re.compile(r"^([1-9][0-9]*)([kmgt])$")
_MIB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}

#: applicationState.state values (v1beta2 ApplicationStateType); "" = not yet seen.
COMPLETED = "COMPLETED"
FAILED_STATES = ("FAILED", "SUBMISSION_FAILED")
NEW = "NEW"


# --- names and places ------------------------------------------------------------------


def application_name(run_id: str) -> str:
    """The run's SparkApplication name: a retried clean step finds the one it created."""
    return k8s.run_name(run_id, NAME_PREFIX, MAX_NAME)


@dataclass(frozen=True)
class Staging:
    """Where the driver writes: one folder per run under the pipeline root."""

    root: str

    @property
    def train(self) -> str:
        return f"{self.root}/train"

    @property
    def validation(self) -> str:
        return f"{self.root}/validation"

    @property
    def test(self) -> str:
        return f"{self.root}/test"

    @property
    def meta(self) -> str:
        return f"{self.root}/{META_FILE}"

    @property
    def splits(self) -> tuple[str, str, str]:
        return self.train, self.validation, self.test


def staging(cluster: ClusterConfig, run_id: str) -> Staging:
    """``<pipeline_root>/<run id>/spark-clean`` as s3:// (KFP's minio:// is the same store)."""
    require(
        bool(run_id) and "/" not in run_id,
        f"run id {run_id!r} cannot name a folder: the clean step on Spark needs the "
        "pipeline run's id (dsl.PIPELINE_JOB_ID_PLACEHOLDER)",
    )
    root = storage.object_uri(cluster.pipeline_root).rstrip("/")
    return Staging(f"{root}/{run_id}/{STAGING_DIR}")


# --- the document ----------------------------------------------------------------------


def spark_application(
    name: str,
    cluster: ClusterConfig,
    clean: CleanConfig,
    seed: int,
    table_uri: str,
    split_uris: tuple[str, str, str],
    meta_uri: str,
    *,
    run_id: str = "",
) -> dict[str, Any]:
    """The SparkApplication that cleans ``table_uri`` into the three split URIs (validated).

    ``split_uris`` is (train, validation, test); ``meta_uri`` receives the stage
    metadata after the splits. The same settings and seed give the same split
    as the local engine; the document alone says what was run.
    """
    require(
        len(name) <= MAX_NAME and _NAME.match(name) is not None,
        f"SparkApplication name {name!r} must be lower-case letters, digits and '-', start "
        f"with a letter and have at most {MAX_NAME} characters (Spark names pods after it)",
    )
    spec: dict[str, Any] = {
        "type": "Python",
        "pythonVersion": "3",
        "mode": "cluster",
        "sparkVersion": SPARK_VERSION,
        "image": cluster.image("cpu"),
        "mainApplicationFile": f"local://{MAIN_FILE}",
        "arguments": arguments(clean, seed, table_uri, split_uris, meta_uri),
        "sparkConf": _spark_conf(),
        "hadoopConf": _hadoop_conf(cluster),
        "restartPolicy": {"type": "Never"},
        "driver": {
            **_resources(1, cluster.spark_driver_memory),
            "serviceAccount": cluster.spark_service_account,
            "template": _pod_template(cluster, DRIVER_CONTAINER),
        },
        "executor": {
            "instances": cluster.spark_executors,
            **_resources(cluster.spark_executor_cores, cluster.spark_executor_memory),
            "serviceAccount": cluster.workload_service_account,
            "deleteOnTermination": True,
            "template": _pod_template(cluster, EXECUTOR_CONTAINER),
        },
    }
    if cluster.ttl_seconds:
        spec["timeToLiveSeconds"] = cluster.ttl_seconds
    app = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": _labels(run_id)},
        "spec": spec,
    }
    return validate(app)


def arguments(
    clean: CleanConfig,
    seed: int,
    table_uri: str,
    split_uris: tuple[str, str, str],
    meta_uri: str,
) -> list[str]:
    """The driver's command line: the URIs, then every clean setting and the seed as flags."""
    train, validation, test = (storage.object_uri(u) for u in split_uris)
    uris = [
        ("--table", storage.object_uri(table_uri)),
        ("--train", train),
        ("--validation", validation),
        ("--test", test),
        ("--meta", storage.object_uri(meta_uri)),
    ]
    return [word for pair in uris for word in pair] + setting_args(clean, seed)


def setting_args(clean: CleanConfig, seed: int) -> list[str]:
    """``--flag value`` per setting as `kubetrain.config.flags` parses them (bools as
    ``--flag``/``--no-flag``), so the driver rebuilds exactly this configuration."""
    values = RunConfig(seed=seed, clean=clean).flat("seed", "clean")
    out: list[str] = []
    for f in fields_of("seed", "clean"):
        value = values[f.name]
        if isinstance(value, bool):
            out.append(flags.flag_of(f.name) if value else "--no-" + flags.flag_of(f.name)[2:])
        else:
            out += [flags.flag_of(f.name), str(value)]
    return out


def _labels(run_id: str) -> dict[str, str]:
    """What links the application (and, copied by the operator, its pods) to the run."""
    labels = k8s.labels("clean")
    if run_id:
        ok = len(run_id) <= 63 and _LABEL_VALUE.match(run_id)
        labels[RUN_LABEL] = run_id if ok else k8s.run_name(run_id, "run", 20)
    return labels


def memory_mib(size: str) -> int:
    """A Spark memory size (512m, 2g) in MiB."""
    match = _SPARK_MEMORY.match(size)
    if match is None:
        raise KubetrainError(f"{size!r} is not a Spark memory size; use e.g. 512m or 2g")
    return max(1, int(int(match.group(1)) * _MIB[match.group(2)]))


def _resources(cores: int, memory: str) -> dict[str, Any]:
    """Cores (request, burst limit twice), JVM heap and the Python workers' overhead."""
    overhead = max(MIN_OVERHEAD_MIB, int(memory_mib(memory) * PYTHON_OVERHEAD))
    return {
        "cores": cores,
        "coreRequest": str(cores),
        "coreLimit": str(2 * cores),
        "memory": memory,
        "memoryOverhead": f"{overhead}m",
    }


def _spark_conf() -> dict[str, str]:
    """The venv's Python for the driver and the workers (Spark sets PYSPARK_PYTHON and
    PYSPARK_DRIVER_PYTHON on the driver from these; executors run what the driver names)."""
    return {"spark.pyspark.python": VENV_PYTHON, "spark.pyspark.driver.python": VENV_PYTHON}


def _hadoop_conf(cluster: ClusterConfig) -> dict[str, str]:
    """s3a settings (the operator prefixes spark.hadoop.) for Spark-native s3a:// reads.

    Credentials come from the pods' AWS variables, never from this document; an
    endpoint with user:password@ in it loses that part here.
    """
    conf = {
        "fs.s3a.aws.credentials.provider": S3A_CREDENTIALS,
        "fs.s3a.endpoint.region": cluster.s3_region,
    }
    if cluster.s3_endpoint_url:
        url = urlsplit(cluster.s3_endpoint_url)
        host = url.netloc.rpartition("@")[2]
        conf["fs.s3a.endpoint"] = f"{url.scheme}://{host}{url.path.rstrip('/')}"
        conf["fs.s3a.path.style.access"] = "true"
        conf["fs.s3a.connection.ssl.enabled"] = "true" if url.scheme == "https" else "false"
    return conf


def _pod_template(cluster: ClusterConfig, container: str) -> dict[str, Any]:
    """A driver or executor pod template: restricted, on the CPU pool, S3 env by reference.

    `security.harden_pod_spec` writes it. The driver keeps its service
    account's token (it creates its executors through the API); executors run
    as the workload account without one.
    """
    env = cluster.s3_env() + [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if container == EXECUTOR_CONTAINER:
        env.append({"name": "PYSPARK_PYTHON", "value": VENV_PYTHON})
    driver = container == DRIVER_CONTAINER
    pod = security.harden_pod_spec(
        {
            **cluster.cpu_scheduling(),
            "containers": [{"name": container, "command": list(POD_COMMAND), "env": env}],
        },
        cluster.spark_service_account if driver else cluster.workload_service_account,
    )
    if driver:
        del pod["automountServiceAccountToken"]
    return {"spec": pod}


# --- the schema check ---------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Fields of SparkApplicationSpec, SparkPodSpec, DriverSpec, ExecutorSpec and
#: RestartPolicy in the operator's v1beta2 API (api/v1beta2/sparkapplication_types.go).
SPEC_FIELDS = _words(
    """suspend type sparkVersion mode proxyUser image imagePullPolicy imagePullSecrets
    mainClass mainApplicationFile arguments sparkConf hadoopConf sparkConfigMap
    hadoopConfigMap volumes driver executor deps restartPolicy nodeSelector failureRetries
    retryInterval pythonVersion memoryOverheadFactor monitoring batchScheduler
    timeToLiveSeconds batchSchedulerOptions sparkUIOptions driverIngressOptions
    dynamicAllocation"""
)
POD_FIELDS = _words(
    """template cores coreLimit memory memoryLimit memoryOverhead gpu image configMaps
    secrets env envVars envFrom envSecretKeyRefs labels annotations volumeMounts affinity
    tolerations podSecurityContext securityContext schedulerName sidecars initContainers
    hostNetwork nodeSelector dnsConfig terminationGracePeriodSeconds serviceAccount
    hostAliases shareProcessNamespace"""
)
DRIVER_FIELDS = POD_FIELDS | _words(
    """podName coreRequest javaOptions lifecycle kubernetesMaster serviceAnnotations
    serviceLabels ports priorityClassName"""
)
EXECUTOR_FIELDS = POD_FIELDS | _words(
    "instances coreRequest javaOptions lifecycle deleteOnTermination ports priorityClassName"
)
RESTART_FIELDS = _words(
    "type onSubmissionFailureRetries onFailureRetries onSubmissionFailureRetryInterval "
    "onFailureRetryInterval"
)
_ENUMS = {
    "type": ("Java", "Python", "Scala", "R"),
    "mode": ("cluster", "client"),
    "pythonVersion": ("2", "3"),
}
_REQUIRED = ("type", "sparkVersion", "mainApplicationFile", "driver", "executor")
_STRINGS = ("sparkVersion", "image", "mainApplicationFile")
_POD_STRINGS = ("coreRequest", "coreLimit", "memory", "memoryOverhead", "serviceAccount")


def validate(app: dict[str, Any]) -> dict[str, Any]:
    """``app`` unchanged if every field is one the v1beta2 API defines, with its type.

    The CRD's structural schema makes the API server drop unknown fields
    silently, so a misspelt field would be a setting that never applies: it
    fails here instead, with its path.
    """
    problems: list[str] = []
    if app.get("apiVersion") != API_VERSION or app.get("kind") != KIND:
        problems.append(f"apiVersion/kind {app.get('apiVersion')}/{app.get('kind')}")
    meta = app.get("metadata") or {}
    if not _NAME.match(str(meta.get("name", ""))) or len(str(meta.get("name", ""))) > MAX_NAME:
        problems.append(f"metadata.name {meta.get('name')!r}")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
            problems.append(f"metadata.labels.{key} {value!r}")
    spec = app.get("spec") or {}
    problems += _unknown(spec, SPEC_FIELDS, "spec")
    problems += [f"spec.{k} missing" for k in _REQUIRED if k not in spec]
    for key, allowed in _ENUMS.items():
        if key in spec and spec[key] not in allowed:
            problems.append(f"spec.{key} {spec[key]!r} (one of {', '.join(allowed)})")
    problems += [
        f"spec.{k} not a string" for k in _STRINGS if k in spec and not isinstance(spec[k], str)
    ]
    if not _is_strings(spec.get("arguments", []), list):
        problems.append("spec.arguments not a list of strings")
    for key in ("sparkConf", "hadoopConf"):
        if not _is_strings(spec.get(key, {}), dict):
            problems.append(f"spec.{key} not a map of strings")
    restart = spec.get("restartPolicy") or {}
    problems += _unknown(restart, RESTART_FIELDS, "spec.restartPolicy")
    if restart.get("type", "Never") not in ("Never", "Always", "OnFailure"):
        problems.append(f"spec.restartPolicy.type {restart.get('type')!r}")
    ttl = spec.get("timeToLiveSeconds", 0)
    if not _is_int(ttl, 0):
        problems.append(f"spec.timeToLiveSeconds {ttl!r}")
    problems += _check_pod(spec.get("driver"), DRIVER_FIELDS, "driver", DRIVER_CONTAINER)
    problems += _check_pod(spec.get("executor"), EXECUTOR_FIELDS, "executor", EXECUTOR_CONTAINER)
    if problems:
        raise KubetrainError(
            f"the SparkApplication does not match the Spark Operator's v1beta2 API: "
            f"{'; '.join(problems)}"
        )
    return app


def _check_pod(pod: Any, allowed: frozenset[str], where: str, container: str) -> list[str]:
    if not isinstance(pod, dict):
        return [f"spec.{where} missing"]
    problems = _unknown(pod, allowed, f"spec.{where}")
    for key in ("cores", "instances"):
        if key in pod and not _is_int(pod[key], 1):
            problems.append(f"spec.{where}.{key} {pod[key]!r} (a whole number >= 1)")
    problems += [
        f"spec.{where}.{k} not a string"
        for k in _POD_STRINGS
        if k in pod and not isinstance(pod[k], str)
    ]
    template = pod.get("template")
    if template is not None:
        names = [c.get("name") for c in ((template.get("spec") or {}).get("containers") or [])]
        if set(template) - {"metadata", "spec"} or container not in names:
            problems.append(f"spec.{where}.template needs spec.containers[{container}]")
    return problems


def _unknown(obj: Any, allowed: frozenset[str], where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where} not an object"]
    return [f"{where}.{key} unknown" for key in sorted(set(obj) - allowed)]


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_strings(value: Any, kind: type) -> bool:
    if kind is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# --- status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a SparkApplication stands, from its status alone."""

    name: str
    namespace: str
    state: str  # applicationState.state, NEW before the operator has seen it
    message: str = ""
    driver_pod: str = ""
    executors: dict[str, int] = field(default_factory=dict)  # executor state -> count

    @property
    def running(self) -> int:
        return self.executors.get("RUNNING", 0)

    @property
    def pod(self) -> str:
        """The driver pod: as reported, else the operator's <name>-driver."""
        return self.driver_pod or f"{self.name}-driver"

    def line(self) -> str:
        counts = [f"{self.running} running"] + [
            f"{n} {state.lower()}"
            for state, n in sorted(self.executors.items())
            if state != "RUNNING" and n
        ]
        return (
            f"SparkApplication {self.name}: {self.state} | driver "
            f"{self.driver_pod or '-'} | executors {', '.join(counts)}"
        )


def progress_of(app: Mapping[str, Any] | None) -> Progress:
    """State, error message, driver pod and executor counts of a SparkApplication document."""
    meta = (app or {}).get("metadata") or {}
    status = (app or {}).get("status") or {}
    application = status.get("applicationState") or {}
    state = application.get("state") or NEW
    counts: dict[str, int] = {}
    for value in (status.get("executorState") or {}).values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return Progress(
        name=meta.get("name", "?"),
        namespace=meta.get("namespace", "default"),
        state=str(state),
        message=" ".join(str(application.get("errorMessage") or "").split()),
        driver_pod=(status.get("driverInfo") or {}).get("podName", ""),
        executors=counts,
    )


PodLog = Callable[[str, str], str]  # (namespace, pod) -> the tail of its log


def follow(
    get: Callable[[], dict[str, Any]],
    timeout_s: float,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
    error: follower.Error | None = None,
    initial: dict[str, Any] | None = None,
    pod_log: PodLog | None = None,
) -> dict[str, Any]:
    """Poll ``get()`` until the application COMPLETED (returns it) or failed (raises).

    Each change (state, driver pod, executor counts) is logged once with the
    time since following began. FAILED or SUBMISSION_FAILED raises one line with
    the operator's error message and, when `pod_log` can read it, the driver's
    own ``kubetrain | clean | error:`` line; past ``timeout_s`` it raises with a
    kubectl hint. Transient API errors of ``get`` are retried under
    `kubetrain.cluster.follow`'s one policy.
    """
    first = progress_of(initial)
    log = log or (lambda message: progress.log("clean", message))
    started = now()

    def outcome(app: dict[str, Any]) -> dict[str, Any] | None:
        state = progress_of(app)
        if state.state == COMPLETED:
            return app
        if state.state in FAILED_STATES:
            raise KubetrainError(_failure(state, pod_log))
        return None

    return follower.poll(
        get,
        outcome,
        lambda app: progress_of(app).line(),
        lambda app, timeout: _timed_out(progress_of(app), timeout),
        state=initial or {},
        pace=follower.Pace(timeout_s, poll_s, sleep, now),
        log=lambda line: log(f"{line} ({now() - started:.0f} s)"),
        error=error,
        what=f"SparkApplication {first.namespace}/{first.name}",
    )


def _failure(state: Progress, pod_log: PodLog | None) -> str:
    said = driver_error(pod_log, state.namespace, state.pod) if pod_log else ""
    text = (
        f"SparkApplication {state.namespace}/{state.name} {state.state}: "
        f"{state.message or 'no error message from the Spark Operator'}"
    )
    if said:
        text += f"; the driver says: {said}"
    return (
        f"{text}; see the driver's log with kubectl -n {state.namespace} logs {state.pod} --tail 50"
    )


def driver_error(pod_log: PodLog, namespace: str, pod: str) -> str:
    """The driver's last ``kubetrain | clean | error:`` message, or "" (best effort: a
    failure to read the log must not hide why the application failed)."""
    try:
        text = pod_log(namespace, pod)
    except Exception:  # noqa: BLE001 - see above
        return ""
    lines = [line for line in str(text).splitlines() if DRIVER_ERROR in line]
    if not lines:
        return ""
    message = " ".join(lines[-1].split(DRIVER_ERROR, 1)[1].split())
    return storage.redact(message)[:400]


def _timed_out(state: Progress, timeout_s: float) -> str:
    text = (
        f"SparkApplication {state.namespace}/{state.name} did not finish within "
        f"{timeout_s:g} s (last state: {state.line()}); inspect it with kubectl -n "
        f"{state.namespace} describe sparkapplication {state.name}, or raise --wait-timeout"
    )
    if state.state == NEW:
        text += (
            "; it was never picked up: check that the Kubeflow Spark Operator runs and "
            f"watches namespace {state.namespace} (Helm value spark.jobNamespaces)"
        )
    return text


# --- the Kubernetes API ------------------------------------------------------------------


def _api_error(exc: Any, verb: str, namespace: str, name: str) -> KubetrainError:
    return k8s.custom_object_error(
        exc,
        verb,
        "SparkApplication",
        "sparkapplications.sparkoperator.k8s.io",
        namespace,
        name,
        not_installed=(
            "the Kubeflow Spark Operator is not installed (no sparkapplications."
            "sparkoperator.k8s.io CRD); install its Helm chart (README: the Spark engine "
            "on a cluster) or clean with --engine local"
        ),
    )


def read_driver_log(namespace: str, pod: str) -> str:
    """The last `LOG_TAIL` lines of the driver pod's log (the step's ServiceAccount may
    read pods/log: manifests/base/role.yaml)."""
    from kubernetes import client

    return client.CoreV1Api().read_namespaced_pod_log(pod, namespace, tail_lines=LOG_TAIL)


def run(
    app: dict[str, Any],
    api: Any = None,
    timeout_s: float = 86400,
    keep: bool = False,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
    pod_log: PodLog | None = None,
) -> dict[str, Any]:
    """Create ``app`` (or re-attach to this run's), follow it to the end, delete it unless ``keep``.

    Returns the completed application. Transient API errors (5xx, 429, no
    answer) are retried with capped backoff until ``timeout_s``; a deleted
    application, RBAC or webhook refusals fail at once; SIGTERM (a cancelled
    run) deletes it too (`kubetrain.cluster.follow`).
    """
    validate(app)
    namespace = app["metadata"].get("namespace") or "default"
    name = app["metadata"]["name"]
    app = {**app, "metadata": {**app["metadata"], "namespace": namespace}}
    log = log or (lambda message: progress.log("clean", message))
    api = api or k8s.custom_objects_api()
    ref = follower.Ref.of(GROUP, VERSION, PLURAL, "SparkApplication", namespace, name)
    pace = follower.Pace(timeout_s, poll_s, sleep, now)

    def error(exc: BaseException, verb: str) -> KubetrainError:
        return _api_error(exc, verb, namespace, name)

    with follower.owned(api, ref, app, error=error, pace=pace, keep=keep, log=log) as created:
        if created:
            executor = app["spec"]["executor"]
            log(
                f"created SparkApplication {namespace}/{name}: {executor['instances']} "
                f"executor(s) x {executor['cores']} core(s), image {app['spec']['image']}"
            )
        return follow(
            lambda: follower.get(api, ref),
            timeout_s,
            poll_s,
            sleep,
            now,
            log,
            error=error,
            initial=app,
            pod_log=pod_log or read_driver_log,
        )


# --- the whole step ----------------------------------------------------------------------


def copy_split(uri: str, dest: str | Path) -> dict[str, Any]:
    """Copy the sharded dataset at ``uri`` to the local folder ``dest``; returns its manifest.

    Every shard is checked against the sha256 and size in the manifest (objects
    written by pyarrow carry no checksum of their own); ``dest`` appears whole
    or not at all.
    """
    from kubetrain.core import integrity
    from kubetrain.data import shards
    from kubetrain.data.datasets import atomic_dir

    base = str(uri).rstrip("/")
    require(
        shards.is_sharded(base),
        f"the SparkApplication finished but {storage.redact(base)} holds no complete "
        f"dataset (no {shards.MANIFEST}); see the driver's log",
    )
    with atomic_dir(dest) as tmp:
        storage.download(f"{base}/{shards.MANIFEST}", tmp / shards.MANIFEST)
        manifest = shards.read_manifest(tmp)
        for shard in manifest["shards"]:
            local = storage.download(f"{base}/{shard['name']}", tmp / shard["name"])
            digest, size = integrity.sha256_file(local), local.stat().st_size
            if digest != shard["sha256"] or size != int(shard["bytes"]):
                raise KubetrainError(
                    f"{storage.redact(base)}/{shard['name']} does not match its manifest "
                    f"(sha256 {digest[:16]}..., {size} bytes; the manifest says "
                    f"{str(shard['sha256'])[:16]}..., {shard['bytes']} bytes): the Spark "
                    "job's output is damaged; re-run the clean step"
                )
    return manifest


def collect(
    place: Staging, train_path: str, val_path: str, test_path: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """The driver's outputs into the step's artifacts; returns the stage metadata."""
    require(
        storage.exists(place.meta),
        f"the SparkApplication finished but wrote no {storage.redact(place.meta)}; see the "
        "driver's log",
    )
    for name, uri, path in zip(
        ("train", "validation", "test"),
        place.splits,
        (train_path, val_path, test_path),
        strict=True,
    ):
        manifest = copy_split(uri, path)
        log(f"copied {name}: {manifest['rows']} rows in {len(manifest['shards'])} shard(s)")
    return json.loads(storage.read_bytes(place.meta))


def clean_on_cluster(
    cluster: ClusterConfig,
    run_id: str,
    clean: CleanConfig,
    seed: int,
    table_uri: str,
    train_path: str,
    val_path: str,
    test_path: str,
    *,
    api: Any = None,
    **follow_options: Any,
) -> dict[str, Any]:
    """The clean step as a SparkApplication: build, submit, follow, collect.

    Same outputs as cleaning here. The wait and what happens to the finished
    application come from ``cluster`` (wait_timeout, finished_jobs) unless
    ``follow_options`` say otherwise (timeout_s, keep, poll_s, sleep, now, log,
    pod_log: see `run`).
    """
    require(
        bool(table_uri),
        "the clean step on Spark needs the table artifact's URI (CleanRequest.table_uri): "
        "the Spark driver reads the table from object storage",
    )
    place = staging(cluster, run_id)
    app = spark_application(
        application_name(run_id),
        cluster,
        clean,
        seed,
        table_uri,
        place.splits,
        place.meta,
        run_id=run_id,
    )
    options = {
        "timeout_s": cluster.wait_timeout,
        "keep": cluster.finished_jobs == "keep",
        **follow_options,
    }
    run(app, api=api, **options)
    log = options.get("log") or (lambda message: progress.log("clean", message))
    return collect(place, train_path, val_path, test_path, log)
