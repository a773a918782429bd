"""Every KFP component, run for real by kfp.local's SubprocessRunner.

Each component runs as KFP would run it: its compiled command in a subprocess
(`python -m kfp.dsl.executor_main` with the executor input JSON), outputs
written to artifact directories and read back with their metadata. The stages
are chained on sklearn's digits, kept tiny (2 tuning trials of 1 epoch, 2
training epochs) so the file runs in about a minute on 2 CPUs.

kfp.local runs a single component only with parameter inputs ("Input artifacts
are not supported"), so a component that consumes artifacts runs as a
one-task pipeline whose inputs are `dsl.importer`s of the upstream artifacts:
still one subprocess, the same executor, the real artifact directories.

No `from __future__ import annotations` here: KFP reads the pipeline wrapper's
return annotation at decoration time.
"""

import contextlib
import html
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from kfp import dsl, local
from kfp.dsl.types import artifact_types
from kfp.local import config as local_config

from kubetrain.components.augment import augment
from kubetrain.components.clean import clean
from kubetrain.components.compress import compress, skip_compression
from kubetrain.components.evaluate import evaluate
from kubetrain.components.ingest import ingest
from kubetrain.components.publish import publish
from kubetrain.components.train import train
from kubetrain.components.tune import default_hyperparameters, tune
from kubetrain.config.settings import RunConfig, fields_of
from kubetrain.data.datasets import load_split, load_table
from kubetrain.training.loop import TUNABLE
from kubetrain.training.tuning import search_space

pytestmark = [
    pytest.mark.integration,  # every component runs in a kfp.local subprocess
    pytest.mark.filterwarnings(
        "ignore:You may be attemping to run a task that uses custom:RuntimeWarning"
    ),
]

D = RunConfig()
DIGITS_ROWS, DIGITS_FEATURES, DIGITS_CLASSES = 1797, 64, 10
# The MLP, not the CNN that model=auto picks for digits: a CNN epoch at the tuned
# widths costs ~5 s of CPU, and the components do not care which network it is
# (tests/test_cli_e2e.py runs the CNN through the whole pipeline).
MODEL = "mlp"
PARAMETER_TYPES = {
    "String": str,
    "Float": float,
    "Integer": int,
    "Boolean": bool,
    "Dict": dict,
    "List": list,
}
ALL_COMPONENTS = (
    ingest,
    clean,
    augment,
    tune,
    default_hyperparameters,
    train,
    evaluate,
    compress,
    skip_compression,
    publish,
)
# component parameters that are not RunConfig settings
NOT_SETTINGS = {
    "ingest": {"fingerprint"},
    "clean": {"cluster", "run_id"},
    "train": {"hyperparameters", "cluster", "run_id"},
    "publish": {"run_id"},
    "tune": {"cluster", "run_id"},
    "evaluate": {"tuning"},
}
#: The tune step's K-fold figures as the evaluate step receives them (`folds.summary`).
CV = {
    "folds": 2,
    "per_fold": [{"validation-accuracy": 0.9}, {"validation-accuracy": 0.8}],
    "validation-accuracy_mean": 0.85,
    "validation-accuracy_std": 0.05,
}
# what the local target passes for those that are not data (see pipelines/training.py)
LOCAL_EXTRAS = {"cluster": {}, "run_id": ""}


@contextlib.contextmanager
def kfp_local_session(root: Path):
    """local.init under `root` (outputs and workspace); restores the previous session after."""
    previous = local_config.LocalExecutionConfig.instance
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root / "outputs"),
        workspace_root=str(root / "workspace"),
        raise_on_error=True,
    )
    try:
        yield root / "outputs"
    finally:
        local_config.LocalExecutionConfig.instance = previous


@pytest.fixture(scope="module")
def kfp_local(tmp_path_factory):
    with kfp_local_session(tmp_path_factory.mktemp("kfp-local")) as outputs:
        yield outputs


def settings(component, **overrides) -> dict[str, Any]:
    """The RunConfig defaults for every parameter the component takes (and the local
    target's values for its non-setting switches), plus overrides."""
    names = [
        n for n, spec in component.component_spec.inputs.items() if spec.type in PARAMETER_TYPES
    ]
    defaults = D.flat()
    values = {n: defaults[n] for n in names if n in defaults}
    values.update({n: LOCAL_EXTRAS[n] for n in names if n in LOCAL_EXTRAS})
    return {**values, **overrides}


