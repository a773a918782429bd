"""Checksums for artifact directories, so a damaged artifact fails loudly.

kfp.local's cache serves an artifact again as long as its files *exist*; a
file cut short (a full disk, a killed copy) would be handed to the next stage
and fail there with a low-level error (``BadZipFile``, ``unpickling stack
underflow``) that names neither the file nor the fix. Writers call
`write_checksums` as their last step; readers call `verify_checksums` first
and get one line naming the damaged file and the fix instead.

The manifest, ``sha256.json``, lists every other file's sha256 and size. It is
written last and atomically, so its presence means the files it lists were
complete when it was written. Directories without one (artifacts from before
it existed) are accepted unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kubetrain.core.errors import KubetrainError

MANIFEST = "sha256.json"
#: What the error tells the user to do: a damaged artifact usually came from the cache.
FIX = "re-run with --no-cache"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (checksums, fingerprints, object metadata)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_sha256 = sha256_file


def _files(root: Path) -> list[Path]:
    """Every regular file under `root` but the manifest and writers' temporaries."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
    )


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write ``sha256.json`` for the files now in `directory`; call it after the last write."""
    root = Path(directory)
    files = {
        p.relative_to(root).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in _files(root)
    }
    target = root / MANIFEST
    fd, name = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "files": files}, f, indent=2, sort_keys=True)
        os.chmod(name, 0o644)  # mkstemp makes 0600; artifacts are read by other users too
        os.replace(name, target)
    finally:
        if os.path.exists(name):
            os.unlink(name)
    return target


def verify_checksums(directory: str | os.PathLike) -> bool:
    """Check `directory` against its ``sha256.json``; False when it has none (old artifacts).

    Raises `KubetrainError` naming the first missing, truncated or altered file.
    Sizes are compared before hashes, so a truncated file is reported as such.
    """
    root = Path(directory)
    manifest = root / MANIFEST
    if not manifest.is_file():
        return False
    try:
        listed: dict[str, dict[str, Any]] = json.loads(manifest.read_text(encoding="utf-8"))[
            "files"
        ]
        expected = {
            name: (str(entry["sha256"]), int(entry["size"])) for name, entry in listed.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KubetrainError(f"{manifest} is damaged ({type(exc).__name__}); {FIX}") from None
    for name, (digest, size) in sorted(expected.items()):
        path = root / name
        if not path.is_file():
            raise KubetrainError(f"artifact file {path} is missing; {FIX}")
        actual = path.stat().st_size
        if actual != size:
            raise KubetrainError(
                f"artifact file {path} is damaged: {actual} bytes, expected "
                f"{size} (truncated or overwritten); {FIX}"
            )
        if _sha256(path) != digest:
            raise KubetrainError(
                f"artifact file {path} is damaged: its sha256 does not match {MANIFEST}; {FIX}"
            )
    return True
