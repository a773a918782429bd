"""Where the images of an image data set are: a class-per-subfolder tree or a manifest.

Two forms, each local or under ``s3://``:

* a **folder** with one subfolder per class (``root/cat/001.png``); files
  deeper inside a class folder belong to it, files at the root (a README, a
  manifest) and hidden files are ignored. An ``s3://`` URI ending in ``/``, or
  without a file suffix, is such a folder;
* a **manifest**: a CSV or Parquet table with a ``path`` column (or ``image``,
  ``file``, ``filename``, ``filepath``) and a label column (``--label-column``,
  else ``label``/``class``/...). Paths are absolute, ``s3://`` URIs, or
  relative to the manifest's own folder. A table is taken for a manifest only
  when it has such a column *and* its first path ends in an image suffix, so an
  ordinary CSV whose column happens to be called ``file`` stays a table.

This module only finds the images (`ImageRef`: where, label) and reads their
bytes; `kubetrain.data.image_decode` turns bytes into pixels.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError, require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMNS = ("path", "image", "file", "filename", "filepath")
LABEL_COLUMNS = ("label", "class", "target", "y", "category")
#: Bytes of a CSV read to decide whether it is a manifest (header and first row).
_SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True)
class ImageRef:
    """One image: where its bytes are (local path or s3:// URI) and its label as text."""

    location: str
    label: str


def is_image_source(source: str, label_column: str = "") -> bool:
    """Whether `source` is an image folder or an image manifest (else: a table, a built-in)."""
    if storage.is_s3(source):
        try:
            storage.split_uri(source)
        except KubetrainError:
            return False  # malformed: the table reader names the fix
        suffix = posixpath.splitext(source.rstrip("/"))[1].lower()
        if source.endswith("/") or not suffix:
            return True
        return suffix in MANIFEST_SUFFIXES and _manifest_columns(source, label_column) is not None
    path = Path(source)
    if path.is_dir():
        return True
    if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
        return _manifest_columns(source, label_column) is not None
    return False


def list_images(source: str, label_column: str = "") -> list[ImageRef]:
    """Every image of the source with its label, in a stable order (class, then path)."""
    suffix = posixpath.splitext(source.rstrip("/"))[1].lower()
    if suffix in MANIFEST_SUFFIXES and not source.endswith("/"):
        refs = _from_manifest(source, label_column)
    elif storage.is_s3(source):
        refs = _from_s3_folder(source)
    else:
        refs = _from_local_folder(Path(source))
    require(
        bool(refs),
        f"{source} holds no images; give a folder with one subfolder per class of "
        f"{'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES[:4])} files, or a manifest "
        "(CSV/Parquet with path,label columns)",
    )
    return refs


def read_image_bytes(location: str) -> bytes:
    """The file's bytes. Local read errors propagate as OSError (the image is then
    reported as unreadable); S3 errors are one `KubetrainError` line and stop the run,
    since an unreachable store is no property of one image."""
    if storage.is_s3(location):
        return storage.read_bytes(location)
    return Path(location).read_bytes()


# --- folders ---------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_SUFFIXES


def _from_local_folder(root: Path) -> list[ImageRef]:
    require(
        root.is_dir(),
        f"dataset {root} not found; pass an image folder, a manifest, a .csv/.parquet/.npz "
        "file, an s3:// URI or a built-in dataset",
    )
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    require(
        bool(classes),
        f"{root} has no class subfolders; put each class's images in its own subfolder "
        "(root/cat/1.png, root/dog/2.png) or pass a manifest with path,label columns",
    )
    refs = []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image_name(p.name))
        refs += [ImageRef(str(p), folder.name) for p in files]
    return refs


def _from_s3_folder(source: str) -> list[ImageRef]:
    prefix = source.rstrip("/") + "/"
    refs = []
    for uri in storage.list_uris(prefix):
        relative = uri[len(prefix) :]
        label, sep, rest = relative.partition("/")
        if sep and rest and not label.startswith(".") and _is_image_name(rest):
            refs.append(ImageRef(uri, label))
    refs.sort(key=lambda r: (r.label, r.location))
    return refs


# --- manifests -------------------------------------------------------------------------


def _manifest_columns(source: str, label_column: str) -> tuple[str, str] | None:
    """(path column, label column) if the table is an image manifest, else None."""
    try:
        table = _first_rows(source)
    except (pa.ArrowException, OSError, ValueError, IndexError, KubetrainError):
        return None  # not readable as a table here: the table reader says why
    by_lower = {name.lower(): name for name in table.column_names}
    path_col = next((by_lower[c] for c in PATH_COLUMNS if c in by_lower), None)
    if label_column:
        label_col = label_column if label_column in table.column_names else None
    else:
        label_col = next((by_lower[c] for c in LABEL_COLUMNS if c in by_lower), None)
    if path_col is None or label_col is None or table.num_rows == 0:
        return None
    first = table.column(path_col)[0].as_py()
    return (path_col, label_col) if isinstance(first, str) and _is_image_name(first) else None


def _first_rows(source: str) -> pa.Table:
    """The first rows of a CSV (from its first 64 KiB) or Parquet (first row group)."""
    is_parquet = posixpath.splitext(source)[1].lower() in (".parquet", ".pq")
    if storage.is_s3(source):
        from kubetrain.data.shards import _s3  # pyarrow's S3 filesystem, configured once

        fs, path = _s3(source)
        opener = fs.open_input_file if is_parquet else fs.open_input_stream
        with opener(path) as f:
            data = f.read() if is_parquet else f.read(_SNIFF_BYTES)
    elif is_parquet:
        return pq.ParquetFile(source).read_row_group(0)
    else:
        with open(source, "rb") as f:
            data = f.read(_SNIFF_BYTES)
    if is_parquet:
        return pq.read_table(pa.BufferReader(data))
    head = data.rsplit(b"\n", 1)[0] if len(data) == _SNIFF_BYTES else data  # whole rows
    return pacsv.read_csv(io.BytesIO(head))


def _from_manifest(source: str, label_column: str) -> list[ImageRef]:
    columns = _manifest_columns(source, label_column)
    require(
        columns is not None,
        f"{source} is not an image manifest: it needs a path column "
        f"({', '.join(PATH_COLUMNS)}) whose values end in an image suffix, and a label "
        "column (--label-column, or one named label/class)",
    )
    assert columns is not None
    path_col, label_col = columns
    data = storage.read_bytes(source)
    if posixpath.splitext(source)[1].lower() == ".csv":
        table = pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                column_types={path_col: pa.string(), label_col: pa.string()},
                include_columns=[path_col, label_col],
            ),
        )
    else:
        table = pq.read_table(pa.BufferReader(data), columns=[path_col, label_col])
    base = source.rsplit("/", 1)[0] if storage.is_s3(source) else str(Path(source).parent)
    refs = []
    for i, (path, label) in enumerate(
        zip(table.column(path_col).to_pylist(), table.column(label_col).to_pylist(), strict=True)
    ):
        require(
            path is not None and label is not None and str(label).strip() != "",
            f"{source}: row {i + 1} has no {'path' if path is None else 'label'}; every row "
            "needs both",
        )
        refs.append(ImageRef(_resolve(base, str(path)), _label_text(label)))
    return refs


def _resolve(base: str, path: str) -> str:
    if storage.is_s3(path) or Path(path).is_absolute():
        return path
    if storage.is_s3(base):
        return f"{base}/{posixpath.normpath(path)}"
    return str(Path(base) / path)


def _label_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