def run(component, **arguments) -> dict[str, Any]:
    """Run one component through kfp.local; its outputs by name (artifacts and values)."""
    inputs = {k: v for k, v in arguments.items() if isinstance(v, artifact_types.Artifact)}
    if not inputs:
        return dict(component(**arguments).outputs)
    params = {k: v for k, v in arguments.items() if k not in inputs}
    fields = []
    for name, spec in component.component_spec.outputs.items():
        kind = (
            PARAMETER_TYPES.get(spec.type)
            or artifact_types._SCHEMA_TITLE_TO_TYPE[spec.type.split("@")[0]]
        )
        fields.append((name, kind))
    Outputs = NamedTuple("Outputs", fields)

    def one_task() -> Outputs:
        imported = {
            name: dsl.importer(
                artifact_uri=art.uri, artifact_class=type(art), metadata=dict(art.metadata)
            ).output
            for name, art in inputs.items()
        }
        task = component(**params, **imported)
        return Outputs(**{name: task.outputs[name] for name, _ in fields})

    pipeline = dsl.pipeline(name=f"only-{component.name}")(one_task)
    return dict(pipeline().outputs)


def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def counts_total(counts: dict[str, float]) -> int:
    return int(sum(counts.values()))


# ---------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def ingested(kfp_local):
    return run(ingest, fingerprint="", **settings(ingest, dataset="digits", label_column=""))


@pytest.fixture(scope="module")
def cleaned(ingested):
    return run(clean, table=ingested["table"], **settings(clean))


@pytest.fixture(scope="module")
def augmented(cleaned):
    return run(augment, train=cleaned["train"], **settings(augment))


@pytest.fixture(scope="module")
def tuned(augmented, cleaned):
    return run(
        tune,
        train=augmented["augmented"],
        validation=cleaned["validation"],
        **settings(tune, model=MODEL, tune_trials=2, tune_epochs=1),
    )


@pytest.fixture(scope="module")
def defaults(kfp_local):
    return run(default_hyperparameters, **settings(default_hyperparameters))


@pytest.fixture(scope="module")
def trained(augmented, cleaned, tuned):
    return run(
        train,
        train=augmented["augmented"],
        validation=cleaned["validation"],
        hyperparameters=tuned["best_hyperparameters"],
        **settings(train, model=MODEL, epochs=2),
    )


@pytest.fixture(scope="module")
def evaluated(trained, cleaned):
    return run(
        evaluate,
        trained_model=trained["trained_model"],
        test=cleaned["test"],
        tuning={"meta": {"cv": CV}},
        **{**settings(evaluate), "min_accuracy": 0.5},
    )


@pytest.fixture(scope="module")
def compressed(trained, cleaned):
    return run(
        compress,
        trained_model=trained["trained_model"],
        test=cleaned["test"],
        train=cleaned["train"],
        validation=cleaned["validation"],
        **settings(compress),
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory, ingested, trained, evaluated, compressed):
    folder = tmp_path_factory.mktemp("published")
    uri = run(
        publish,
        trained_model=trained["trained_model"],
        compressed_model=compressed["compressed_model"],
        evaluation=evaluated["evaluation"],
        table=ingested["table"],
        **settings(publish, publish_uri=str(folder)),
    )["Output"]
    return folder, uri


@pytest.fixture(scope="module")
def weak_evaluated(cleaned):
    """A model that cannot have learned anything (1 epoch at lr 1e-7), judged at 0.99."""
    weak = run(
        train,
        train=cleaned["train"],
        validation=cleaned["validation"],
        hyperparameters={"learning_rate": 1e-7, "width": 8},
        **settings(train, model=MODEL, epochs=1),
    )
    return weak, run(
        evaluate,
        trained_model=weak["trained_model"],
        test=cleaned["test"],
        tuning={"meta": {}},
        **{**settings(evaluate), "min_accuracy": 0.99},
    )


@pytest.fixture(scope="module")
def skipped(weak_evaluated):
    return run(skip_compression, evaluation=weak_evaluated[1]["evaluation"])


# ---------------------------------------------------------------- signatures


