"""Register a published bundle in the Kubeflow Model Registry (``--registry-url``).

Why the ``model-registry`` client and not raw REST: it is the registry's own Python
client (the ``registry`` extra), so the calls follow the server's API version. One
model version per publish: registered model ``model_name``, version the bundle's
version (derived from the run id, so a retried publish finds its own version and
succeeds without a second one), one model artifact with the bundle's URI and format
(``onnx``, the file compress kept, with its opset), and as version metadata the test
metrics, the task and the KFP run id.

Credentials: the client reads the token from ``KF_PIPELINES_SA_TOKEN_PATH`` or the pod's
service account token (https only); nothing here logs a token, and a URL's user:password
part is removed before it is shown.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError

AUTHOR = "kubetrain"
#: Metrics copied into the version's metadata (the ones a bundle's metrics.json has).
METRICS = ("accuracy", "macro_f1", "roc_auc", "log_loss", "r2", "rmse", "mae")


def shown(url: str) -> str:
    """``url`` without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def metadata(metrics: dict[str, Any], run_id: str, bundle_uri: str) -> dict[str, Any]:
    """The version's metadata: numeric test metrics, the task, the run id, the bundle."""
    out: dict[str, Any] = {
        f"test_{k}": float(metrics[k]) for k in METRICS if isinstance(metrics.get(k), int | float)
    }
    out["task"] = str(metrics.get("task") or "classification")
    out["bundle_uri"] = bundle_uri
    if run_id:
        out["pipeline_run_id"] = run_id
    return out


def onnx_opset(path: Path) -> str:
    """The default-domain opset of ``model.onnx`` (the format version), "" if unknown."""
    import onnx

    if not path.is_file():
        return ""
    model = onnx.load(str(path), load_external_data=False)
    return next((str(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), "")


def register(
    registry_url: str,
    name: str,
    version: str,
    bundle_uri: str,
    bundle_dir: Path,
    metrics: dict[str, Any],
    run_id: str = "",
) -> dict[str, Any]:
    """Register ``bundle_uri`` as version ``version`` of model ``name``; returns what was
    registered. A version of that name that exists already (a retried publish) is kept."""
    try:
        from model_registry import ModelRegistry
        from model_registry.exceptions import StoreError
    except ImportError:
        raise KubetrainError(
            "--registry-url needs the registry extra (model-registry is not installed): "
            "pip install -c constraints.txt -e '.[registry]'"
        ) from None
    record = {
        "registry": shown(registry_url),
        "name": name,
        "version": version,
        "uri": bundle_uri,
        "format": "onnx",
        "format_version": onnx_opset(bundle_dir / "model.onnx"),
        "metadata": metadata(metrics, run_id, bundle_uri),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "User access token is missing" on plain http
            client = ModelRegistry(
                registry_url.rstrip("/"),
                author=AUTHOR,
                is_secure=registry_url.startswith("https"),
                async_runner=_run,
                log_level=logging.ERROR,  # its port warning is noise for an in-cluster service
            )
            client.register_model(
                name,
                bundle_uri,
                model_format_name=record["format"],
                model_format_version=record["format_version"],
                version=version,
                version_description=f"published by kubetrain run {run_id or '(no run id)'}",
                metadata=record["metadata"],
            )
    except StoreError as exc:
        if "already exists" not in str(exc):
            raise KubetrainError(
                f"the model registry at {record['registry']} refused {name} {version}: "
                f"{_first(exc)}"
            ) from None
        progress.log("publish", f"{name} {version} is already in the model registry")
        return {**record, "registered": False}
    except Exception as exc:  # noqa: BLE001 - the client raises its transport's errors as is
        raise KubetrainError(
            f"could not register {name} {version} in the model registry at "
            f"{record['registry']}: {type(exc).__name__}: {_first(exc)}; check --registry-url"
        ) from None
    progress.log(
        "publish", f"registered {name} {version} in the model registry at {record['registry']}"
    )
    return {**record, "registered": True}


def _run(coro: Any) -> Any:
    """Each client call in its own event loop: without a runner the client patches the
    process's asyncio globally (nest_asyncio), which a pipeline step must not do."""
    import asyncio

    return asyncio.run(coro)


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
