"""Find a published bundle, local or on S3, and open it as a folder on this machine.

Why only published ones: `kubetrain.assessment.publish` writes ``_SUCCESS`` last, with
every file's size and sha256; a bundle without it is half written, and one whose files
differ from it is damaged. Either is refused in one line instead of being served.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import sha256_file


@dataclass(frozen=True)
class Bundle:
    """A complete bundle on local disk: its folder and the name and version it was
    published as (``<publish_uri>/<model_name>/<version>/``)."""

    root: Path
    name: str
    version: str
    source: str

    def json(self, name: str) -> dict[str, Any]:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else {}


def open_bundle(source: str, cache_dir: str | Path | None = None) -> Bundle:
    """The bundle at ``source`` (a folder or an ``s3://`` prefix), checked against its
    ``_SUCCESS`` manifest; an S3 bundle is downloaded into ``cache_dir`` (default: a new
    temporary folder, removed with the process's temp files)."""
    source = str(source).strip()
    if not source:
        raise KubetrainError("--bundle is empty; pass a bundle folder or s3:// prefix")
    parts = source.rstrip("/").split("/")
    name, version = (parts[-2] if len(parts) > 1 else parts[-1]), parts[-1]
    if storage.is_s3(source):
        dest = Path(cache_dir or tempfile.mkdtemp(prefix="kubetrain-serve-")) / "bundle"
        root = storage.download_published(source.rstrip("/") + "/", dest)
        return Bundle(root, name, version, source)
    root = Path(source)
    if not root.is_dir():
        raise KubetrainError(f"bundle {source} is not a folder; pass a published bundle")
    _verify(root)
    return Bundle(root.resolve(), name, version, source)


def _verify(root: Path) -> None:
    """Every file the manifest lists is there with its size and sha256."""
    manifest = root / storage.MANIFEST
    if not manifest.is_file():
        raise KubetrainError(
            f"{root} has no {storage.MANIFEST}: not a published bundle (or its publish did "
            "not finish); serve a version that `kubetrain run --publish-uri` completed"
        )
    for entry in json.loads(manifest.read_text())["files"]:
        path = root / entry["path"]
        if not path.is_file() or (path.stat().st_size, sha256_file(path)) != (
            entry["size"],
            entry[storage.SHA256],
        ):
            raise KubetrainError(
                f"{path} is missing or does not match the bundle's {storage.MANIFEST} "
                "(size or sha256 differ): publish that version again"
            )