@pytest.mark.parametrize("component", ALL_COMPONENTS, ids=lambda c: c.name)
def test_component_parameters_are_run_config_settings(component):
    """Each component parameter is a RunConfig field of the same type (or a known extra)."""
    fields = {f.name: str(f.type) for f in fields_of()}
    extras = NOT_SETTINGS.get(component.name, set())
    for name, spec in component.component_spec.inputs.items():
        if spec.type not in PARAMETER_TYPES or name in extras:
            continue
        assert name in fields, f"{component.name}.{name} is not a RunConfig setting"
        assert PARAMETER_TYPES[spec.type].__name__ == fields[name], f"{component.name}.{name}"


# ---------------------------------------------------------------- ingest


def test_ingest_writes_a_validated_table(ingested):
    dataset, profile = ingested["table"], ingested["profile"]
    assert isinstance(dataset, artifact_types.Dataset)
    assert isinstance(profile, artifact_types.Markdown)
    assert (Path(dataset.path) / "part-00000.parquet").is_file()
    frame, _ = load_table(dataset.path)  # every part, checked against meta.json
    meta = dataset.metadata
    assert len(frame) == meta["rows"] == DIGITS_ROWS
    assert meta["features"] == DIGITS_FEATURES and meta["kind"] == "image"
    assert len(meta["classes"]) == DIGITS_CLASSES
    assert counts_total(meta["class_counts"]) == DIGITS_ROWS
    assert meta["source"] == "digits" and len(meta["content_hash"]) == 64
    text = Path(profile.path).read_text()
    assert "digits" in text and "Class counts" in text


# ---------------------------------------------------------------- clean


def test_clean_splits_stratified_and_scaled(cleaned, ingested):
    rows_in = ingested["table"].metadata["rows"]
    sizes = {}
    for name in ("train", "validation", "test"):
        split = cleaned[name]
        assert isinstance(split, artifact_types.Dataset)
        assert (Path(split.path) / "_manifest.json").is_file()
        X, y, schema = load_split(split.path)
        assert len(X) == len(y) == split.metadata["rows"], name
        assert X.reshape(len(X), -1).shape[1] == DIGITS_FEATURES
        assert np.isfinite(X).all()
        assert set(np.unique(y)) == set(range(DIGITS_CLASSES)), name
        assert len(split.metadata["class_counts"]) == DIGITS_CLASSES
        assert counts_total(split.metadata["class_counts"]) == len(y)
        sizes[name] = len(y)
    meta = cleaned["train"].metadata
    assert sum(sizes.values()) == rows_in - meta["duplicates_removed"]
    assert sizes["test"] == pytest.approx(D.flat()["test_fraction"] * rows_in, abs=3)
    assert sizes["validation"] == pytest.approx(D.flat()["val_fraction"] * rows_in, abs=3)
    assert meta["scaling"] == D.flat()["scaling"] and meta["impute"] == D.flat()["impute"]
    # standard scaling fitted on the training split (images: one scalar for all pixels)
    X_train, _, _ = load_split(cleaned["train"].path)
    assert abs(float(X_train.mean())) < 1e-3 and abs(float(X_train.std()) - 1) < 1e-3
    assert Path(cleaned["report"].path).read_text().strip()


# ---------------------------------------------------------------- augment


def test_augment_records_the_image_policy_and_copies_nothing(augmented, cleaned):
    out = augmented["augmented"]
    meta = out.metadata
    X, y, schema = load_split(out.path)
    before = cleaned["train"].metadata["rows"]
    assert meta["rows_before"] == meta["rows_after"] == before == len(X) == len(y)
    assert meta["copies"] == 0  # digits are images: augmented per batch in training
    assert counts_total(meta["class_counts_after"]) == len(y)
    assert schema.extra["augment_policy"] == meta["policy"]
    assert meta["policy"]["flip_horizontal"] is False  # one-channel digits are not mirrored
    X_train, _, _ = load_split(cleaned["train"].path)
    np.testing.assert_array_equal(X, X_train)
    assert "data:image/png;base64," in Path(augmented["report"].path).read_text()


# ---------------------------------------------------------------- tune


