"""Multi-node / multi-GPU training as a Kubeflow Trainer v2 ``TrainJob``.

When the train step needs more than one process (``num_nodes > 1`` or more
than one GPU per node), the train component does not train itself: it submits
a ``trainer.kubeflow.org/v1alpha1`` TrainJob against the ``torch-distributed``
ClusterTrainingRuntime (`ClusterConfig.trainer_runtime`), follows it, and
collects what its rank 0 wrote. The TrainJob, as the Trainer API defines it:

* ``spec.runtimeRef``: the runtime (kind ClusterTrainingRuntime, apiGroup
  trainer.kubeflow.org);
* ``spec.trainer``: the project image, the command (``torchrun -m
  kubetrain.cli.train_entry ...``), ``numNodes``, ``numProcPerNode`` (GPUs per
  node) and ``resourcesPerNode`` (GPUs, CPU, memory), plus S3 settings as
  ``env`` with the credentials as ``secretKeyRef`` (never a value). The
  torch plugin adds ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
  ``PET_MASTER_ADDR`` (``<name>-node-0-0.<name>``) and ``PET_MASTER_PORT``
  (29500), which torchrun reads; the webhook rejects a TrainJob that sets them.
  The cache/``TMPDIR`` variables of the restricted profile are here too (a
  patch may not set env on the ``node`` container).
* ``spec.runtimePatches``: the pod fields. Trainer 2.x has no per-job pod spec;
  a runtime patch (keyed by its ``manager``) patches the runtime's JobSet
  template: replicated job ``node`` (the runtime's trainer job) gets the GPU
  pool's ``nodeSelector`` and ``tolerations`` and the restricted profile of
  `kubetrain.cluster.security` (pod and ``node`` container securityContext,
  ``/tmp`` and cache emptyDirs, the workload service account).
  ``automountServiceAccountToken`` is not a field a patch may set (Trainer's
  ``PodSpecPatch``): the workload service account's own
  ``automountServiceAccountToken: false`` (manifests/base) keeps the token out.

Every document is validated against the Trainer API models of the
``kubeflow-trainer-api`` package before it is sent.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetrain.cluster import follow as follower
from kubetrain.cluster import k8s, security
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import SEED, FinalConfig, HyperConfig, TrainConfig
from kubetrain.core import progress, storage
from kubetrain.core.errors import KubetrainError, require
from kubetrain.training import distributed

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
#: Replicated job (and container) of the torch runtimes that runs the trainer nodes.
TRAINER_JOB = "node"
#: Owner of our runtime patch (``runtimePatches`` is a map keyed by manager).
PATCH_MANAGER = "kubetrain.io/pod-spec"
#: Pod label JobSet puts on every pod of the TrainJob's JobSet (named like the TrainJob).
POD_SELECTOR = "jobset.sigs.k8s.io/jobset-name"
#: Pod hostnames are <name>-node-<i>-0 and must fit a 63-character DNS label.
MAX_NAME = 48
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --- the document -----------------------------------------------------------------


def default_name(prefix: str = "kubetrain-train") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def trainjob(
    train: TrainConfig,
    hyper: HyperConfig,
    final: FinalConfig,
    seed: int,
    cluster: ClusterConfig,
    train_uri: str,
    val_uri: str,
    output_uri: str,
    num_nodes: int,
    name: str | None = None,
    nproc_per_node: int | None = None,
) -> dict[str, Any]:
    """The TrainJob that trains the final model data-parallel on ``num_nodes`` nodes (validated).

    ``hyper`` is final: tuned values already applied. Every rank gets the four
    sections as one flat ``--settings`` object, so the document alone says what
    was trained. Processes per node: ``nproc_per_node``, else one per GPU
    (``cluster.gpus``), else 1 on CPU-only pools. Rank 0 writes the train
    stage's outputs under ``output_uri`` (see `kubetrain.cli.train_entry`);
    `collect` fetches them.
    """
    name = name or default_name()
    require(
        isinstance(num_nodes, int) and not isinstance(num_nodes, bool) and num_nodes >= 1,
        f"num_nodes={num_nodes!r}: a TrainJob needs at least 1 node",
    )
    require(
        len(name) <= MAX_NAME and _NAME.match(name) is not None,
        f"TrainJob name {name!r} must be lower-case letters, digits and '-', start with "
        f"a letter and have at most {MAX_NAME} characters (pod hostnames add -node-N-0)",
    )
    gpus = cluster.gpus
    nproc = nproc_per_node if nproc_per_node is not None else max(gpus, 1)
    require(isinstance(nproc, int) and nproc >= 1, f"nproc_per_node={nproc!r} must be >= 1")
    require(
        gpus == 0 or nproc <= gpus,
        f"{nproc} processes per node but {gpus} GPU(s) per node: NCCL needs one GPU per "
        "process; raise gpus or lower nproc_per_node",
    )
    settings = {**train.to_dict(), **hyper.to_dict(), **final.to_dict(), SEED: seed}
    args = [
        "--train",
        storage.object_uri(train_uri),
        "--validation",
        storage.object_uri(val_uri),
        "--output",
        storage.object_uri(output_uri),
        "--settings",
        json.dumps(settings, sort_keys=True),
    ]
    quantities = {"cpu": cluster.gpu_cpu, "memory": cluster.gpu_memory}
    if gpus:
        quantities[cluster.gpu_resource] = str(gpus)
    trainer = {
        "image": cluster.image("cuda" if gpus else "cpu"),
        "command": ["torchrun", "-m", distributed.ENTRY_MODULE],
        "args": args,
        "numNodes": num_nodes,
        "numProcPerNode": nproc,
        "resourcesPerNode": {"limits": dict(quantities), "requests": dict(quantities)},
        "env": _env(cluster),
    }
    job: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": cluster.namespace,
            "labels": k8s.labels("train"),
        },
        "spec": {
            "runtimeRef": {
                "name": cluster.trainer_runtime,
                "kind": "ClusterTrainingRuntime",
                "apiGroup": GROUP,
            },
            "trainer": trainer,
            # The pods stop by themselves once nobody would wait for them any more.
            "activeDeadlineSeconds": cluster.wait_timeout,
        },
    }
    job["spec"]["runtimePatches"] = [_pod_patch(cluster)]
    return validate(job)


def _env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The trainer's env: S3 (keys by Secret reference only), unbuffered output, and the
    restricted profile's cache/TMPDIR variables (a patch may not set env on ``node``)."""
    env = cluster.s3_env() + [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    names = {e["name"] for e in env}
    return env + [e for e in security.scratch_env() if e["name"] not in names]


def _scheduling(cluster: ClusterConfig) -> dict[str, Any]:
    """Pod fields that put the trainer pods on the GPU pool (or the CPU pool)."""
    if cluster.gpus:
        return cluster.gpu_scheduling()
    if cluster.cpu_node_selector:
        key, value = cluster.cpu_node_selector.split("=", 1)
        return {"nodeSelector": {key: value}}
    return {}


def _pod_patch(cluster: ClusterConfig) -> dict[str, Any]:
    """The runtime patch of the trainer pods: placement and the restricted profile.

    `security.harden_pod_spec` writes the pod; what Trainer's ``PodSpecPatch``
    cannot carry moves or goes: the ``node`` container's env is in
    ``spec.trainer.env`` (`_env`), and ``automountServiceAccountToken`` (no such
    patch field) is the workload service account's own ``false``.
    """
    pod = security.harden_pod_spec(
        {**_scheduling(cluster), "containers": [{"name": TRAINER_JOB}]},
        cluster.workload_service_account,
    )
    del pod["automountServiceAccountToken"]
    for container in pod["containers"]:
        del container["env"]
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {"name": TRAINER_JOB, "template": {"spec": {"template": {"spec": pod}}}}
                    ]
                }
            }
        },
    }


