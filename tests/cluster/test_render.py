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
