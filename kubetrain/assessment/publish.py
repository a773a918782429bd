"""Publish: the model bundle a serving team picks up from object storage.

Layout of ``<publish_uri>/<model_name>/<version>/``::

    model.onnx          the compressed variant the compress stage kept
    pytorch/            weights.pt, spec.json, info.json (uncompressed model)
    metrics.json        test metrics and the quality gate verdict
    compression.json    every variant's size, latency and accuracy
    model_card.md       data lineage (source, content hash), hyperparameters, metrics
    preprocessor.json   clean's fitted preprocessor (`kubetrain.data.clean.Preprocessor`)
    schema.json         the raw columns, their types and classes (`kubetrain.data.raw_schema`)
    _SUCCESS            manifest written last by `storage.publish`: no half models

Readers go through `published_versions`, `latest_version` and `fetch_bundle`,
which only see versions with their `_SUCCESS` manifest: a publish killed
halfway never shows up as a model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetrain.core import progress, storage
from kubetrain.core.errors import KubetrainError, require
from kubetrain.core.markdown import md_text

# Run ids usable verbatim in a version name: one safe path segment, not too long.
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# Characters that start Markdown syntax anywhere in a line (links, images, code, emphasis,
# tables, strikethrough); '_' is handled apart, '<', '>' and '&' become HTML entities.
# Text shown verbatim inside a code span: nothing that could end the span or mean HTML.
_CODE_SAFE = re.compile(r"[\w.:/@=+,-]*")


def version_for(dataset_meta: dict[str, Any], now: datetime | None = None) -> str:
    """Sortable and traceable: UTC time plus the first 8 hex digits of the data hash."""
    now = now or datetime.now(UTC)
    return f"v{now:%Y%m%d-%H%M%S}-{str(dataset_meta.get('content_hash', 'nodata'))[:8]}"


def version_for_run(run_id: str) -> str:
    """The version a pipeline run publishes to: the same on every retry of the run, so a
    retried publish finishes or replaces its own earlier attempt instead of adding a
    second version. The run id is kept verbatim when it is a safe path segment (KFP's
    UUIDs are), else replaced by its hash."""
    run_id = run_id.strip()
    require(
        bool(run_id),
        "version_for_run needs a run id: pass the KFP run id "
        "(dsl.PIPELINE_JOB_ID_PLACEHOLDER) or use version_for",
    )
    token = (
        run_id
        if _SAFE_RUN_ID.fullmatch(run_id) and ".." not in run_id
        else hashlib.sha256(run_id.encode()).hexdigest()[:16]
    )
    return f"run-{token}"


def md_code(value: Any) -> str:
    """``value`` as a code span when it is plain (hashes, URIs, names), else as `md_text`:
    inside a code span escapes are shown literally, so only harmless text goes there."""
    text = str(value)
    return f"`{text}`" if _CODE_SAFE.fullmatch(text) else md_text(text)


def model_card(
    name: str,
    version: str,
    dataset: dict[str, Any],
    hyperparameters: dict[str, Any],
    evaluation: dict[str, Any],
    compression: dict[str, Any],
) -> str:
    """The bundle's human-readable summary (Markdown); every value that comes from data or
    settings goes through `md_text`/`md_code` (see there for why)."""
    metrics = {
        k: evaluation.get(k)
        for k in ("accuracy", "macro_f1", "roc_auc", "precision_macro", "recall_macro")
    }
    chosen = next(
        (v for v in compression.get("variants", []) if v["name"] == compression.get("chosen")), {}
    )
    lines = [
        f"# Model card: {md_text(name)} {md_text(version)}",
        "",
        "## Data",
        "",
        f"- source: {md_code(dataset.get('source'))}",
        f"- content sha256: {md_code(dataset.get('content_hash'))}",
        f"- rows: {md_text(dataset.get('rows'))}, features: {md_text(dataset.get('features'))}, "
        f"classes: {', '.join(map(md_text, dataset.get('classes', [])))}",
        "",
        "## Hyperparameters",
        "",
        *[f"- {md_text(k)}: {md_text(v)}" for k, v in sorted(hyperparameters.items())],
        "",
        "## Test metrics (held-out split)",
        "",
        *[
            f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {md_text(v)}"
            for k, v in metrics.items()
        ],
        f"- {md_text(evaluation.get('gate_reason', ''))}",
        "",
        "## Deployed artifact",
        "",
        f"- `model.onnx`: variant {md_code(compression.get('chosen'))}, "
        f"{md_text(chosen.get('bytes'))} bytes, test accuracy {md_text(chosen.get('accuracy'))}, "
        f"{md_text(chosen.get('cpu_latency_ms'))} ms/row (CPU)",
        "- input `features`: float32 (batch, features) after the clean stage's preprocessing "
        "(see `pytorch/info.json`); output `logits`: apply softmax for probabilities",
        "",
        "## Limits",
        "",
        "- Trained and tested on the split above only; check drift before reusing it on "
        "data from another source.",
    ]
    return "\n".join(lines) + "\n"


def build_bundle(
    trained_model: str,
    compressed_model: str,
    evaluation_path: str,
    dataset: dict[str, Any],
    hyperparameters: dict[str, Any],
    name: str,
    version: str,
    out: Path,
    table_path: str = "",
) -> None:
    """Fill ``out`` with the bundle; with ``table_path`` (the ingested table) also the
    preprocessor and raw schema that let `kubetrain serve` take raw rows."""
    compressed = Path(compressed_model)
    require(
        (compressed / "model.onnx").is_file(),
        f"{compressed} has no model.onnx; publish takes the compress stage's output",
    )
    evaluation = json.loads(Path(evaluation_path).read_text())
    compression = json.loads((compressed / "compression.json").read_text())
    shutil.copy2(compressed / "model.onnx", out / "model.onnx")
    shutil.copytree(trained_model, out / "pytorch", ignore=shutil.ignore_patterns("*.tmp"))
    keep = (
        "accuracy",
        "macro_f1",
        "roc_auc",
        "precision_macro",
        "recall_macro",
        "log_loss",
        "per_class",
        "confusion_matrix",
        "class_names",
        "gate",
        "gate_reason",
        "test_rows",
        "task",
        "r2",
        "rmse",
        "mae",
    )
    (out / "metrics.json").write_text(json.dumps({k: evaluation.get(k) for k in keep}, indent=2))
    (out / "compression.json").write_text(json.dumps(compression, indent=2))
    (out / "model_card.md").write_text(
        model_card(name, version, dataset, hyperparameters, evaluation, compression)
    )
    if table_path:
        from kubetrain.data import raw_schema as schema
        from kubetrain.training.models import read_info

        schema.write(out, table_path, read_info(trained_model).get("schema") or {})


def publish_model(
    trained_model: str,
    compressed_model: str,
    evaluation_path: str,
    dataset: dict[str, Any],
    hyperparameters: dict[str, Any],
    publish_uri: str,
    model_name: str,
    version: str | None = None,
    run_id: str = "",
    table_path: str = "",
) -> str:
    """Assemble the bundle and publish it atomically; returns the version's URI.

    ``run_id`` (the KFP run id) makes the publish retry-safe: the version is
    derived from it (unless ``version`` is given), and storage treats what an
    earlier attempt of the same run left at that version as its own: half
    written, it is removed and replaced; complete, it is kept or replaced.
    Without a run id the version is time-based and an existing one is refused.
    """
    version = version or (version_for_run(run_id) if run_id.strip() else version_for(dataset))
    dest = f"{publish_uri.rstrip('/')}/{model_name}/{version}/"
    with tempfile.TemporaryDirectory(prefix="kubetrain-bundle-") as tmp:
        build_bundle(
            trained_model,
            compressed_model,
            evaluation_path,
            dataset,
            hyperparameters,
            model_name,
            version,
            Path(tmp),
            table_path,
        )
        uri = storage.publish(tmp, dest, run_id=run_id.strip())
    progress.log("publish", f"model bundle published to {uri}")
    return uri


def published_versions(publish_uri: str, model_name: str) -> list[str]:
    """The model's complete versions (those with a ``_SUCCESS`` manifest), oldest first."""
    parent = f"{publish_uri.rstrip('/')}/{model_name}/"
    return [uri.rstrip("/").rsplit("/", 1)[-1] for uri in storage.published_prefixes(parent)]


def latest_version(publish_uri: str, model_name: str) -> str | None:
    """The most recently completed version, or None; half-published versions never count."""
    versions = published_versions(publish_uri, model_name)
    return versions[-1] if versions else None


def fetch_bundle(
    publish_uri: str, model_name: str, dest: str | Path, version: str | None = None
) -> Path:
    """Download a published bundle (``version``, default the latest) into ``dest``.

    Only complete versions are served: a version without ``_SUCCESS`` is
    refused, and the files are checked against the manifest.
    """
    version = version or latest_version(publish_uri, model_name)
    if version is None:
        raise KubetrainError(
            f"{publish_uri.rstrip('/')}/{model_name}/ holds no published "
            "version: publish one first, or check publish_uri and model_name"
        )
    return storage.download_published(f"{publish_uri.rstrip('/')}/{model_name}/{version}/", dest)
