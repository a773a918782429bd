"""The compiled pipeline YAML, validated strictly against KFP's own protos.

Everything here is what the Kubeflow UI / API server would see on upload: the
PipelineSpec (and, for --target cluster, the PlatformSpec) must parse with no
unknown field, every executor must run the kubetrain image without
pip-installing kfp, all seven stages (and publish) must be wired with typed
artifacts, the branches (tuning, quality gate, publish) must carry the right
trigger conditions, every parameter must have the RunConfig default and help
text, and the file must be reproducible and free of credentials from the
compiling environment.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from kubetrain.cli import main as cli
from kubetrain.cluster.compile import compile_pipeline
from kubetrain.components.common import BASE_IMAGE
from kubetrain.config.settings import RunConfig, fields_of
from kubetrain.pipelines.training import PIPELINE_NAME, code_version

# component name -> (output artifacts {name: schemaTitle}, output parameters {name: type})
STAGE_OUTPUTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "comp-ingest": ({"table": "system.Dataset", "profile": "system.Markdown"}, {}),
    "comp-clean": (
        {
            "train": "system.Dataset",
            "validation": "system.Dataset",
            "test": "system.Dataset",
            "report": "system.Markdown",
        },
        {},
    ),
    "comp-augment": ({"augmented": "system.Dataset", "report": "system.HTML"}, {}),
    "comp-tune": (
        {"trials": "system.Dataset", "report": "system.HTML"},
        {"best_hyperparameters": "STRUCT", "tuning": "STRUCT"},
    ),
    "comp-default-hyperparameters": (
        {"trials": "system.Dataset", "report": "system.HTML"},
        {"best_hyperparameters": "STRUCT", "tuning": "STRUCT"},
    ),
    "comp-train": (
        {
            "trained_model": "system.Model",
            "metrics": "system.Metrics",
            "report": "system.HTML",
            "checkpoint": "system.Artifact",
        },
        {},
    ),
    "comp-evaluate": (
        {
            "metrics": "system.Metrics",
            "classification": "system.ClassificationMetrics",
            "evaluation": "system.Artifact",
            "report": "system.HTML",
        },
        {"gate": "STRING", "score": "NUMBER_DOUBLE"},
    ),
    "comp-compress": (
        {"compressed_model": "system.Model", "metrics": "system.Metrics", "report": "system.HTML"},
        {"summary": "STRUCT"},
    ),
    "comp-skip-compression": (
        {"compressed_model": "system.Model", "metrics": "system.Metrics", "report": "system.HTML"},
        {"summary": "STRUCT"},
    ),
    "comp-publish": ({}, {"Output": "STRING"}),
    "comp-deploy": ({"record": "system.Artifact"}, {}),
}
STAGE_INPUT_ARTIFACTS = {
    "comp-ingest": {},
    "comp-clean": {"table": "system.Dataset"},
    "comp-augment": {"train": "system.Dataset"},
    "comp-tune": {"train": "system.Dataset", "validation": "system.Dataset"},
    "comp-default-hyperparameters": {},
    "comp-train": {"train": "system.Dataset", "validation": "system.Dataset"},
    "comp-evaluate": {"trained_model": "system.Model", "test": "system.Dataset"},
    "comp-compress": {
        "trained_model": "system.Model",
        "test": "system.Dataset",
        "train": "system.Dataset",
        "validation": "system.Dataset",
    },
    "comp-skip-compression": {"evaluation": "system.Artifact"},
    "comp-publish": {
        "trained_model": "system.Model",
        "compressed_model": "system.Model",
        "evaluation": "system.Artifact",
        "table": "system.Dataset",
    },
    "comp-deploy": {"table": "system.Dataset", "test": "system.Dataset"},
}
DISPLAY_NAMES = {
    "comp-ingest": "ingest",
    "comp-clean": "clean",
    "comp-augment": "augment",
    "comp-tune": "tune",
    "comp-default-hyperparameters": "tune (skipped)",
    "comp-train": "train",
    "comp-evaluate": "evaluate",
    "comp-compress": "compress",
    "comp-skip-compression": "compress (skipped: quality gate)",
    "comp-publish": "publish",
    "comp-deploy": "deploy",
}
TUNING = "int(inputs.parameter_values['pipelinechannel--tune_trials']) > 0"
GATE = "inputs.parameter_values['pipelinechannel--evaluate-gate'] == 'pass'"
PUBLISH = "inputs.parameter_values['pipelinechannel--publish_uri'] != ''"
DEPLOY = "inputs.parameter_values['pipelinechannel--deploy'] == true"
PARAMETER_TYPES = {
    "str": "STRING",
    "int": "NUMBER_INTEGER",
    "float": "NUMBER_DOUBLE",
    "bool": "BOOLEAN",
}
FAKE_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY9q"
FAKE_ACCESS_KEY = "AKIAZ7QK3EXAMPLE4J2X"
FAKE_SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLEtokenQm9ndXNTZXNzaW9uVG9rZW5Gb3JUZXN0cw=="


def load_docs(path: Path) -> tuple[dict, dict | None]:
    """(PipelineSpec, PlatformSpec or None) of a compiled file with one or two documents."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) in (1, 2), f"expected 1 or 2 YAML documents, got {len(docs)}"
    return docs[0], docs[1] if len(docs) == 2 else None


