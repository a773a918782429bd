"""Publish: the model bundle a serving team picks up from object storage.

Layout of ``<publish_uri>/<model_name>/<version>/``::

    model.onnx          the compressed variant the compress stage kept
    pytorch/            weights.pt, spec.json, info.json (uncompressed model)
    metrics.json        test metrics and the quality gate verdict
    compression.json    every variant's size, latency and accuracy
    model_card.md       data lineage (source, content hash), hyperparameters, metrics
    _SUCCESS            manifest written last by `storage.publish`: no half models
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetrain.core import progress

from kubetrain.core import storage
from kubetrain.core.errors import require


def version_for(dataset_meta: dict[str, Any], now: datetime | None = None) -> str:
    """Sortable and traceable: UTC time plus the first 8 hex digits of the data hash."""
    now = now or datetime.now(timezone.utc)
    return f"v{now:%Y%m%d-%H%M%S}-{str(dataset_meta.get('content_hash', 'nodata'))[:8]}"


def model_card(name: str, version: str, dataset: dict[str, Any], hyperparameters: dict[str, Any],
               evaluation: dict[str, Any], compression: dict[str, Any]) -> str:
    metrics = {k: evaluation.get(k) for k in ("accuracy", "macro_f1", "roc_auc",
                                                "precision_macro", "recall_macro")}
    chosen = next((v for v in compression.get("variants", [])
                   if v["name"] == compression.get("chosen")), {})
    lines = [
        f"# Model card: {name} {version}", "",
        "## Data", "",
        f"- source: `{dataset.get('source')}`",
        f"- content sha256: `{dataset.get('content_hash')}`",
        f"- rows: {dataset.get('rows')}, features: {dataset.get('features')}, "
        f"classes: {', '.join(map(str, dataset.get('classes', [])))}", "",
        "## Hyperparameters", "",
        *[f"- {k}: {v}" for k, v in sorted(hyperparameters.items())], "",
        "## Test metrics (held-out split)", "",
        *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
          for k, v in metrics.items()],
        f"- {evaluation.get('gate_reason', '')}", "",
        "## Deployed artifact", "",
        f"- `model.onnx`: variant `{compression.get('chosen')}`, {chosen.get('bytes')} bytes, "
        f"test accuracy {chosen.get('accuracy')}, {chosen.get('cpu_latency_ms')} ms/row (CPU)",
        "- input `features`: float32 (batch, features) after the clean stage's preprocessing "
        "(see `pytorch/info.json`); output `logits`: apply softmax for probabilities", "",
        "## Limits", "",
        "- Trained and tested on the split above only; check drift before reusing it on "
        "data from another source.",
    ]
    return "\n".join(lines) + "\n"


def build_bundle(trained_model: str, compressed_model: str, evaluation_path: str,
                 dataset: dict[str, Any], hyperparameters: dict[str, Any], name: str,
                 version: str, out: Path) -> None:
    compressed = Path(compressed_model)
    require((compressed / "model.onnx").is_file(),
            f"{compressed} has no model.onnx; publish takes the compress stage's output")
    evaluation = json.loads(Path(evaluation_path).read_text())
    compression = json.loads((compressed / "compression.json").read_text())
    shutil.copy2(compressed / "model.onnx", out / "model.onnx")
    shutil.copytree(trained_model, out / "pytorch", ignore=shutil.ignore_patterns("*.tmp"))
    keep = ("accuracy", "macro_f1", "roc_auc", "precision_macro", "recall_macro", "log_loss",
            "per_class", "confusion_matrix", "class_names", "gate", "gate_reason", "test_rows")
    (out / "metrics.json").write_text(json.dumps({k: evaluation.get(k) for k in keep}, indent=2))
    (out / "compression.json").write_text(json.dumps(compression, indent=2))
    (out / "model_card.md").write_text(model_card(name, version, dataset, hyperparameters,
                                                  evaluation, compression))


def publish_model(trained_model: str, compressed_model: str, evaluation_path: str,
                  dataset: dict[str, Any], hyperparameters: dict[str, Any], publish_uri: str,
                  model_name: str, version: str | None = None) -> str:
    """Assemble the bundle and publish it atomically; returns the version's URI."""
    version = version or version_for(dataset)
    dest = f"{publish_uri.rstrip('/')}/{model_name}/{version}/"
    with tempfile.TemporaryDirectory(prefix="kubetrain-bundle-") as tmp:
        build_bundle(trained_model, compressed_model, evaluation_path, dataset,
                     hyperparameters, model_name, version, Path(tmp))
        uri = storage.publish(tmp, dest)
    progress.log("publish", f"model bundle published to {uri}")
    return uri
