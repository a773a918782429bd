"""`kubetrain render`: the Katib Experiment and TrainJob files an admin reviews or applies
(the SparkApplication it also writes: tests/cluster/test_spark.py)."""

from __future__ import annotations

import json

import yaml

from kubetrain.cli.main import main
from kubetrain.cluster import katib, trainjob
from kubetrain.config.settings import RunConfig


def test_render_writes_valid_experiment_and_trainjob(tmp_path, capsys):
    assert (
        main(
            [
                "render",
                "--num-nodes",
                "2",
                "--gpus",
                "2",
                "--tune-algorithm",
                "grid",
                "--tune-trials",
                "6",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    exp = yaml.safe_load((tmp_path / "katib-experiment.yaml").read_text())
    katib.validate(exp)  # the webhook's rules and Katib's API models, after a YAML round trip
    assert exp["spec"]["algorithm"]["algorithmName"] == "grid"
    assert exp["metadata"]["namespace"] == "kubetrain"
    for p in exp["spec"]["parameters"]:
        assert all(isinstance(v, str) for v in p["feasibleSpace"].get("list", []))
    job = yaml.safe_load((tmp_path / "trainjob.yaml").read_text())
    trainjob.validate(job)
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["trainer"]["numProcPerNode"] == 2
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    args = job["spec"]["trainer"]["args"]
    settings = json.loads(args[args.index("--settings") + 1])
    assert settings == RunConfig().flat("train", "hyper", "final", "seed")  # untuned: the flags'
    assert "trains in its own pod" not in capsys.readouterr().out


def _assert_restricted_container(c: dict, volumes: dict) -> None:
    ctx = c["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}


def _assert_restricted_pod(pod: dict, account: str) -> dict:
    assert pod["serviceAccountName"] == account
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    return {v["name"]: v for v in pod["volumes"]}


def test_rendered_pods_are_restricted_and_run_as_the_workload_account(tmp_path):
    assert (
        main(
            [
                "render",
                "--num-nodes",
                "2",
                "--gpus",
                "2",
                "--namespace",
                "ml",
                "--workload-service-account",
                "ml-workload",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    exp = yaml.safe_load((tmp_path / "katib-experiment.yaml").read_text())
    katib.validate(exp)
    pod = exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    volumes = _assert_restricted_pod(pod, "ml-workload")
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"] and "initContainers" not in pod
    for c in pod["containers"]:
        _assert_restricted_container(c, volumes)

    job = yaml.safe_load((tmp_path / "trainjob.yaml").read_text())
    trainjob.validate(job)
    (patch,) = job["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == trainjob.TRAINER_JOB
    pod = rj["template"]["spec"]["template"]["spec"]
    volumes = _assert_restricted_pod(pod, "ml-workload")
    # Trainer's PodSpecPatch has no automountServiceAccountToken: the TrainJob cannot
    # carry it; the workload service account's own false applies (tests/test_trainjob.py)
    assert "automountServiceAccountToken" not in pod
    (node,) = pod["containers"]
    _assert_restricted_container(node, volumes)
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert env["TMPDIR"]["value"] == "/tmp"
    assert [k for k, e in env.items() if "valueFrom" in e] == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]


def test_render_says_when_training_would_stay_in_its_pod(tmp_path, capsys):
    assert main(["render", "--output-dir", str(tmp_path)]) == 0
    assert "trains in its own pod" in capsys.readouterr().out


def test_render_rejects_bad_settings_in_one_line(tmp_path, capsys):
    assert main(["render", "--num-nodes", "0", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: num_nodes=0") and "\n" not in err
    assert not (tmp_path / "trainjob.yaml").exists()


def test_render_writes_the_inference_service(tmp_path):
    """KServe's CRD is not in kubernetes-validate's schemas: checked structurally (API
    version, the custom predictor running `kubetrain serve` on the bundle, S3 keys by
    reference, the restricted profile, the workload account)."""
    from kubetrain.cluster import inference

    argv = ["render", "--publish-uri", "s3://ml/models", "--model-name", "churn.v2"]
    assert main([*argv, "--serving-runtime", "onnx", "--output-dir", str(tmp_path)]) == 0
    isvc = yaml.safe_load((tmp_path / "inferenceservice.yaml").read_text())
    inference.validate(isvc)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "churn-v2" and isvc["metadata"]["namespace"] == "kubetrain"
    bundle = "s3://ml/models/churn.v2/run-rendered/"
    assert isvc["metadata"]["annotations"]["kubetrain.io/bundle"] == bundle
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container" and c["image"].endswith("-cpu")
    assert c["command"] == ["kubetrain", "serve"]
    assert c["args"][c["args"].index("--bundle") + 1] == bundle
    assert c["args"][c["args"].index("--runtime") + 1] == "onnx"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    keys = {e["name"]: e for e in c["env"]}
    assert keys["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kubetrain-s3"
    assert "value" not in keys["AWS_SECRET_ACCESS_KEY"]
    volumes = _assert_restricted_pod(predictor, "kubetrain-workload")
    _assert_restricted_container(c, volumes)
    assert predictor["automountServiceAccountToken"] is False