def strict(doc: dict, message):
    """Parse `doc` into a fresh `message`; any unknown field or wrong type raises."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=False)


@dataclasses.dataclass
class Compiled:
    path: Path
    text: str
    doc: dict
    platform: dict | None
    spec: pipeline_spec_pb2.PipelineSpec
    deployment: pipeline_spec_pb2.PipelineDeploymentConfig


def compiled_at(path: Path) -> Compiled:
    doc, platform = load_docs(path)
    spec = strict(doc, pipeline_spec_pb2.PipelineSpec())
    deployment = strict(doc["deploymentSpec"], pipeline_spec_pb2.PipelineDeploymentConfig())
    if platform is not None:
        strict(platform, pipeline_spec_pb2.PlatformSpec())
    return Compiled(path, path.read_text(), doc, platform, spec, deployment)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Compiled:
    path = tmp_path_factory.mktemp("compiled") / "p.yaml"
    assert compile_pipeline("local", path) == path
    return compiled_at(path)


@pytest.fixture(scope="module")
def compiled_cluster(tmp_path_factory) -> Compiled:
    path = tmp_path_factory.mktemp("compiled") / "cluster.yaml"
    assert compile_pipeline("cluster", path) == path
    return compiled_at(path)


@pytest.fixture(params=["local", "cluster"])
def any_target(request) -> Compiled:
    return request.getfixturevalue("compiled" if request.param == "local" else "compiled_cluster")


def walk(
    doc: dict, dag: dict | None = None, ancestors: tuple = ()
) -> Iterator[tuple[str, dict, tuple]]:
    """Every task of the DAG and of nested sub-DAGs: (task name, task, ancestor tasks)."""
    dag = dag if dag is not None else doc["root"]["dag"]
    for name, task in dag["tasks"].items():
        yield name, task, ancestors
        component = doc["components"][task["componentRef"]["name"]]
        if "dag" in component:
            yield from walk(doc, component["dag"], ancestors + (task,))


def leaf_tasks(doc: dict) -> dict[str, tuple[dict, tuple]]:
    """Component name -> (task, ancestor tasks) for every task that runs a container."""
    leaves = {}
    for _, task, ancestors in walk(doc):
        ref = task["componentRef"]["name"]
        if "executorLabel" in doc["components"][ref]:
            assert ref not in leaves, f"{ref} runs twice"
            leaves[ref] = (task, ancestors)
    return leaves


def conditions(ancestors: tuple) -> list[str]:
    return [
        a["triggerPolicy"]["condition"]
        for a in ancestors
        if a.get("triggerPolicy", {}).get("condition")
    ]


# ---------------------------------------------------------------- strict protos


def test_yaml_parses_strictly_as_pipeline_spec(any_target):
    spec = any_target.spec
    assert spec.pipeline_info.name == PIPELINE_NAME
    assert spec.schema_version == "2.1.0"
    assert spec.sdk_version == "kfp-2.17.0"
    # round trip: nothing in the YAML was dropped on the way into the proto
    assert json_format.MessageToDict(spec) == any_target.doc
    assert json_format.MessageToDict(any_target.deployment) == any_target.doc["deploymentSpec"]


def test_unknown_fields_are_rejected_by_the_strict_parse(compiled):
    """The check above has teeth: a typo'd field anywhere fails the parse."""
    doc = yaml.safe_load(compiled.text)
    doc["root"]["dag"]["tasks"]["train"]["taskInfoo"] = {"name": "x"}
    with pytest.raises(json_format.ParseError):
        strict(doc, pipeline_spec_pb2.PipelineSpec())
    deployment = dict(compiled.doc["deploymentSpec"])
    deployment["executors"] = {k: dict(v) for k, v in deployment["executors"].items()}
    deployment["executors"]["exec-train"]["container"] = dict(
        deployment["executors"]["exec-train"]["container"], imagePullPolicyy="Always"
    )
    with pytest.raises(json_format.ParseError):
        strict(deployment, pipeline_spec_pb2.PipelineDeploymentConfig())


