"""The Kubeflow Trainer v2 TrainJob of multi-node training (`kubetrain.cluster.trainjob`).

The generated documents are checked against the Trainer API's own models
(`kubeflow-trainer-api`); following and error handling run against status
documents and a fake Kubernetes API (through `kubetrain.cluster.follow`: 409
re-attach, transient errors, the timeout); one test runs the TrainJob's command the
way the Trainer's torch plugin starts it (torchrun reading ``PET_*``) against a
real S3 server, so the command line, the S3 wiring and `collect` are real."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1PodSpecPatch, TrainerV1alpha1TrainJob

from fakes import Clock, api_exception, backoff_sleeps, transient_errors
from kubetrain.cli import train_entry
from kubetrain.cluster import security
from kubetrain.cluster import trainjob as tj
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import RunConfig
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError

GPU_CLUSTER = ClusterConfig(
    gpus=4,
    gpu_resource="nvidia.com/gpu",
    gpu_node_selector="kubetrain.io/node-pool=gpu",
    gpu_toleration="nvidia.com/gpu=present:NoSchedule",
    gpu_cpu="8",
    gpu_memory="32Gi",
    s3_secret="team-s3",
    s3_endpoint_url="http://minio.kubeflow:9000",
    s3_region="eu-west-1",
    namespace="ml-team",
    trainer_runtime="torch-distributed-gpu",
    wait_timeout=7200,
)
CFG = RunConfig.from_flat({"epochs": 7, "width": 64})
TUNED = {"learning_rate": 0.01}
URIS = ("s3://bucket/run/train", "minio://bucket/run/validation", "s3://bucket/run/out")
RESERVED = {
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
}


def _job(cluster: ClusterConfig = GPU_CLUSTER, num_nodes: int = 3, **kwargs) -> dict:
    return tj.trainjob(
        CFG.train,
        CFG.hyper.replace(TUNED),
        CFG.final,
        CFG.seed,
        cluster,
        *URIS,
        num_nodes,
        name=kwargs.pop("name", "train-abc"),
        **kwargs,
    )


def _pod_patch(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"  # the torch runtimes' trainer replicated job
    return rj["template"]["spec"]["template"]["spec"]


# --- the document ---------------------------------------------------------------------


def test_trainjob_validates_against_the_trainer_api_and_round_trips():
    job = _job()
    model = TrainerV1alpha1TrainJob.from_dict(job)
    assert model.to_dict() == job  # nothing unknown, nothing dropped
    assert model.api_version == "trainer.kubeflow.org/v1alpha1" and model.kind == "TrainJob"
    assert model.metadata.name == "train-abc" and model.metadata.namespace == "ml-team"
    ref = model.spec.runtime_ref
    assert (ref.name, ref.kind, ref.api_group) == (
        "torch-distributed-gpu",
        "ClusterTrainingRuntime",
        "trainer.kubeflow.org",
    )
    trainer = model.spec.trainer
    assert trainer.num_nodes == 3 and trainer.num_proc_per_node == 4  # one process per GPU
    assert trainer.image == GPU_CLUSTER.image("cuda")
    for side in (trainer.resources_per_node.limits, trainer.resources_per_node.requests):
        assert {k: v.actual_instance for k, v in side.items()} == {
            "nvidia.com/gpu": "4",
            "cpu": "8",
            "memory": "32Gi",
        }
    assert model.spec.active_deadline_seconds == GPU_CLUSTER.wait_timeout


def test_scheduling_goes_through_a_runtime_patch_of_the_trainer_nodes():
    job = _job()
    model = TrainerV1alpha1TrainJob.from_dict(job)
    (patch,) = model.spec.runtime_patches
    assert patch.manager == tj.PATCH_MANAGER and patch.time is None  # the webhook stamps time
    pod = patch.training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec
    assert pod.node_selector == {"kubetrain.io/node-pool": "gpu"}
    (tol,) = pod.tolerations
    assert (tol.key, tol.operator, tol.value, tol.effect) == (
        "nvidia.com/gpu",
        "Equal",
        "present",
        "NoSchedule",
    )
    # a value-less taint is tolerated with Exists
    exists = _pod_patch(_job(ClusterConfig(gpu_toleration="nvidia.com/gpu:NoExecute")))
    assert exists["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}
    ]
    # nothing to place: the patch carries only the restricted profile
    plain = _pod_patch(_job(ClusterConfig(gpu_node_selector="", gpu_toleration="")))
    assert "nodeSelector" not in plain and "tolerations" not in plain
    assert plain["serviceAccountName"] == "kubetrain-workload"


def test_trainer_pods_run_restricted_as_the_workload_account_without_a_token():
    cluster = dataclasses.replace(GPU_CLUSTER, workload_service_account="team-workload")
    job = _job(cluster)
    pod = _pod_patch(job)
    assert pod["serviceAccountName"] == "team-workload" != cluster.service_account
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (node,) = pod["containers"]  # the runtime's trainer container; the only one we define
    assert node["name"] == "node" and "initContainers" not in pod
    ctx = node["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}
    assert volumes[mounts["/home/kubetrain/.cache"]]["emptyDir"] == {}
    # the caches point into the writable volume: env of `node` goes through spec.trainer
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert "env" not in node  # Trainer's webhook refuses env patches of `node`
    assert env["TMPDIR"]["value"] == "/tmp"
    assert (
        env["XDG_CACHE_HOME"]["value"]
        == env["TORCH_HOME"]["value"].rsplit("/", 1)[0]
        == "/home/kubetrain/.cache"
    )
    assert [k for k, e in env.items() if "valueFrom" in e] == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]  # the only credentials: Secret refs
    # automountServiceAccountToken: Trainer's PodSpecPatch has no such field, so the
    # TrainJob cannot say it; the workload account itself says false
    patch_fields = {f.alias or name for name, f in TrainerV1alpha1PodSpecPatch.model_fields.items()}
    assert "automountServiceAccountToken" not in patch_fields | set(pod)
    assert {"serviceAccountName", "securityContext", "volumes", "containers"} <= patch_fields
    manifest = Path(__file__).resolve().parents[2] / "manifests/base/workload-serviceaccount.yaml"
    account = yaml.safe_load(manifest.read_text())
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["name"] == ClusterConfig().workload_service_account
    assert account["automountServiceAccountToken"] is False
    assert tj.validate(job) is job  # still the Trainer API, field for field


def test_s3_credentials_come_from_the_secret_never_as_values(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-LOCAL-ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret-value")
    job = _job()
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "team-s3", "key": key}},
        }
    assert env["S3_ENDPOINT_URL"]["value"] == "http://minio.kubeflow:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    text = json.dumps(job)
    assert "AKIA-LOCAL-ID" not in text and "local-secret-value" not in text
    assert not RESERVED & set(env)  # the torch plugin sets these; its webhook rejects ours
    no_endpoint = _job(ClusterConfig())
    assert "S3_ENDPOINT_URL" not in {e["name"] for e in no_endpoint["spec"]["trainer"]["env"]}


def test_command_runs_train_entry_under_torchrun_with_the_run_settings():
    trainer = _job()["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "kubetrain.cli.train_entry"]
    args = train_entry.parser().parse_args(trainer["args"])
    # KFP's minio:// artifact URIs name the same object store
    assert (args.train, args.validation, args.output) == (
        "s3://bucket/run/train",
        "s3://bucket/run/validation",
        "s3://bucket/run/out",
    )
    # one --settings object: the four sections, the tuned values already applied
    settings = RunConfig.from_flat(json.loads(args.settings)).flat(
        "train", "hyper", "final", "seed"
    )
    assert settings["learning_rate"] == TUNED["learning_rate"]
    expected = CFG.flat("train", "hyper", "final", "seed") | TUNED
    assert {k: settings[k] for k in expected} == expected
    assert json.loads(args.hyperparameters) == {}  # nothing left to apply on the ranks


def test_cpu_pool_job_has_no_gpus_and_one_process_per_node():
    cpu = ClusterConfig(gpus=0, cpu_node_selector="pool=cpu")
    job = _job(cpu, num_nodes=2)
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == cpu.image("cpu") and trainer["numProcPerNode"] == 1
    assert set(trainer["resourcesPerNode"]["limits"]) == {"cpu", "memory"}
    pod = _pod_patch(job)
    assert pod["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in pod
    assert _job(cpu, nproc_per_node=3)["spec"]["trainer"]["numProcPerNode"] == 3


@pytest.mark.parametrize("num_nodes", [0, -1, 1.5, True, "2"])
def test_bad_num_nodes_is_a_user_error(num_nodes):
    with pytest.raises(KubetrainError, match="at least 1 node"):
        _job(num_nodes=num_nodes)


def test_bad_names_uris_and_process_counts_are_user_errors():
    for name in ("Train", "1train", "train_x", "t" * 49, "train-"):
        with pytest.raises(KubetrainError, match="TrainJob name"):
            _job(name=name)
    assert tj.default_name().startswith("kubetrain-train-")
    _job(name=tj.default_name())
    with pytest.raises(KubetrainError, match="s3://"):
        tj.trainjob(
            CFG.train, CFG.hyper, CFG.final, CFG.seed, GPU_CLUSTER, "/local/train", *URIS[1:], 2
        )
    with pytest.raises(KubetrainError, match="one GPU per process"):
        _job(nproc_per_node=8)
    assert ClusterConfig(num_nodes=2, gpus=1).trainjob
    assert ClusterConfig(num_nodes=1, gpus=2).trainjob
    assert not ClusterConfig(num_nodes=1, gpus=1).trainjob


def test_validate_rejects_what_the_trainer_api_does_not_define():
    job = _job()
    wrong = json.loads(json.dumps(job))
    wrong["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}]}]  # not in 2.3
    with pytest.raises(KubetrainError, match="podTemplateOverrides"):
        tj.validate(wrong)
    typo = json.loads(json.dumps(job))
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    with pytest.raises(KubetrainError, match="numNode"):
        tj.validate(typo)
    auto = json.loads(json.dumps(job))
    auto["spec"]["trainer"]["numProcPerNode"] = "auto"  # an int in this API version
    with pytest.raises(KubetrainError, match="Trainer API"):
        tj.validate(auto)
    no_ref = json.loads(json.dumps(job))
    del no_ref["spec"]["runtimeRef"]
    with pytest.raises(KubetrainError, match="Trainer API"):
        tj.validate(no_ref)


def test_cluster_settings_survive_kfp_dict_parameters():
    from kubetrain.config.cluster import ClusterConfig

    as_dict = dataclasses.asdict(GPU_CLUSTER)
    assert (
        ClusterConfig.from_dict(
            {k: float(v) if isinstance(v, int) else v for k, v in as_dict.items()}
        )
        == GPU_CLUSTER
    )
    with pytest.raises(KubetrainError, match="unknown cluster setting"):
        ClusterConfig.from_dict({"gpuz": 1})


# --- status and following -----------------------------------------------------------


def _condition(kind: str, reason: str, message: str = "", status: str = "True") -> dict:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def _jobs(active=0, ready=0, succeeded=0, failed=0) -> list[dict]:
    return [
        {
            "name": "node",
            "active": active,
            "ready": ready,
            "succeeded": succeeded,
            "failed": failed,
            "suspended": 0,
        }
    ]


def _with_status(job: dict, **status) -> dict:
    doc = {**job, "status": status}
    TrainerV1alpha1TrainJob.from_dict(doc)  # a status the real API could report
    return doc


def test_progress_of_reads_conditions_and_child_jobs():
    job = _job()
    assert tj.progress_of(job).phase == "Pending"
    created = _with_status(job, conditions=[_condition("Created", "JobsCreationSucceeded")])
    assert tj.progress_of(created).phase == "Created"
    running = _with_status(
        job,
        jobsStatus=_jobs(active=3, ready=3),
        trainerStatus={"progressPercentage": 40, "lastUpdatedTime": "2026-01-01T00:00:00Z"},
    )
    state = tj.progress_of(running)
    assert state.phase == "Running" and state.detail == "node: 3 active 3 ready, 40%"
    suspended = _with_status(job, conditions=[_condition("Suspended", "Suspended")])
    assert tj.progress_of(suspended).phase == "Suspended"
    resumed = _with_status(job, conditions=[_condition("Suspended", "Resumed", status="False")])
    assert tj.progress_of(resumed).phase == "Pending"
    done = _with_status(
        job, conditions=[_condition("Complete", "JobsCompleted")], jobsStatus=_jobs(succeeded=3)
    )
    assert tj.progress_of(done).phase == "Complete" and tj.progress_of(done).done
    failed = _with_status(
        job,
        conditions=[
            _condition("Failed", "DeadlineExceeded", "too long"),
            _condition("Complete", "x", status="False"),
        ],
    )
    state = tj.progress_of(failed)
    assert (state.phase, state.reason, state.message) == ("Failed", "DeadlineExceeded", "too long")


def _sequence(docs: list[dict]):
    it = iter(docs)
    last = {}

    def get():
        nonlocal last
        last = next(it, last)
        return last

    return get


def test_follow_returns_the_completed_job_logging_each_change_once():
    job = _job()
    docs = [
        job,
        _with_status(job, conditions=[_condition("Created", "JobsCreationSucceeded")]),
        _with_status(job, jobsStatus=_jobs(active=3)),
        _with_status(job, jobsStatus=_jobs(active=3)),
        _with_status(
            job, conditions=[_condition("Complete", "JobsCompleted")], jobsStatus=_jobs(succeeded=3)
        ),
    ]
    clock, logs = Clock(), []
    final = tj.follow(
        _sequence(docs), 3600, poll_s=5, sleep=clock.sleep, now=clock.now, log=logs.append
    )
    assert final is docs[-1]
    assert logs == [
        "TrainJob train-abc: Pending",
        "TrainJob train-abc: Created",
        "TrainJob train-abc: Running (node: 3 active)",
        "TrainJob train-abc: Complete (node: 3 succeeded): JobsCompleted",
    ]
    assert clock.sleeps == [5] * 4


def test_follow_fails_with_the_jobs_reason():
    job = _job()
    failed = _with_status(
        job,
        conditions=[
            _condition("Failed", "FailedJobs", 'jobset failed: job "train-abc-node-0" has failed')
        ],
    )
    clock = Clock()
    with pytest.raises(KubetrainError) as info:
        tj.follow(
            _sequence([job, failed]), 3600, sleep=clock.sleep, now=clock.now, log=lambda m: None
        )
    message = str(info.value)
    assert "ml-team/train-abc failed: FailedJobs" in message
    assert 'job "train-abc-node-0" has failed' in message
    assert "kubectl -n ml-team logs -l jobset.sigs.k8s.io/jobset-name=train-abc" in message


def test_follow_times_out_with_a_describe_hint():
    job = _with_status(_job(), jobsStatus=_jobs(active=3))
    clock = Clock()
    with pytest.raises(KubetrainError) as info:
        tj.follow(lambda: job, 60, poll_s=25, sleep=clock.sleep, now=clock.now, log=lambda m: None)
    assert clock.t == 60 and clock.sleeps == [25, 25, 10]
    message = str(info.value)
    assert "did not finish within 60 s" in message and "Running" in message
    assert "kubectl -n ml-team describe trainjob train-abc" in message
    assert "raise --wait-timeout" in message


# --- the Kubernetes API (fake) --------------------------------------------------------

_api_exception = api_exception


class FakeApi:
    """CustomObjectsApi's three calls; `statuses` are what successive gets report.

    `existing` is an object already on the server under the job's name: create
    answers 409 and gets return it (with the statuses).
    """

    def __init__(
        self, statuses=(), create_error=None, get_errors=(), on_create=None, existing=None
    ):
        self.statuses, self.create_error = list(statuses), create_error
        self.get_errors, self.on_create = list(get_errors), on_create
        self.created, self.deleted, self.gets = [], [], 0
        self.job = existing
        if existing is not None and create_error is None:
            self.create_error = _api_exception(409, 'trainjobs "train-abc" already exists')

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural))
        if self.create_error:
            raise self.create_error
        self.job = body
        if self.on_create:
            self.statuses = [self.on_create(body)]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        if self.get_errors:
            raise self.get_errors.pop(0)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {**(self.job or {}), "status": status}

    def delete_namespaced_custom_object(
        self, group, version, namespace, plural, name, propagation_policy=None
    ):
        self.deleted.append((namespace, name, propagation_policy))


def _run(api, job=None, **kwargs):
    clock, logs = Clock(), []
    kwargs.setdefault("poll_s", 1)
    try:
        return tj.run(
            job or _job(), api=api, sleep=clock.sleep, now=clock.now, log=logs.append, **kwargs
        )
    finally:
        _run.clock, _run.logs = clock, logs


COMPLETE = {"conditions": [_condition("Complete", "JobsCompleted")]}


def test_run_creates_follows_and_deletes():
    api = FakeApi([{}, {"jobsStatus": _jobs(active=3)}, COMPLETE])
    final = _run(api)
    assert api.created == [("trainer.kubeflow.org", "v1alpha1", "ml-team", "trainjobs")]
    assert api.job == _job() and final["status"] == COMPLETE and api.gets == 3
    assert api.deleted == [("ml-team", "train-abc", "Background")]
    kept = FakeApi([COMPLETE])
    _run(kept, keep=True)
    assert kept.deleted == []


def test_a_failed_job_is_still_deleted():
    api = FakeApi([{"conditions": [_condition("Failed", "FailedJobs", "rank 3 OOM")]}])
    with pytest.raises(KubetrainError, match="FailedJobs: rank 3 OOM"):
        _run(api)
    assert api.deleted == [("ml-team", "train-abc", "Background")]


def test_missing_trainer_install_and_rbac_are_named():
    with pytest.raises(
        KubetrainError,
        match=r"Kubeflow Trainer v2 is not installed \(no "
        r"trainjobs.trainer.kubeflow.org CRD\)",
    ):
        _run(
            FakeApi(
                create_error=_api_exception(404, "the server could not find the requested resource")
            )
        )
    with pytest.raises(KubetrainError, match="namespace 'ml-team' does not exist"):
        _run(FakeApi(create_error=_api_exception(404, 'namespaces "ml-team" not found')))
    with pytest.raises(KubetrainError) as info:
        _run(
            FakeApi(
                create_error=_api_exception(
                    403,
                    'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:'
                    'ml-team:runner" cannot create resource "trainjobs"',
                )
            )
        )
    assert "not allowed to create trainjobs.trainer.kubeflow.org in namespace ml-team" in str(
        info.value
    ) and "role.yaml" in str(info.value)
    with pytest.raises(KubetrainError, match="rejected TrainJob train-abc: admission webhook"):
        _run(
            FakeApi(
                create_error=_api_exception(
                    403,
                    'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the '
                    "request: spec.trainer.env: must not have reserved envs",
                )
            )
        )
    # someone else's TrainJob of that name (not our labels): fail, never delete it
    foreign = FakeApi(
        [{}],
        existing={
            "apiVersion": tj.API_VERSION,
            "kind": tj.KIND,
            "metadata": {"name": "train-abc", "namespace": "ml-team"},
        },
    )
    with pytest.raises(KubetrainError, match="already exists"):
        _run(foreign)
    assert foreign.deleted == [] and len(foreign.created) == 1


def test_transient_api_errors_are_retried_a_deleted_job_is_not():
    api = FakeApi(
        [COMPLETE], get_errors=[_api_exception(503, "etcd busy"), ConnectionResetError("reset")]
    )
    assert _run(api)["status"] == COMPLETE and api.gets == 3
    gone = FakeApi([COMPLETE], get_errors=[_api_exception(404, 'trainjobs "train-abc" not found')])
    with pytest.raises(KubetrainError, match="disappeared"):
        _run(gone)
    assert _run.clock.sleeps == []  # a refusal fails at once
    assert gone.deleted == [("ml-team", "train-abc", "Background")]


def test_transient_errors_follow_the_same_policy_as_katib():
    """No answer, 5xx and 429: capped exponential backoff, the same sleeps as a Katib step."""
    errors = transient_errors()
    api = FakeApi([COMPLETE], get_errors=errors)
    assert _run(api, poll_s=5)["status"] == COMPLETE and api.gets == len(errors) + 1
    assert _run.clock.sleeps == backoff_sleeps(5, len(errors)) == [5, 10, 20, 40]
    assert _run.logs[1] == (
        "Kubernetes API unavailable while trying to get TrainJob "
        "ml-team/train-abc (503 etcdserver: leader changed); retry 1 in 5 s"
    )
    assert len(api.created) == 1 and api.deleted == [("ml-team", "train-abc", "Background")]


def test_transient_errors_are_retried_until_the_timeout_not_five_times():
    api = FakeApi([COMPLETE], get_errors=[_api_exception(500, "oops")] * 12)
    assert _run(api, poll_s=1, timeout_s=3600)["status"] == COMPLETE and api.gets == 13
    assert _run.clock.sleeps == backoff_sleeps(1, 12) and max(_run.clock.sleeps) == 60
    down = FakeApi([COMPLETE], get_errors=[_api_exception(502, "bad gateway")] * 1000)
    with pytest.raises(KubetrainError) as info:
        _run(down, timeout_s=600)
    message = str(info.value)
    assert "TrainJob ml-team/train-abc did not finish within 600 s" in message
    assert "raise --wait-timeout" in message and "got no answer" in message
    assert _run.clock.t == 600 and down.deleted == [("ml-team", "train-abc", "Background")]


def test_409_on_create_reattaches_to_this_runs_trainjob():
    """A preempted train step's retry finds its TrainJob by name and follows it, not a copy."""
    api = FakeApi([{"jobsStatus": _jobs(active=3)}, COMPLETE], existing=_job())
    final = _run(api)
    assert final["status"] == COMPLETE and len(api.created) == 1  # no second create
    assert _run.logs[0] == (
        "re-attached to TrainJob ml-team/train-abc: an earlier attempt of this step created it"
    )
    assert not any(line.startswith("created TrainJob") for line in _run.logs)
    assert api.deleted == [("ml-team", "train-abc", "Background")]