def validate(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` unchanged if it is a TrainJob the Trainer API models accept field for field.

    The models ignore unknown keys, so the document must also survive a
    round trip unchanged: a misspelt or misplaced field fails here.
    """
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    try:
        model = TrainerV1alpha1TrainJob.from_dict(job)
    except (ValidationError, ValueError, TypeError) as exc:
        raise KubetrainError(f"the TrainJob does not match the Trainer API: {exc}") from None
    back = model.to_dict() if model is not None else None
    if back != job:
        raise KubetrainError(
            "the TrainJob has fields the Trainer API does not define: "
            f"{'; '.join(_differences(job, back))}"
        )
    require(
        job.get("apiVersion") == API_VERSION and job.get("kind") == KIND,
        f"not a TrainJob: apiVersion {job.get('apiVersion')!r}, kind {job.get('kind')!r}",
    )
    return job


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            where = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append(f"{where} (unknown)")
            elif key not in a:
                out.append(f"{where} (added)")
            else:
                out += _differences(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path} ({a!r} became {b!r})"]


# --- status -------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a TrainJob stands, from its status alone."""

    phase: str  # Pending, Created, Running, Suspended, Complete, Failed
    reason: str = ""
    message: str = ""
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.phase in ("Complete", "Failed")

    def line(self) -> str:
        text = self.phase
        if self.detail:
            text += f" ({self.detail})"
        if self.reason and self.phase in ("Failed", "Suspended", "Complete"):
            text += f": {self.reason}"
        return text


def progress_of(job: dict[str, Any] | None) -> Progress:
    """The phase of ``job`` from ``status.conditions`` (Complete, Failed, Suspended,
    and Created on older Trainer releases) and ``status.jobsStatus``."""
    status = (job or {}).get("status") or {}
    conditions = {c.get("type"): c for c in follower.true_conditions(job)}
    jobs = status.get("jobsStatus") or []
    detail = ", ".join(
        f"{j.get('name')}: "
        + " ".join(
            f"{j.get(k, 0)} {k}" for k in ("active", "ready", "succeeded", "failed") if j.get(k)
        )
        for j in jobs
        if any(j.get(k) for k in ("active", "ready", "succeeded", "failed"))
    )
    trainer = status.get("trainerStatus") or {}
    if trainer.get("progressPercentage") is not None:
        detail = ", ".join(filter(None, [detail, f"{trainer['progressPercentage']}%"]))
    for phase in ("Failed", "Complete", "Suspended"):
        if phase in conditions:
            c = conditions[phase]
            return Progress(phase, c.get("reason", ""), c.get("message", ""), detail)
    if any(j.get("active") for j in jobs):
        return Progress("Running", detail=detail)
    if "Created" in conditions or jobs:
        return Progress("Created", detail=detail)
    return Progress("Pending", detail=detail)


def follow(
    get: Callable[[], dict[str, Any]],
    timeout_s: float,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
    error: follower.Error | None = None,
    initial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Poll ``get()`` until the TrainJob completes (returns it) or fails (raises).

    Each change of phase is logged once. A Failed condition raises with its
    reason and message; running past ``timeout_s`` raises with a kubectl hint.
    Transient API errors of ``get`` are retried under `kubetrain.cluster.follow`'s
    one policy; ``initial`` (the job sent) stands in until a read succeeds.
    """
    initial = initial or {}
    name, namespace = _where(initial)
    return follower.poll(
        get,
        _outcome,
        _describe,
        _timed_out,
        state=initial,
        pace=follower.Pace(timeout_s, poll_s, sleep, now),
        log=log or (lambda message: progress.log("train", message)),
        error=error,
        what=f"TrainJob {namespace}/{name}",
    )


def _where(job: dict[str, Any]) -> tuple[str, str]:
    meta = job.get("metadata") or {}
    return meta.get("name", "?"), meta.get("namespace", "default")


def _describe(job: dict[str, Any]) -> str:
    return f"TrainJob {_where(job)[0]}: {progress_of(job).line()}"


def _timed_out(job: dict[str, Any], timeout_s: float) -> str:
    name, namespace = _where(job)
    return (
        f"TrainJob {namespace}/{name} did not finish within {timeout_s:g} s (last state: "
        f"{progress_of(job).line()}); inspect it with kubectl -n {namespace} describe "
        f"trainjob {name}, or raise --wait-timeout"
    )


def _outcome(job: dict[str, Any]) -> dict[str, Any] | None:
    """The job once Complete, None while it runs; raises once it Failed."""
    state = progress_of(job)
    if state.phase == "Complete":
        return job
    if state.phase == "Failed":
        name, namespace = _where(job)
        raise KubetrainError(
            f"TrainJob {namespace}/{name} failed: {follower.why(state.reason, state.message)}; "
            f"see the ranks' logs with "
            f"kubectl -n {namespace} logs -l {POD_SELECTOR}={name} --prefix --tail 50"
        )
    return None


# --- the Kubernetes API ---------------------------------------------------------------


def _api_error(exc: Any, verb: str, namespace: str, name: str) -> KubetrainError:
    return k8s.custom_object_error(
        exc,
        verb,
        "TrainJob",
        "trainjobs.trainer.kubeflow.org",
        namespace,
        name,
        not_installed=(
            "Kubeflow Trainer v2 is not installed (no trainjobs.trainer.kubeflow.org CRD); "
            "install it (https://www.kubeflow.org/docs/components/trainer/) or train with "
            "num_nodes=1 and one GPU"
        ),
    )


def run(
    job: dict[str, Any],
    namespace: str | None = None,
    api: Any = None,
    timeout_s: float = 86400,
    keep: bool = False,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Create ``job`` (or re-attach to this run's), follow it to the end, delete it unless ``keep``.

    Returns the completed job. Transient API errors (5xx, 429, no answer) are
    retried with capped backoff until ``timeout_s``; a deleted job, RBAC or
    webhook refusals fail at once (`kubetrain.cluster.follow`).
    """
    validate(job)
    namespace = namespace or job["metadata"].get("namespace") or "default"
    name = job["metadata"]["name"]
    job = {**job, "metadata": {**job["metadata"], "namespace": namespace}}
    log = log or (lambda message: progress.log("train", message))
    api = api or k8s.custom_objects_api()
    ref = follower.Ref.of(GROUP, VERSION, PLURAL, "TrainJob", namespace, name)
    pace = follower.Pace(timeout_s, poll_s, sleep, now)

    def error(exc: BaseException, verb: str) -> KubetrainError:
        return _api_error(exc, verb, namespace, name)

    # a cancelled run (SIGTERM) still deletes its GPU pods
    with follower.owned(api, ref, job, error=error, pace=pace, keep=keep, log=log) as created:
        if created:
            log(
                f"created TrainJob {namespace}/{name}: {job['spec']['trainer']['numNodes']} "
                f"node(s) x {job['spec']['trainer']['numProcPerNode']} process(es), runtime "
                f"{job['spec']['runtimeRef']['name']}"
            )
        return follow(
            lambda: follower.get(api, ref),
            timeout_s,
            poll_s,
            sleep,
            now,
            log,
            error=error,
            initial=job,
        )


# --- the whole step -----------------------------------------------------------------


def collect(
    output_uri: str, model_path: str, metrics_path: str, report_path: str
) -> dict[str, Any]:
    """Fetch what the TrainJob's rank 0 wrote to ``output_uri``; returns its meta."""
    base = storage.object_uri(output_uri).rstrip("/")
    require(
        storage.exists(f"{base}/{distributed.OUTPUT_META}"),
        f"the TrainJob finished but wrote no {base}/{distributed.OUTPUT_META}; see its logs",
    )
    storage.download(f"{base}/{distributed.OUTPUT_MODEL}/", model_path)
    storage.download(f"{base}/{distributed.OUTPUT_METRICS}", metrics_path)
    storage.download(f"{base}/{distributed.OUTPUT_REPORT}", report_path)
    return json.loads(storage.read_bytes(f"{base}/{distributed.OUTPUT_META}"))


def train_on_cluster(
    train: TrainConfig,
    hyper: HyperConfig,
    final: FinalConfig,
    seed: int,
    cluster: ClusterConfig,
    train_uri: str,
    val_uri: str,
    output_uri: str,
    model_path: str,
    metrics_path: str,
    report_path: str,
    *,
    name: str | None = None,
    api: Any = None,
    nproc_per_node: int | None = None,
    **follow_options: Any,
) -> dict[str, Any]:
    """The train step as a TrainJob: build, submit, follow, collect; same outputs as training here.

    ``hyper`` already holds the tuned values (`stages.train_stage` applies them
    once, for every backend). Nodes come from ``cluster.num_nodes``; the wait and what
    happens to the finished job from ``cluster`` (wait_timeout, finished_jobs)
    unless ``follow_options`` say otherwise (timeout_s, keep, poll_s, sleep,
    now, log: see `run`).
    """
    job = trainjob(
        train,
        hyper,
        final,
        seed,
        cluster,
        train_uri,
        val_uri,
        output_uri,
        cluster.num_nodes,
        name=name,
        nproc_per_node=nproc_per_node,
    )
    run(
        job,
        api=api,
        **{
            "timeout_s": cluster.wait_timeout,
            "keep": cluster.finished_jobs == "keep",
            **follow_options,
        },
    )
    return collect(output_uri, model_path, metrics_path, report_path)