def test_platform_spec_when_present_is_valid(any_target):
    if any_target.platform is None:
        assert "\n---\n" not in any_target.text
        return
    platform = strict(any_target.platform, pipeline_spec_pb2.PlatformSpec())
    executors = set(any_target.deployment.executors)
    assert set(platform.platforms) == {"kubernetes"}
    for name, config in platform.platforms.items():
        assert set(config.deployment_spec.executors) <= executors, name
        # each executor's Kubernetes settings are a valid KubernetesExecutorConfig too
        for _label, struct in config.deployment_spec.executors.items():
            strict(
                json_format.MessageToDict(struct),
                kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
            )


def test_local_target_has_no_platform_spec_and_cluster_has_one(compiled, compiled_cluster):
    assert compiled.platform is None
    assert compiled_cluster.platform is not None


# ---------------------------------------------------------------- executors


def test_local_executors_run_the_kubetrain_image(compiled):
    for label, executor in compiled.deployment.executors.items():
        assert executor.container.image == BASE_IMAGE, label
        assert {e.name for e in executor.container.env} == {"KUBETRAIN_CODE_VERSION"}, label


def test_every_executor_runs_a_container_without_installing_kfp(any_target):
    executors = any_target.deployment.executors
    # the cluster pipeline adds its exit handler's task (cleanup and notification)
    extra = {"exec-cleanup"} & set(executors)
    assert len(executors) == len(STAGE_OUTPUTS) + len(extra)
    for label, executor in executors.items():
        container = executor.container
        name, _, tag = container.image.rpartition(":")
        assert name.endswith("/kubetrain") and tag and tag != "latest", container.image
        assert list(container.command), f"{label}: no command"
        assert list(container.args), f"{label}: no args"
        assert "--executor_input" in container.args and "--function_to_execute" in container.args
        program = " ".join([*container.command, *container.args])
        assert "pip install" not in program, f"{label} pip-installs something"
        assert "kfp.dsl.executor_main" in program, label
        assert "KUBETRAIN_CODE_VERSION" in {e.name for e in container.env}, label


def test_every_container_component_has_an_executor(compiled):
    executors = set(compiled.deployment.executors)
    labels = {
        c["executorLabel"] for c in compiled.doc["components"].values() if "executorLabel" in c
    }
    assert labels == executors
    for name in STAGE_OUTPUTS:
        assert compiled.doc["components"][name]["executorLabel"] == "exec-" + name[len("comp-") :]


def version_of(c: Compiled) -> str:
    versions = {
        e.value
        for ex in c.deployment.executors.values()
        for e in ex.container.env
        if e.name == "KUBETRAIN_CODE_VERSION"
    }
    assert len(versions) == 1, versions
    return versions.pop()


def test_executors_carry_the_library_code_version(compiled):
    version = version_of(compiled)
    assert len(version) == 16 and int(version, 16) >= 0


# ---------------------------------------------------------------- stages, artifacts, DAG


def test_all_stages_run_with_display_names(compiled):
    """The seven stages (two with an Else twin) and publish, each once, each named."""
    leaves = leaf_tasks(compiled.doc)
    assert set(leaves) == set(STAGE_OUTPUTS)
    for ref, (task, _) in leaves.items():
        assert task["taskInfo"]["name"] == DISPLAY_NAMES[ref]


def test_every_task_has_a_display_name(compiled):
    tasks = list(walk(compiled.doc))
    assert len(tasks) >= len(STAGE_OUTPUTS)
    for name, task, _ in tasks:
        assert task.get("taskInfo", {}).get("name"), f"task {name} has no display name"