# --- the TrainJob's command, run the way the torch plugin starts it -------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_trainer(secrets: dict[str, dict[str, str]], scratch):
    """A stand-in for Trainer + JobSet on one node: run the trainer container's command with
    the PET_* variables the torch plugin injects and env resolved from `secrets`; the cache
    emptyDir (the image's $HOME/.cache) is the directory `scratch`."""

    def start(job: dict) -> dict:
        trainer = job["spec"]["trainer"]
        assert trainer["numNodes"] == 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        for var in trainer["env"]:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            env[var["name"]] = secrets[ref["name"]][ref["key"]] if ref else var["value"]
            if not ref and var["value"].startswith(security.CACHE_DIR):
                env[var["name"]] = str(scratch) + var["value"][len(security.CACHE_DIR) :]
        env.update(
            PET_NNODES="1",
            PET_NPROC_PER_NODE=str(trainer["numProcPerNode"]),
            PET_NODE_RANK="0",
            PET_MASTER_ADDR="127.0.0.1",
            PET_MASTER_PORT=str(_free_port()),
            OMP_NUM_THREADS="1",
        )
        command = trainer["command"] + trainer["args"]
        assert command[0] == "torchrun"  # the image's torchrun; here this venv's
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *command[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        start.output = proc.stdout + proc.stderr
        if proc.returncode:
            return {"conditions": [_condition("Failed", "FailedJobs", proc.stderr[-300:])]}
        return {"conditions": [_condition("Complete", "JobsCompleted")]}

    start.output = ""
    return start


def test_train_on_cluster_runs_the_trainjob_command_and_collects_its_outputs(
    s3_env, s3_server, tmp_path
):
    from sklearn.datasets import load_breast_cancer

    from kubetrain.data.datasets import Schema, save_split
    from kubetrain.training.models import load_model, predict_proba

    data = load_breast_cancer()
    X = ((data.data - data.data.mean(0)) / data.data.std(0)).astype(np.float32)
    y = data.target.astype(np.int64)
    schema = Schema("table", list(data.feature_names), list(data.target_names))
    save_split(tmp_path / "train", X[:400], y[:400], schema)
    save_split(tmp_path / "val", X[400:], y[400:], schema)
    base = f"s3://{s3_env}/pipeline-root/run-1"
    storage.upload(tmp_path / "train", f"{base}/train")
    storage.upload(tmp_path / "val", f"{base}/val")
    cluster = ClusterConfig(
        gpus=0,
        s3_secret="kubetrain-s3",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
    )
    start = local_trainer(
        {
            "kubetrain-s3": {
                "AWS_ACCESS_KEY_ID": s3_server.access_key,
                "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            }
        },
        tmp_path / "cache",
    )
    api = FakeApi(on_create=start)
    clock, logs = Clock(), []
    out = tmp_path / "outputs"
    cfg = RunConfig.from_flat({"epochs": 3, "width": 16, "batch_size": 32, "learning_rate": 0.01})
    meta = tj.train_on_cluster(
        cfg.train,
        cfg.hyper.replace({"dropout": 0.0}),  # tuned, as the train stage hands it over
        cfg.final,
        cfg.seed,
        cluster,
        f"{base}/train",
        f"minio://{s3_env}/pipeline-root/run-1/val",
        f"{base}/trainjob",
        str(out / "model"),
        str(out / "metrics.json"),
        str(out / "report.html"),
        name="train-e2e",
        api=api,
        nproc_per_node=2,
        poll_s=1,
        sleep=clock.sleep,
        now=clock.now,
        log=logs.append,
    )
    assert "data-parallel over 2 process(es)" in start.output, start.output[-2000:]
    assert start.output.count("kubetrain | train | epoch 1/3") == 1  # rank 0 only
    assert meta["processes"] == 2 and meta["epochs_run"] == 3
    assert meta["hyperparameters"]["dropout"] == 0.0
    model, _, _ = load_model(out / "model")
    accuracy = float((predict_proba(model, X[400:]).argmax(1).numpy() == y[400:]).mean())
    assert accuracy == pytest.approx(meta["val_accuracy"], abs=1e-6) and accuracy > 0.9
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    assert "Training" in (out / "report.html").read_text()
    assert api.deleted == [("kubetrain", "train-e2e", "Background")]
    assert logs[0].startswith("created TrainJob kubetrain/train-e2e: 1 node(s) x 2 process(es)")
    assert any("Complete" in line for line in logs)


def test_collect_without_outputs_is_a_user_error(s3_env):
    with pytest.raises(KubetrainError, match="wrote no"):
        tj.collect(f"s3://{s3_env}/nothing", "m", "x.json", "r.html")