def test_tune_returns_the_best_hyperparameters_in_the_search_space(tuned):
    best = tuned["best_hyperparameters"]
    assert isinstance(best, dict) and set(best) == set(TUNABLE)
    space = {p.name: p for p in search_space()}
    for name, value in best.items():
        p = space[name]
        if p.type == "categorical":
            assert str(int(value)) in p.values, name
        else:
            assert p.min <= value <= p.max, name
    # kfp.local hands ints inside dicts back as floats; they stay integral
    for name in ("width", "batch_size"):
        assert float(best[name]).is_integer(), name
    tuning = tuned["tuning"]
    assert tuning["meta"]["trials"] == 2 and len(tuning["trials"]) == 2
    assert tuning["meta"]["algorithm"] == D.flat()["tune_algorithm"]
    assert tuning["meta"]["best_hyperparameters"] == best
    completed = [t for t in tuning["trials"] if t["state"] == "COMPLETE"]
    assert completed and all(0 <= t["value"] <= 1 for t in completed)
    assert max(t["value"] for t in completed) >= 0.5  # 1 epoch on digits learns something


def test_tune_writes_trials_and_report(tuned):
    trials = tuned["trials"]
    assert read_json(trials.path)["meta"]["trials"] == 2
    assert (
        trials.metadata["trials"] == 2
        and trials.metadata["objective"] == "validation-accuracy"  # auto, for classes
    )
    assert "Hyperparameter tuning" in Path(tuned["report"].path).read_text()


def test_default_hyperparameters_are_the_configured_values(defaults):
    best = defaults["best_hyperparameters"]
    assert best == {k: D.flat()[k] for k in TUNABLE}
    assert defaults["tuning"]["meta"]["algorithm"] == "none"
    assert defaults["tuning"]["trials"] == []
    assert read_json(defaults["trials"].path)["meta"]["trials"] == 0
    assert "tune_trials=0" in Path(defaults["report"].path).read_text()


# ---------------------------------------------------------------- train


def test_train_saves_a_model_with_the_tuned_values(trained, tuned):
    model = trained["trained_model"]
    assert isinstance(model, artifact_types.Model)
    files = {p.name for p in Path(model.path).iterdir()}
    assert {"weights.pt", "spec.json", "info.json"} <= files
    meta = model.metadata
    assert 1 <= meta["epochs_run"] <= 2 and meta["best_epoch"] <= meta["epochs_run"]
    assert meta["val_accuracy"] >= 0.8
    assert meta["arch"] == MODEL
    used = meta["hyperparameters"]
    for name, value in tuned["best_hyperparameters"].items():
        assert used[name] == pytest.approx(value), name
    metrics = trained["metrics"]
    assert metrics.metadata["val_accuracy"] == pytest.approx(meta["val_accuracy"])
    assert read_json(metrics.path)["val_accuracy"] == pytest.approx(meta["val_accuracy"])
    assert list(Path(trained["checkpoint"].path).iterdir())
    assert "Learning curves" in Path(trained["report"].path).read_text()


# ---------------------------------------------------------------- evaluate


def test_evaluate_passes_a_trained_model(evaluated):
    assert evaluated["gate"] == "pass"
    accuracy = evaluated["score"]
    assert 0.8 <= accuracy <= 1.0
    metrics = evaluated["metrics"].metadata
    assert metrics["accuracy"] == pytest.approx(accuracy)
    for name in ("macro_f1", "precision_macro", "recall_macro", "roc_auc"):
        assert 0 <= metrics[name] <= 1, name
    assert read_json(evaluated["metrics"].path) == metrics
    # the tune step's K-fold figures reach the UI and the report beside the test's
    assert metrics["cv_validation-accuracy_mean"] == CV["validation-accuracy_mean"]
    assert metrics["cv_validation-accuracy_std"] == CV["validation-accuracy_std"]
    report = Path(evaluated["report"].path).read_text()
    assert "Cross-validation (best trial)" in report and "0.8500 ± 0.0500" in report
    assert read_json(evaluated["evaluation"].path)["cross_validation"] == CV
    classification = evaluated["classification"].metadata
    matrix = classification["confusionMatrix"]
    assert len(matrix["rows"]) == DIGITS_CLASSES
    assert classification["confidenceMetrics"]
    evaluation = evaluated["evaluation"]
    assert evaluation.metadata == {"gate": "pass", "accuracy": accuracy}
    record = read_json(evaluation.path)
    assert record["gate"] == "pass" and record["accuracy"] == pytest.approx(accuracy)
    assert "Confusion matrix" in Path(evaluated["report"].path).read_text()


def test_evaluate_fails_the_gate_for_a_weak_model(weak_evaluated):
    weak, verdict = weak_evaluated
    assert weak["trained_model"].metadata["hyperparameters"]["learning_rate"] == 1e-7
    assert verdict["gate"] == "fail"
    assert verdict["score"] < 0.99
    assert verdict["evaluation"].metadata["gate"] == "fail"
    assert "0.99" in read_json(verdict["evaluation"].path)["gate_reason"]