@pytest.mark.parametrize("component", sorted(STAGE_OUTPUTS))
def test_stage_artifacts_and_parameters_are_typed(compiled, component):
    spec = compiled.doc["components"][component]
    artifacts, parameters = STAGE_OUTPUTS[component]
    outputs = spec["outputDefinitions"]
    assert {
        k: v["artifactType"]["schemaTitle"] for k, v in outputs.get("artifacts", {}).items()
    } == artifacts
    assert {k: v["parameterType"] for k, v in outputs.get("parameters", {}).items()} == parameters
    inputs = spec.get("inputDefinitions", {}).get("artifacts", {})
    assert {
        k: v["artifactType"]["schemaTitle"] for k, v in inputs.items()
    } == STAGE_INPUT_ARTIFACTS[component]


def test_data_flows_stage_to_stage(compiled):
    leaves = leaf_tasks(compiled.doc)

    def source(component: str, artifact: str) -> tuple[str, str]:
        ref = leaves[component][0]["inputs"]["artifacts"][artifact]
        if "taskOutputArtifact" in ref:
            out = ref["taskOutputArtifact"]
            return out["producerTask"], out["outputArtifactKey"]
        return "parent", ref["componentInputArtifact"]

    assert source("comp-clean", "table") == ("ingest", "table")
    assert source("comp-augment", "train") == ("clean", "train")
    assert source("comp-train", "train") == ("augment", "augmented")
    assert source("comp-train", "validation") == ("clean", "validation")
    assert source("comp-evaluate", "trained_model") == ("train", "trained_model")
    assert source("comp-evaluate", "test") == ("clean", "test")
    # inside the condition sub-DAGs the artifacts arrive through pipeline channels
    assert source("comp-tune", "train") == ("parent", "pipelinechannel--augment-augmented")
    assert source("comp-compress", "trained_model") == (
        "parent",
        "pipelinechannel--train-trained_model",
    )
    assert source("comp-skip-compression", "evaluation") == (
        "parent",
        "pipelinechannel--evaluate-evaluation",
    )
    assert source("comp-publish", "compressed_model") == (
        "parent",
        "pipelinechannel--compress-compressed_model",
    )
    assert source("comp-publish", "table") == ("parent", "pipelinechannel--ingest-table")
    # train takes whichever branch's best_hyperparameters ran (dsl.OneOf)
    hyper = leaves["comp-train"][0]["inputs"]["parameters"]["hyperparameters"]
    assert hyper["taskOutputParameter"]["producerTask"].startswith("condition-branches-")


def test_pipeline_outputs_are_typed(compiled):
    outputs = compiled.doc["root"]["outputDefinitions"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()} == {
        "dataset": "system.Dataset",
        "train_split": "system.Dataset",
        "augmented": "system.Dataset",
        "trained_model": "system.Model",
        "evaluation": "system.Artifact",
    }
    assert {k: v["parameterType"] for k, v in outputs["parameters"].items()} == {
        "tuning": "STRUCT",
        "best_hyperparameters": "STRUCT",
        "compression": "STRUCT",
    }


# ---------------------------------------------------------------- branches


def test_stages_outside_branches_run_unconditionally(compiled):
    leaves = leaf_tasks(compiled.doc)
    for ref in ("comp-ingest", "comp-clean", "comp-augment", "comp-train", "comp-evaluate"):
        task, ancestors = leaves[ref]
        assert ancestors == (), ref
        assert "triggerPolicy" not in task, ref


def test_tuning_runs_only_when_trials_are_requested(compiled):
    leaves = leaf_tasks(compiled.doc)
    tune_task, tune_up = leaves["comp-tune"]
    else_task, else_up = leaves["comp-default-hyperparameters"]
    assert conditions(tune_up) == [TUNING]
    assert conditions(else_up) == [f"!({TUNING})"]
    # If and Else are siblings in one condition-branches group
    assert tune_up[:-1] == else_up[:-1] and len(tune_up) == 2
    assert tune_up[-1]["taskInfo"]["name"] == "tuning-requested"
    assert else_up[-1]["taskInfo"]["name"] == "tuning-skipped"
    group = tune_up[0]
    assert group["inputs"]["parameters"]["pipelinechannel--tune_trials"] == {
        "componentInputParameter": "tune_trials"
    }


