"""`kubetrain compile --target cluster`: images, GPU placement, secrets, retries."""

from __future__ import annotations

import pytest
import yaml

from kubetrain.cli import main
from kubetrain.config.cluster import ClusterConfig
from kubetrain.cluster.compile import GPU_STAGES, compile_pipeline
from kubetrain.core.errors import KubetrainError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEYxy"
ACCESS = "AKIAIOSFODNN7EXAMPLEX"


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
        assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Equal",
                                       "value": "present", "effect": "NoSchedule"}]


def test_cpu_stages_stay_off_gpu_nodes(tmp_path):
    _, spec, platform = compiled(tmp_path)
    cpu_execs = [e for e in spec["deploymentSpec"]["executors"]
                 if e.removeprefix("exec-") not in GPU_STAGES]
    assert {"exec-ingest", "exec-clean", "exec-evaluate", "exec-compress"} <= set(cpu_execs)
    for name in cpu_execs:
        container = spec["deploymentSpec"]["executors"][name]["container"]
        assert container["image"] == "ghcr.io/kubetrain/kubetrain:0.1.0-cpu"
        assert "accelerator" not in container.get("resources", {})
        k8s = platform[name]
        assert "tolerations" not in k8s and "nodeSelector" not in k8s
        assert k8s["nodeAffinity"][0]["matchExpressions"] == [
            {"key": "kubetrain.io/node-pool", "operator": "NotIn", "values": ["gpu"]}]


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
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID",
                                                             "AWS_SECRET_ACCESS_KEY"}


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
    assert main(["compile", "--target", "cluster", "--output", str(out),
                 "--image-registry", "registry.example.com/ml", "--image-tag", "2.0",
                 "--gpu-node-selector", "cloud.google.com/gke-accelerator=nvidia-h100-80gb",
                 "--gpu-toleration", "dedicated=gpu:NoExecute", "--gpu-memory", "40Gi",
                 "--retries", "5"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example.com/ml/kubetrain:2.0-cuda"
    assert train["resources"]["resourceMemoryLimit"] == "40Gi"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["tolerations"][0] == {"key": "dedicated", "operator": "Equal", "value": "gpu",
                                     "effect": "NoExecute"}
    assert spec["root"]["dag"]["tasks"]["ingest"]["retryPolicy"]["maxRetryCount"] == 5


def test_local_target_has_no_retries_and_no_platform_spec(tmp_path):
    path = compile_pipeline("local", tmp_path / "local.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1
    assert "retryPolicy" not in docs[0]["root"]["dag"]["tasks"]["ingest"]


@pytest.mark.parametrize("field, value, message", [
    ("gpu_memory", "lots", "is not a Kubernetes quantity"),
    ("gpu_node_selector", "no-equals-sign", "must be key=value"),
    ("gpu_toleration", "nvidia.com/gpu:Sometimes", "NoSchedule|PreferNoSchedule|NoExecute"),
    ("pipeline_root", "/local/path", "must be an object store URI"),
])
def test_bad_cluster_settings_are_one_line_errors(field, value, message):
    with pytest.raises(KubetrainError, match=message) as err:
        ClusterConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_tune_creates_a_katib_experiment_from_the_compiled_placement(tmp_path):
    _, spec, platform = compiled(tmp_path, ClusterConfig(gpus=2))
    tune = next(t for _, t, c in all_tasks(spec) if c == "comp-tune")
    params = tune["inputs"]["parameters"]
    assert params["backend"]["runtimeValue"]["constant"] == "katib"
    placement = params["cluster"]["runtimeValue"]["constant"]
    assert ClusterConfig(**placement) == ClusterConfig(gpus=2)  # round-trips exactly
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # the tune pod only drives Katib: no GPU for it, its trials get them
    container = spec["deploymentSpec"]["executors"]["exec-tune"]["container"]
    assert "accelerator" not in container.get("resources", {})


def test_local_target_tunes_in_process(tmp_path):
    spec = yaml.safe_load(compile_pipeline("local", tmp_path / "l.yaml").read_text())
    tune = next(t for _, t, c in all_tasks(spec) if c == "comp-tune")
    assert tune["inputs"]["parameters"]["backend"]["runtimeValue"]["constant"] == "optuna"


@pytest.mark.parametrize("flags", [["--num-nodes", "2"], ["--gpus", "4"]])
def test_multi_node_or_multi_gpu_training_runs_as_a_trainjob(tmp_path, flags):
    out = tmp_path / "tj.yaml"
    assert main(["compile", "--target", "cluster", "--output", str(out), *flags]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    train = next(t for _, t, c in all_tasks(spec) if c == "comp-train")
    placement = ClusterConfig.from_dict(train["inputs"]["parameters"]["cluster"]
                                        ["runtimeValue"]["constant"])
    assert placement.trainjob
    # the train pod only submits and follows the TrainJob: CPU image, no GPU, off GPU nodes
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert container["image"].endswith("-cpu") and "accelerator" not in container["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert "tolerations" not in k8s and k8s["nodeAffinity"]