# ---------------------------------------------------------------- compress


def test_compress_exports_an_onnx_model_within_budget(compressed, evaluated, cleaned):
    import onnxruntime as ort

    model = compressed["compressed_model"]
    root = Path(model.path)
    assert (root / "model.onnx").is_file() and (root / "compression.json").is_file()
    summary = compressed["summary"]
    assert summary["uri"] == model.uri
    assert summary["chosen"] in {v["name"] for v in summary["variants"]}
    assert model.metadata == {"format": "onnx", "variant": summary["chosen"], "file": "model.onnx"}
    assert summary["baseline_accuracy"] == pytest.approx(evaluated["score"])
    metrics = compressed["metrics"].metadata
    assert metrics["bytes"] > 0 and metrics["cpu_latency_ms"] > 0
    assert metrics["accuracy"] >= summary["baseline_accuracy"] - D.flat()["accuracy_budget"] - 1e-9
    assert read_json(compressed["metrics"].path) == metrics
    # the exported file is the model the metrics describe
    X, y, _ = load_split(cleaned["test"].path)
    session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(
        [summary["output_name"]], {summary["input_name"]: X.reshape(len(X), -1).astype(np.float32)}
    )[0]
    assert math.isclose(
        float((logits.argmax(axis=1) == y).mean()), metrics["accuracy"], abs_tol=1e-9
    )
    assert "Compression" in Path(compressed["report"].path).read_text()


def test_skip_compression_records_the_gate_reason(skipped, weak_evaluated):
    reason = read_json(weak_evaluated[1]["evaluation"].path)["gate_reason"]
    model = skipped["compressed_model"]
    record = read_json(str(Path(model.path) / "compression.json"))
    assert record["skipped"] is True and record["reason"] == reason
    assert not (Path(model.path) / "model.onnx").exists()
    assert model.metadata == {"skipped": True, "reason": reason}
    summary = skipped["summary"]
    assert summary["skipped"] is True and summary["chosen"] is None
    assert summary["uri"] == model.uri
    assert read_json(skipped["metrics"].path) == {"skipped": 1}
    assert html.escape(reason) in Path(skipped["report"].path).read_text()


# ---------------------------------------------------------------- publish


def test_publish_writes_a_complete_bundle(published, tuned, evaluated, ingested):
    folder, uri = published
    assert isinstance(uri, str) and uri.endswith("/")
    bundle = Path(uri)
    assert bundle.parent.parent == folder and bundle.parent.name == D.publish.model_name
    # the version names the data it was trained on
    assert bundle.name.endswith(ingested["table"].metadata["content_hash"][:8])
    for name in (
        "model.onnx",
        "metrics.json",
        "compression.json",
        "model_card.md",
        "_SUCCESS",
        "pytorch/weights.pt",
    ):
        assert (bundle / name).is_file(), name
    listed = {entry["path"] for entry in read_json(str(bundle / "_SUCCESS"))["files"]}
    on_disk = {
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != "_SUCCESS"
    }
    assert listed == on_disk
    metrics = read_json(str(bundle / "metrics.json"))
    assert metrics["gate"] == "pass"
    assert metrics["accuracy"] == pytest.approx(evaluated["score"])
    card = (bundle / "model_card.md").read_text()
    assert ingested["table"].metadata["content_hash"] in card
    best = tuned["best_hyperparameters"]
    assert f"- width: {int(best['width'])}" in card  # ints are ints again in the card


# ---------------------------------------------------------------- failure


def test_a_failing_component_raises_with_the_kubetrain_error(tmp_path, capfd, kfp_local):
    with kfp_local_session(tmp_path) as outputs, pytest.raises(RuntimeError, match="FAILURE"):
        ingest(fingerprint="", **settings(ingest, dataset="missing.csv", label_column=""))
    log = capfd.readouterr()
    text = log.out + log.err
    assert "KubetrainError: dataset missing.csv not found" in text
    assert "pass an existing .csv/.parquet/.npz file" in text
    written = [p for p in outputs.rglob("*") if p.is_file()]
    assert not [p for p in written if "dataset" in p.parts], written
    assert not list(outputs.rglob("part-*.parquet"))