def test_compression_runs_only_when_the_quality_gate_passes(compiled):
    leaves = leaf_tasks(compiled.doc)
    _, pass_up = leaves["comp-compress"]
    _, fail_up = leaves["comp-skip-compression"]
    assert conditions(pass_up) == [GATE]
    assert conditions(fail_up) == [f"!({GATE})"]
    assert pass_up[:-1] == fail_up[:-1] and len(pass_up) == 2
    assert pass_up[-1]["taskInfo"]["name"] == "quality-gate-passed"
    assert fail_up[-1]["taskInfo"]["name"] == "quality-gate-failed"
    group = pass_up[0]
    # the gate value is evaluate's own `gate` output, and the group waits for evaluate
    assert group["inputs"]["parameters"]["pipelinechannel--evaluate-gate"] == {
        "taskOutputParameter": {"producerTask": "evaluate", "outputParameterKey": "gate"}
    }
    assert "evaluate" in group.get("dependentTasks", [])


def test_publishing_runs_after_compression_only_when_a_uri_is_given(compiled):
    leaves = leaf_tasks(compiled.doc)
    publish_task, up = leaf_tasks(compiled.doc)["comp-publish"]
    assert conditions(up) == [GATE, PUBLISH]
    assert up[-1]["taskInfo"]["name"] == "publish-requested"
    # publish sits next to compress inside the gate-passed branch
    assert up[:-1] == leaves["comp-compress"][1]
    assert "compress" in up[-1].get("dependentTasks", [])


def test_deploy_runs_after_publish_only_when_asked(compiled):
    leaves = leaf_tasks(compiled.doc)
    task, up = leaves["comp-deploy"]
    assert conditions(up) == [GATE, PUBLISH, DEPLOY]
    assert up[-1]["taskInfo"]["name"] == "deploy-requested"
    assert up[:-1] == leaves["comp-publish"][1]  # inside publish-requested
    assert "publish" in up[-1].get("dependentTasks", [])


# ---------------------------------------------------------------- parameters


