"""`kubetrain compile --target cluster`: images, GPU placement, secrets, retries, pod security.

Also the pod security pieces the Katib and TrainJob builders share
(`kubetrain.cluster.security`) and image digests (`ClusterConfig.*_image_digest`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetrain import stages
from kubetrain.cli.main import main
from kubetrain.cluster import backends, security
from kubetrain.cluster.compile import GPU_STAGES, compile_pipeline
from kubetrain.config.cluster import ClusterConfig
from kubetrain.core.errors import KubetrainError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEYxy"
ACCESS = "AKIAIOSFODNN7EXAMPLEX"
ROOT = Path(__file__).resolve().parents[2]


def compiled(tmp_path, cluster=None):
    path = compile_pipeline("cluster", tmp_path / "p.yaml", cluster)
    spec, platform = yaml.safe_load_all(path.read_text())
    return path, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec):
    """(task name, task, component name) over the root DAG and every nested sub-DAG."""

    def walk(dag):
        for name, task in dag.get("tasks", {}).items():
            comp = task["componentRef"]["name"]
            yield name, task, comp
            yield from walk(spec["components"][comp].get("dag", {}))

    yield from walk(spec["root"]["dag"])


def executor_of(spec, comp):
    return spec["components"][comp].get("executorLabel")


def test_gpu_stages_request_gpus_and_land_on_the_gpu_pool(tmp_path):
    _, spec, platform = compiled(tmp_path)
    execs = spec["deploymentSpec"]["executors"]
    for stage in GPU_STAGES:
        container = execs[f"exec-{stage}"]["container"]
        assert container["image"] == "ghcr.io/kubetrain/kubetrain:0.1.0-cuda"
        acc = container["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
        assert container["resources"]["resourceMemoryLimit"] == "16Gi"
        k8s = platform[f"exec-{stage}"]
        assert k8s["nodeSelector"]["labels"] == {"kubetrain.io/node-pool": "gpu"}
        assert k8s["tolerations"] == [
            {
                "key": "nvidia.com/gpu",
                "operator": "Equal",
                "value": "present",
                "effect": "NoSchedule",
            }
        ]


def test_cpu_stages_stay_off_gpu_nodes(tmp_path):
    _, spec, platform = compiled(tmp_path)
    cpu_execs = [
        e for e in spec["deploymentSpec"]["executors"] if e.removeprefix("exec-") not in GPU_STAGES
    ]
    assert {"exec-ingest", "exec-clean", "exec-evaluate", "exec-compress"} <= set(cpu_execs)
    for name in cpu_execs:
        container = spec["deploymentSpec"]["executors"][name]["container"]
        assert container["image"] == "ghcr.io/kubetrain/kubetrain:0.1.0-cpu"
        assert "accelerator" not in container.get("resources", {})
        k8s = platform[name]
        assert "tolerations" not in k8s and "nodeSelector" not in k8s
        assert k8s["nodeAffinity"][0]["matchExpressions"] == [
            {"key": "kubetrain.io/node-pool", "operator": "NotIn", "values": ["gpu"]}
        ]


def test_every_task_retries_with_backoff_and_reads_s3_keys_from_the_secret(tmp_path):
    _, spec, platform = compiled(tmp_path)
    tasks = [(n, t, c) for n, t, c in all_tasks(spec) if executor_of(spec, c)]
    assert len(tasks) >= 10
    for name, task, comp in tasks:
        assert task["retryPolicy"]["maxRetryCount"] == 3, name
        assert task["retryPolicy"]["backoffDuration"] == "30s"
        assert task["taskInfo"]["name"]  # display name
        secret = platform[executor_of(spec, comp)]["secretAsEnv"][0]
        assert secret["secretName"] == "kubetrain-s3"
        assert {k["envVar"] for k in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }


def test_no_secret_value_reaches_the_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "token")
    path, _, _ = compiled(tmp_path, ClusterConfig(s3_endpoint_url="http://minio.kubeflow:9000"))
    text = path.read_text()
    assert SECRET not in text and ACCESS not in text
    assert "http://minio.kubeflow:9000" in text  # the endpoint is configuration, not a secret


def test_placement_settings_come_from_flags(tmp_path):
    out = tmp_path / "custom.yaml"
    assert (
        main(
            [
                "compile",
                "--target",
                "cluster",
                "--output",
                str(out),
                "--image-registry",
                "registry.example.com/ml",
                "--image-tag",
                "2.0",
                "--gpu-node-selector",
                "cloud.google.com/gke-accelerator=nvidia-h100-80gb",
                "--gpu-toleration",
                "dedicated=gpu:NoExecute",
                "--gpu-memory",
                "40Gi",
                "--retries",
                "5",
            ]
        )
        == 0
    )
    spec, platform = yaml.safe_load_all(out.read_text())
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example.com/ml/kubetrain:2.0-cuda"
    assert train["resources"]["resourceMemoryLimit"] == "40Gi"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["tolerations"][0] == {
        "key": "dedicated",
        "operator": "Equal",
        "value": "gpu",
        "effect": "NoExecute",
    }
    ingest = next(t for n, t, _ in all_tasks(spec) if n == "ingest")
    assert ingest["retryPolicy"]["maxRetryCount"] == 5


def test_local_target_has_no_retries_and_no_platform_spec(tmp_path):
    path = compile_pipeline("local", tmp_path / "local.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1
    ingest = next(t for n, t, _ in all_tasks(docs[0]) if n == "ingest")
    assert "retryPolicy" not in ingest


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("gpu_memory", "lots", "is not a Kubernetes quantity"),
        ("gpu_node_selector", "no-equals-sign", "must be key=value"),
        ("gpu_toleration", "nvidia.com/gpu:Sometimes", "NoSchedule|PreferNoSchedule|NoExecute"),
        ("pipeline_root", "/local/path", "must be an object store URI"),
    ],
)
def test_bad_cluster_settings_are_one_line_errors(field, value, message):
    with pytest.raises(KubetrainError, match=message) as err:
        ClusterConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_tune_creates_a_katib_experiment_from_the_compiled_placement(tmp_path):
    _, spec, platform = compiled(tmp_path, ClusterConfig(gpus=2))
    tune = next(t for _, t, c in all_tasks(spec) if c == "comp-tune")
    params = tune["inputs"]["parameters"]
    placement = params["cluster"]["runtimeValue"]["constant"]
    assert backends.tuner_for(placement, "run").func is backends.tune_on_katib
    assert ClusterConfig(**placement) == ClusterConfig(gpus=2)  # round-trips exactly
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # the tune pod only drives Katib: no GPU for it, its trials get them
    container = spec["deploymentSpec"]["executors"]["exec-tune"]["container"]
    assert "accelerator" not in container.get("resources", {})


def test_local_target_tunes_in_process(tmp_path):
    spec = yaml.safe_load(compile_pipeline("local", tmp_path / "l.yaml").read_text())
    tune = next(t for _, t, c in all_tasks(spec) if c == "comp-tune")
    placement = tune["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"]
    assert placement == {} and backends.tuner_for(placement) is stages.tune_here  # Optuna


@pytest.mark.parametrize("flags", [["--num-nodes", "2"], ["--gpus", "4"]])
def test_multi_node_or_multi_gpu_training_runs_as_a_trainjob(tmp_path, flags):
    out = tmp_path / "tj.yaml"
    assert main(["compile", "--target", "cluster", "--output", str(out), *flags]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    train = next(t for _, t, c in all_tasks(spec) if c == "comp-train")
    placement = ClusterConfig.from_dict(
        train["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"]
    )
    assert placement.trainjob
    # the train pod only submits and follows the TrainJob: CPU image, no GPU, off GPU nodes
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert container["image"].endswith("-cpu") and "accelerator" not in container["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert "tolerations" not in k8s and k8s["nodeAffinity"]


# --------------------------------------------------------------------------- pod security


def k8s_executor_of(platform, spec, comp):
    return platform[executor_of(spec, comp)]


def test_every_step_runs_as_the_image_user_with_scratch_volumes(tmp_path):
    """What kfp-kubernetes can set: the identity, the emptyDirs, the cache env, pod labels."""
    _, spec, platform = compiled(tmp_path)
    tasks = [(n, c) for n, _, c in all_tasks(spec) if executor_of(spec, c)]
    assert len(tasks) >= 10
    for name, comp in tasks:
        k8s = k8s_executor_of(platform, spec, comp)
        # int64 fields are strings in proto JSON
        assert k8s["securityContext"] == {
            "runAsUser": str(security.UID),
            "runAsGroup": str(security.GID),
            "runAsNonRoot": True,
        }, name
        mounts = {m["mountPath"]: m["volumeName"] for m in k8s["emptyDirMounts"]}
        assert mounts == {"/tmp": security.TMP_VOLUME, security.CACHE_DIR: security.CACHE_VOLUME}, (
            name
        )
        assert k8s["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "kubetrain"
        container = spec["deploymentSpec"]["executors"][executor_of(spec, comp)]["container"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {k: env.get(k) for k in security.SCRATCH_ENV} == security.SCRATCH_ENV, name
        for variable in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
            assert any(env[variable] == p or env[variable].startswith(p + "/") for p in mounts), (
                f"{name}: {variable} is not on an emptyDir"
            )


def test_the_pod_security_the_image_assumes_matches_the_dockerfiles():
    for dockerfile in sorted((ROOT / "docker").glob("Dockerfile*")):
        text = dockerfile.read_text()
        users = re.findall(r"(?m)^USER\s+(\S+)", text)
        assert users and users[-1].split(":")[0] == str(security.UID), dockerfile.name
        assert f"--gid {security.GID}" in text, dockerfile.name
        assert re.search(rf"(?m)^\s*HOME={re.escape(security.HOME)}\b", text), dockerfile.name


def test_container_security_context_is_restricted_with_a_read_only_root():
    ctx = security.container_security_context()
    assert ctx == {
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert security.container_security_context() is not ctx  # a fresh dict each call
    pod = security.pod_security_context()
    assert pod == {
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "runAsNonRoot": True,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_scratch_volumes_mounts_and_env_fit_together():
    volumes = security.scratch_volumes()
    assert all(set(v) == {"name", "emptyDir"} for v in volumes)
    mounts = security.scratch_mounts()
    assert {m["name"] for m in mounts} == {v["name"] for v in volumes}
    paths = {m["mountPath"] for m in mounts}
    assert paths == {"/tmp", "/home/kubetrain/.cache"}
    env = {e["name"]: e["value"] for e in security.scratch_env()}
    for name in (
        "XDG_CACHE_HOME",
        "MPLCONFIGDIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "TORCH_HOME",
        "CUDA_CACHE_PATH",
        "TMPDIR",
    ):
        assert any(env[name] == p or env[name].startswith(p + "/") for p in paths), name


def _restricted_violations(pod_spec: dict) -> list[str]:
    """The Pod Security Standard "restricted" checks a pod spec fails (Kubernetes docs)."""
    pod_ctx = pod_spec.get("securityContext", {})
    bad = []
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        ctx = c.get("securityContext", {})
        name = c["name"]
        if ctx.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx["capabilities"].get("add"):
            bad.append(f"{name}: capabilities")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile")
        if ctx.get("privileged"):
            bad.append(f"{name}: privileged")
        if not ctx.get("readOnlyRootFilesystem"):  # beyond restricted: kubetrain's own rule
            bad.append(f"{name}: readOnlyRootFilesystem")
    for volume in pod_spec.get("volumes", []):
        if (
            set(volume)
            - {"name"}
            - {
                "emptyDir",
                "configMap",
                "secret",
                "projected",
                "downwardAPI",
                "persistentVolumeClaim",
                "ephemeral",
                "csi",
            }
        ):
            bad.append(f"volume {volume['name']}")
    return bad


def test_harden_pod_spec_makes_a_workload_pod_restricted_without_api_credentials():
    cluster = ClusterConfig()
    original = {
        "restartPolicy": "Never",
        "volumes": [{"name": "data", "emptyDir": {"medium": "Memory"}}],
        "initContainers": [{"name": "init", "image": "busybox:1.37"}],
        "containers": [
            {
                "name": "training-container",
                "image": cluster.image("cuda"),
                "env": cluster.s3_env() + [{"name": "TMPDIR", "value": "/data"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }
        ],
    }
    before = yaml.safe_dump(original)
    pod = security.harden_pod_spec(original, cluster.workload_service_account)
    assert yaml.safe_dump(original) == before, "the input is not modified"

    assert pod["serviceAccountName"] == "kubetrain-workload"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == security.pod_security_context()
    assert _restricted_violations(pod) == []
    assert _restricted_violations(original)  # the checker does catch a plain spec
    assert [v["name"] for v in pod["volumes"]] == [
        "data",
        security.TMP_VOLUME,
        security.CACHE_VOLUME,
    ]
    main = pod["containers"][0]
    assert [m["mountPath"] for m in main["volumeMounts"]] == ["/data", "/tmp", security.CACHE_DIR]
    env = [e["name"] for e in main["env"]]
    assert env.count("TMPDIR") == 1 and main["env"][env.index("TMPDIR")]["value"] == "/data"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MPLCONFIGDIR"} <= set(env)
    secret_refs = [e for e in main["env"] if "valueFrom" in e]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in secret_refs} == {cluster.s3_secret}
    assert pod["initContainers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # explicit settings of the caller win over the defaults
    custom = security.harden_container(
        {"name": "x", "image": "y", "securityContext": {"runAsUser": 20000}}
    )
    assert custom["securityContext"]["runAsUser"] == 20000
    assert custom["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.integration  # a subprocess
def test_a_hardened_pod_validates_strictly(tmp_path):
    cluster = ClusterConfig()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trial"},
        "spec": security.harden_pod_spec(
            {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "training-container",
                        "image": cluster.image("cpu"),
                        "env": cluster.s3_env(),
                    }
                ],
            },
            cluster.workload_service_account,
        ),
    }
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(validate), "--strict", "--quiet", "--kubernetes-version", "1.37.0", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_workload_account_is_a_cluster_setting_apart_from_the_runner():
    cluster = ClusterConfig()
    assert cluster.workload_service_account == "kubetrain-workload"
    assert cluster.workload_service_account != cluster.service_account
    with pytest.raises(KubetrainError, match="must differ from service_account") as err:
        ClusterConfig(workload_service_account=cluster.service_account)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- image digests

CPU_DIGEST = "sha256:" + "0123456789abcdef" * 4
CUDA_DIGEST = "sha256:" + "fedcba9876543210" * 4


def test_images_are_referenced_by_tag_without_a_digest(tmp_path):
    _, spec, _ = compiled(tmp_path)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {
        "ghcr.io/kubetrain/kubetrain:0.1.0-cpu",
        "ghcr.io/kubetrain/kubetrain:0.1.0-cuda",
    }


def test_image_digests_pin_every_step_image(tmp_path):
    pinned = ClusterConfig(cpu_image_digest=CPU_DIGEST, cuda_image_digest=CUDA_DIGEST)
    _, spec, _ = compiled(tmp_path, pinned)
    execs = spec["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in execs.values()}
    assert images == {
        f"ghcr.io/kubetrain/kubetrain:0.1.0-cpu@{CPU_DIGEST}",
        f"ghcr.io/kubetrain/kubetrain:0.1.0-cuda@{CUDA_DIGEST}",
    }
    assert execs["exec-train"]["container"]["image"].endswith(f"-cuda@{CUDA_DIGEST}")
    # the steps that build Katib trials and TrainJobs get the digests too (same ClusterConfig)
    handed = [
        ClusterConfig.from_dict(t["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"])
        for _, t, _ in all_tasks(spec)
        if "cluster" in t.get("inputs", {}).get("parameters", {})
    ]
    assert handed and all(c == pinned for c in handed)


def test_image_digests_are_compile_flags():
    import argparse

    from kubetrain.config import cluster as cluster_config

    parser = argparse.ArgumentParser()
    cluster_config.add_arguments(parser)
    args = parser.parse_args(["--cpu-image-digest", CPU_DIGEST, "--cuda-image-digest", CUDA_DIGEST])
    cluster = cluster_config.from_arguments(args)
    assert (cluster.cpu_image_digest, cluster.cuda_image_digest) == (CPU_DIGEST, CUDA_DIGEST)
    assert (
        cluster_config.from_arguments(parser.parse_args([])).image("cpu")
        == "ghcr.io/kubetrain/kubetrain:0.1.0-cpu"
    )


def test_image_reference_with_one_digest():
    cluster = ClusterConfig(
        image_registry="registry.example.com/ml", image_tag="2.0", cpu_image_digest=CPU_DIGEST
    )
    assert cluster.image("cpu") == f"registry.example.com/ml/kubetrain:2.0-cpu@{CPU_DIGEST}"
    assert cluster.image("cuda") == "registry.example.com/ml/kubetrain:2.0-cuda"


@pytest.mark.parametrize(
    "value",
    [
        "0123456789abcdef" * 4,  # no algorithm
        "sha256:" + "0123456789abcdef" * 3,  # too short
        "sha256:" + "0123456789ABCDEF" * 4,  # upper case
        "sha512:" + "0123456789abcdef" * 8,  # other algorithm
        "sha256:" + "0123456789abcdef" * 4 + "\n",  # trailing newline
        "ghcr.io/kubetrain/kubetrain@sha256:" + "0" * 64,  # a whole reference
    ],
)
@pytest.mark.parametrize("field", ["cpu_image_digest", "cuda_image_digest"])
def test_a_bad_image_digest_is_a_one_line_error(field, value):
    with pytest.raises(KubetrainError, match=f"{field}=.* must be sha256: followed by 64") as err:
        ClusterConfig(**{field: value})
    assert str(err.value).count("\n") == 0


def test_both_dockerfiles_pin_the_same_base_image_by_digest():
    digests = set()
    for dockerfile in sorted((ROOT / "docker").glob("Dockerfile*")):
        text = dockerfile.read_text()
        bases = re.findall(r"(?m)^FROM\s+(\S+)", text)
        assert len(bases) >= 2, dockerfile.name
        for base in bases:
            match = re.fullmatch(r"python:[\w.-]+@(sha256:[0-9a-f]{64})", base)
            assert match, f"{dockerfile.name}: FROM {base} is not pinned by digest"
            digests.add(match.group(1))
        label = re.search(r'org\.opencontainers\.image\.base\.digest="([^"]+)"', text)
        assert label and label.group(1) in digests, f"{dockerfile.name}: base.digest label"
    assert len(digests) == 1, f"the Dockerfiles use different bases: {digests}"