def test_parameters_are_the_run_config_plus_fingerprint(compiled):
    params = compiled.doc["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {f.name for f in fields_of()} | {"fingerprint"}


def test_every_parameter_has_a_default_and_a_description(compiled):
    for name, p in compiled.doc["root"]["inputDefinitions"]["parameters"].items():
        assert "defaultValue" in p, f"{name} has no default"
        assert p.get("description", "").strip(), f"{name} has no description"
        assert p.get("isOptional") is True, name


def test_parameter_types_defaults_and_descriptions_match_run_config(compiled):
    defaults = RunConfig()
    proto_params = compiled.spec.root.input_definitions.parameters
    yaml_params = compiled.doc["root"]["inputDefinitions"]["parameters"]
    type_enum = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    for f in fields_of():
        expected: Any = defaults.flat()[f.name]
        kind = str(f.type)
        p = yaml_params[f.name]
        assert p["parameterType"] == PARAMETER_TYPES[kind], f.name
        assert type_enum.Name(proto_params[f.name].parameter_type) == PARAMETER_TYPES[kind]
        assert p["description"] == f.metadata["help"], f.name
        value = proto_params[f.name].default_value
        if kind == "bool":
            assert value.WhichOneof("kind") == "bool_value", f.name
            assert value.bool_value is expected, f.name
        elif kind == "str":
            assert value.WhichOneof("kind") == "string_value", f.name
            assert value.string_value == expected, f.name
        else:  # JSON numbers: an int default arrives as e.g. 64.0
            assert value.WhichOneof("kind") == "number_value", f.name
            assert value.number_value == expected, f.name
            if kind == "int":
                assert float(value.number_value).is_integer(), f.name
    # and the defaults, read back as KFP hands them over, are a valid RunConfig again
    back = {f.name: yaml_params[f.name]["defaultValue"] for f in fields_of()}
    assert RunConfig.from_flat(back) == defaults
    fingerprint = yaml_params["fingerprint"]
    assert fingerprint["parameterType"] == "STRING" and fingerprint["defaultValue"] == ""


def test_every_component_input_is_bound(compiled):
    """Each task passes every input its component declares (nothing left to a runtime default)."""
    doc = compiled.doc
    for name, task, _ in walk(doc):
        component = doc["components"][task["componentRef"]["name"]]
        declared = component.get("inputDefinitions", {})
        given = task.get("inputs", {})
        for section in ("parameters", "artifacts"):
            missing = set(declared.get(section, {})) - set(given.get(section, {}))
            assert not missing, f"task {name}: unbound {section} {sorted(missing)}"


# ---------------------------------------------------------------- reproducibility, CLI, secrets


@pytest.mark.parametrize("target", ["local", "cluster"])
def test_compiles_deterministically(tmp_path, target):
    for _ in range(3):  # retry only if the library source changed between the two compiles
        version = code_version()
        first = compile_pipeline(target, tmp_path / "a.yaml").read_bytes()
        second = compile_pipeline(target, tmp_path / "b.yaml").read_bytes()
        if code_version() == version:
            break
    assert_same(first, second)


@pytest.mark.integration  # a subprocess
def test_compiles_identically_in_another_process(tmp_path):
    """A fresh interpreter with another hash seed (set/dict order) writes the same bytes."""
    out = tmp_path / "other.yaml"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    for _ in range(3):  # retry only if the library source changed in between
        version = code_version()
        proc = subprocess.run(
            [sys.executable, "-m", "kubetrain.cli.main", "compile", "--output", str(out)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        here = compile_pipeline("local", tmp_path / "here.yaml").read_bytes()
        if code_version() == version:
            break
    assert_same(here, out.read_bytes())


def assert_same(first: bytes, second: bytes) -> None:
    if first != second:
        diff = [
            (a, b)
            for a, b in zip(first.decode().splitlines(), second.decode().splitlines(), strict=False)
            if a != b
        ]
        pytest.fail(f"compiles differ in {len(diff)} line(s), e.g. {diff[:3]}")


def test_cli_compile_writes_the_same_valid_yaml(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.yaml"
    for _ in range(3):  # retry only if the library source changed in between
        version = code_version()
        assert cli.main(["compile", "--output", str(out)]) == 0
        direct = compile_pipeline("local", tmp_path / "direct.yaml").read_bytes()
        if code_version() == version:
            break
    assert f"wrote {out}" in capsys.readouterr().out
    via_cli = compiled_at(out)  # strict parse, as above
    assert via_cli.spec.pipeline_info.name == PIPELINE_NAME
    assert version_of(via_cli) == version
    assert_same(direct, out.read_bytes())


@pytest.mark.parametrize("target", ["local", "cluster"])
def test_compile_leaks_no_credentials_from_the_environment(tmp_path, monkeypatch, target):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_SESSION_TOKEN)
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--target", target, "--output", str(out)]) == 0
    text = out.read_text()
    for secret in (FAKE_SECRET_KEY, FAKE_ACCESS_KEY, FAKE_SESSION_TOKEN[:24]):
        assert secret not in text
    assert "AWS_SESSION_TOKEN" not in text
    doc, platform = load_docs(out)
    for label, executor in doc["deploymentSpec"]["executors"].items():
        for env in executor["container"].get("env", []):
            assert not env["name"].startswith("AWS_") or env["name"] == "AWS_DEFAULT_REGION", (
                f"{label} sets {env['name']} as a plain value"
            )
    if target == "local":
        assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    else:  # the keys reach the pods only by reference to a Kubernetes Secret
        for label, config in platform["platforms"]["kubernetes"]["deploymentSpec"][
            "executors"
        ].items():
            refs = {k["envVar"] for s in config.get("secretAsEnv", []) for k in s["keyToEnv"]}
            assert refs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, label


def test_cluster_pipeline_has_an_exit_handler_that_cleans_up(compiled_cluster):
    """A failed or cancelled run's leftovers are deleted by a task that always runs."""
    root = compiled_cluster.doc["root"]["dag"]["tasks"]
    cleanup = root["cleanup"]
    assert cleanup["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert cleanup["dependentTasks"] == ["exit-handler-1"]
    assert "status" in cleanup["inputs"]["parameters"]


def test_cluster_pipeline_ttl_and_webhook_come_from_cluster_settings(tmp_path):
    import yaml

    from kubetrain.config.cluster import ClusterConfig

    path = compile_pipeline(
        "cluster", tmp_path / "c.yaml", ClusterConfig(ttl_seconds=3600, webhook_secret="run-hooks")
    )
    docs = list(yaml.safe_load_all(path.read_text()))
    spec, platform = docs[0], docs[1]
    assert spec["root"]["dag"]["tasks"]["cleanup"]["componentRef"]["name"] == "comp-cleanup"
    config = platform["platforms"]["kubernetes"]["pipelineConfig"]
    assert config["resourceTtlOnCompletion"] == 3600
    cleanup_env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][
        "exec-cleanup"
    ]["secretAsEnv"]
    assert any(
        s.get("secretName") == "run-hooks" or s.get("secretNameParameter") for s in cleanup_env
    )
