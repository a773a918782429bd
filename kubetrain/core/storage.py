"""Object storage: ``s3://`` URIs and local paths behind one set of functions.

Stages read inputs and write outputs through this module, so the same code runs
on a laptop (local paths) and in a cluster (AWS S3, MinIO, Ceph, SeaweedFS)
without branching at the call site. Three guarantees, and why:

* Integrity: every upload stores the SHA-256 of the content in the object's
  metadata (``x-amz-meta-sha256``) and every download checks it, so a
  truncated, overwritten or corrupted object fails loudly instead of being
  trained on or served.
* Atomic publish: S3 cannot write many objects at once, so ``publish`` stages
  files under a temporary sibling prefix, copies them into place server-side
  and writes the ``_SUCCESS`` manifest last. Readers that check
  ``is_published`` never see half a model.
* One-line errors: bad credentials, a missing bucket or key and an unreachable
  endpoint raise ``KubetrainError`` naming the problem and the fix. Secrets
  never appear in messages or logs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import boto3
import botocore.exceptions as bex
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from kubetrain.data.datasets import sha256_file
from kubetrain.core.errors import KubetrainError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
MiB = 1024 * 1024
#: Files at least this big move in parallel parts (multipart upload/copy/download).
MULTIPART_THRESHOLD = 64 * MiB
#: S3's smallest allowed part (all but the last).
MIN_PART_SIZE = 5 * MiB
#: Object written last by `publish`; its presence is what "published" means.
MANIFEST = "_SUCCESS"
#: Metadata name of the content hash; S3 sends it as the ``x-amz-meta-sha256`` header.
SHA256 = "sha256"

_SCHEME = "s3://"
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Lenient on purpose: Ceph and old AWS buckets may hold capitals and underscores.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,62}")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                     "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_CREDENTIAL_FIX = ("check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                   "(and AWS_SESSION_TOKEN for temporary credentials)")


# --- URIs and settings --------------------------------------------------------

def is_s3(uri: PathLike) -> bool:
    """True for ``s3://`` URIs; anything else is a local path."""
    return str(uri).startswith(_SCHEME)


def object_uri(uri: PathLike) -> str:
    """An artifact URI that pods on the cluster can read: s3:// (KFP's minio:// is the
    same store, reached through S3_ENDPOINT_URL); a local path is refused."""
    text = str(uri)
    if text.startswith("minio://"):
        text = "s3://" + text[len("minio://"):]
    if not is_s3(text):
        raise KubetrainError(f"{str(uri)!r} is not in object storage; pods on the cluster read "
                             "and write s3:// URIs only (set pipeline_root to s3://BUCKET/PREFIX)")
    return text


def local_dir(uri: PathLike, dest: PathLike) -> Path:
    """A local folder holding the directory at ``uri``: downloaded into ``dest`` when it is
    an s3:// prefix, the path itself otherwise (pods read upstream artifacts this way)."""
    if is_s3(uri):
        return download(str(uri).rstrip("/") + "/", dest)
    return Path(uri)


def split_uri(uri: PathLike) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key is empty for the bucket root."""
    text = str(uri)
    if not is_s3(text):
        raise KubetrainError(f"{text!r} is not an s3:// URI: write it as s3://BUCKET/KEY")
    bucket, _, key = text[len(_SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise KubetrainError(
            f"{text!r} has no valid bucket name: write it as s3://BUCKET/KEY "
            "(bucket: 3-63 letters, digits, '.', '-' or '_')")
    return bucket, key


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to talk to S3: the one place environment variables are read.

    Empty credentials fall through to boto3's own chain (pod identity, instance
    profile, ~/.aws), which is what in-cluster jobs usually want. Secrets are
    left out of ``repr`` so settings can be logged.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Read the standard AWS variables plus ``S3_ENDPOINT_URL`` (MinIO, Ceph, SeaweedFS)."""
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            return next((env[n].strip() for n in names if env.get(n, "").strip()), None)

        endpoint = get("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise KubetrainError(f"S3_ENDPOINT_URL={endpoint!r} has no scheme: "
                                 f"write it as http://{endpoint} or https://{endpoint}")
        attempts = get("AWS_MAX_ATTEMPTS") or "5"
        if not attempts.isdigit() or int(attempts) < 1:
            raise KubetrainError(f"AWS_MAX_ATTEMPTS={attempts!r} is not a positive integer: "
                                 "set it to e.g. 5 or unset it")
        return cls(endpoint_url=endpoint, region=get("AWS_DEFAULT_REGION", "AWS_REGION"),
                   access_key=get("AWS_ACCESS_KEY_ID"), secret_key=get("AWS_SECRET_ACCESS_KEY"),
                   session_token=get("AWS_SESSION_TOKEN"), max_attempts=int(attempts))


def client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for ``settings`` (default: from the environment), cached per settings.

    Retries use botocore's "standard" mode (backoff on throttling, 5xx and
    dropped connections) and timeouts are finite, so a flaky network slows a
    job down instead of failing or hanging it. A custom endpoint gets
    path-style addressing because MinIO/Ceph/SeaweedFS buckets are not DNS names.
    """
    return _client(settings or S3Settings.from_env())


@functools.lru_cache(maxsize=8)
def _client(settings: S3Settings) -> Any:
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=10, read_timeout=120,
        s3={"addressing_style": "path"} if settings.endpoint_url else None)
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token, config=config)


# --- public operations ----------------------------------------------------------

def upload(local_path: PathLike, uri: PathLike, metadata: Mapping[str, str] | None = None,
           *, multipart_threshold: int = MULTIPART_THRESHOLD) -> str:
    """Copy a local file or directory tree to ``uri`` and return the destination.

    A directory lands under ``uri`` as a prefix with its relative paths; a file
    lands at ``uri`` itself, or under it when ``uri`` ends with '/'. Every
    object gets ``metadata`` plus the content's sha256.
    """
    src = _local(local_path)
    if not src.exists():
        raise KubetrainError(f"{src} does not exist: check the local path to upload")
    if not is_s3(uri):
        dest = _local(uri)
        if src.is_file() and str(uri).endswith(("/", os.sep)):
            dest = dest / src.name
        _copy_local(src, dest)
        return str(dest)
    bucket, key = split_uri(uri)
    s3 = client()
    with _s3_errors(s3, uri):
        for path, rel in _files(src):
            dest_key = _join(key, rel) if src.is_dir() or not key or key.endswith("/") else key
            _put_file(s3, path, bucket, dest_key, metadata, multipart_threshold)
    return str(uri)


def download(uri: PathLike, dest_path: PathLike, *,
             multipart_threshold: int = MULTIPART_THRESHOLD) -> Path:
    """Fetch ``uri`` to ``dest_path`` and return the local path, verifying every sha256.

    ``s3://b/prefix/`` (or a key that exists only as a prefix) is a directory:
    each object under it lands below ``dest_path`` at its relative path. A
    single object downloaded onto an existing directory lands inside it. Files
    are written under a temporary name and renamed once verified, so the
    destination never holds a partial or corrupt file.
    """
    dest = _local(dest_path)
    if not is_s3(uri):
        src = _local(uri)
        if not src.exists():
            raise KubetrainError(f"{src} does not exist: check the path to copy from")
        if src.is_file() and dest.is_dir():
            dest = dest / src.name
        _copy_local(src, dest)
        return dest
    bucket, key = split_uri(uri)
    s3 = client()
    with _s3_errors(s3, uri):
        if key and not key.endswith("/"):
            if _head(s3, bucket, key) is not None:
                if dest.is_dir():
                    dest = dest / PurePosixPath(key).name
                _get_file(s3, bucket, key, dest, multipart_threshold)
                return dest
            key += "/"
        keys = [k for k in _list_keys(s3, bucket, key) if not k.endswith("/")]
        if not keys:
            raise _missing(s3, bucket, str(uri))
        for k in keys:
            _get_file(s3, bucket, k, dest / _safe_relative(k[len(key):], uri), multipart_threshold)
    return dest


def read_bytes(uri: PathLike) -> bytes:
    """The content of one object or local file, verified against its stored sha256."""
    if not is_s3(uri):
        path = _local(uri)
        with _local_errors(path):
            return path.read_bytes()
    bucket, key = split_uri(uri)
    _require_key(key, uri)
    s3 = client()
    with _s3_errors(s3, uri):
        response = s3.get_object(Bucket=bucket, Key=key)
        data = response["Body"].read()
    _verify(str(uri), hashlib.sha256(data).hexdigest(), response.get("Metadata", {}).get(SHA256))
    return data


def write_bytes(uri: PathLike, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
    """Store ``data`` at ``uri`` (with its sha256 in the metadata); local writes are atomic."""
    if not is_s3(uri):
        path = _local(uri)
        with _local_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return
    bucket, key = split_uri(uri)
    _require_key(key, uri)
    s3 = client()
    with _s3_errors(s3, uri):
        s3.put_object(Bucket=bucket, Key=key, Body=data,
                      Metadata=_metadata(metadata, hashlib.sha256(data).hexdigest()))


def exists(uri: PathLike) -> bool:
    """Whether ``uri`` names an object, a non-empty prefix ("directory") or a local path.

    ``s3://b/k`` counts if the object ``k`` exists or anything lies under ``k/``;
    ``s3://b/`` asks whether the bucket exists.
    """
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = split_uri(uri)
    s3 = client()
    with _s3_errors(s3, uri):
        if not key:
            try:
                s3.head_bucket(Bucket=bucket)
                return True
            except bex.ClientError as e:
                if _code(e) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                    return False
                raise
        if not key.endswith("/") and _head(s3, bucket, key) is not None:
            return True
        try:
            return bool(_list_keys(s3, bucket, key.rstrip("/") + "/", limit=1))
        except bex.ClientError as e:
            if _code(e) == "NoSuchBucket":
                return False
            raise


def list_uris(prefix_uri: PathLike) -> list[str]:
    """Sorted URIs of everything under ``prefix_uri``.

    S3: every object whose key starts with the prefix (S3's own meaning, so
    ``s3://b/model`` also matches ``model.pt``). Local: every file under the
    directory (or the file itself); nothing for a missing path.
    """
    if not is_s3(prefix_uri):
        path = _local(prefix_uri)
        if path.is_file():
            return [str(path)]
        return [str(p) for p, _ in _files(path)] if path.is_dir() else []
    bucket, key = split_uri(prefix_uri)
    s3 = client()
    with _s3_errors(s3, prefix_uri):
        return [f"{_SCHEME}{bucket}/{k}" for k in _list_keys(s3, bucket, key)]


def is_published(prefix_uri: PathLike) -> bool:
    """Whether ``publish`` finished writing ``prefix_uri`` (its manifest exists)."""
    return exists(_join(_as_dir(str(prefix_uri)), MANIFEST))


def read_manifest(prefix_uri: PathLike) -> list[dict[str, Any]]:
    """The files (``path``, ``size``, ``sha256``) of a published prefix."""
    uri = _join(_as_dir(str(prefix_uri)), MANIFEST)
    if not exists(uri):
        raise KubetrainError(f"{prefix_uri} is not published (no {MANIFEST}): publish it "
                             "first, or wait for the running publish to finish")
    return json.loads(read_bytes(uri))["files"]


def publish(local_dir: PathLike, dest_prefix_uri: PathLike, *, overwrite: bool = False,
            multipart_threshold: int = MULTIPART_THRESHOLD) -> str:
    """Copy ``local_dir`` to ``dest_prefix_uri`` so readers see all of it or nothing.

    S3 has no multi-object transaction, so: upload everything under a
    temporary sibling prefix (``.staging-<name>-<uuid>/``), copy each object
    server-side to its final key, write the ``_SUCCESS`` manifest (JSON: each
    file's path, size and sha256) last, then delete the staging keys. If
    anything fails, what was written is deleted again. Overwriting first
    removes the old manifest, so the prefix reads as unpublished until the new
    version is complete. Returns the destination prefix (ending in '/').
    """
    src = _local(local_dir)
    if not src.is_dir():
        raise KubetrainError(f"{src} is not a directory: publish takes the directory to upload")
    files = _files(src)
    if not files:
        raise KubetrainError(f"{src} is empty: there is nothing to publish")
    if any(rel == MANIFEST for _, rel in files):
        raise KubetrainError(f"{src / MANIFEST} clashes with the publish manifest: "
                             "rename or remove it")
    dest = _as_dir(str(dest_prefix_uri))
    if not is_s3(dest):
        _publish_local(files, _local(dest), overwrite)
        return dest
    bucket, key = split_uri(dest)
    if not key:
        raise KubetrainError(f"{dest} is a bucket root: publish under a prefix, "
                             f"e.g. {dest}models/v1/")
    parent, _, name = key.rstrip("/").rpartition("/")
    staging = _join(parent, f".staging-{name}-{uuid.uuid4().hex[:12]}/")
    s3 = client()
    with _s3_errors(s3, dest):
        existing = _list_keys(s3, bucket, key)
        if existing and not overwrite:
            state = "a published version" if key + MANIFEST in existing else "unpublished leftovers"
            raise KubetrainError(f"{dest} already holds {len(existing)} objects ({state}): publish "
                                 "to a new prefix (e.g. a new version) or pass overwrite=True")
        written: list[str] = []
        try:
            entries = [{"path": rel, **_put_file(s3, path, bucket, staging + rel, None,
                                                 multipart_threshold)} for path, rel in files]
            if key + MANIFEST in existing:
                _delete(s3, bucket, [key + MANIFEST])
            for entry in entries:
                written.append(key + entry["path"])
                _copy(s3, bucket, staging + entry["path"], written[-1], entry["sha256"],
                      multipart_threshold)
            _delete(s3, bucket, sorted(set(existing) - set(written) - {key + MANIFEST}))
            manifest = json.dumps({"files": entries}, indent=1).encode()
            s3.put_object(Bucket=bucket, Key=key + MANIFEST, Body=manifest,
                          ContentType="application/json",
                          Metadata=_metadata(None, hashlib.sha256(manifest).hexdigest()))
        except BaseException:
            with contextlib.suppress(Exception):
                _delete(s3, bucket, written)
            raise
        finally:
            with contextlib.suppress(Exception):
                _delete(s3, bucket, _list_keys(s3, bucket, staging))
    log.info("published %d files to %s", len(files), dest)
    return dest


# --- helpers --------------------------------------------------------------------

def _local(path: PathLike) -> Path:
    """A local path, refusing URIs of schemes this module does not speak."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if _OTHER_SCHEME.match(text):
        raise KubetrainError(f"{text!r} uses an unsupported scheme: use s3://BUCKET/KEY "
                             "or a local path")
    return Path(text)


def _as_dir(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def _join(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix.rstrip("/") else rel


def _require_key(key: str, uri: PathLike) -> None:
    if not key or key.endswith("/"):
        raise KubetrainError(f"{uri} names a bucket or prefix, not an object: "
                             "add the object key, e.g. s3://BUCKET/path/file")


def _files(root: Path) -> list[tuple[Path, str]]:
    """(path, relative posix path) of every file under ``root`` (or ``root`` itself), sorted."""
    if root.is_file():
        return [(root, root.name)]
    return sorted(((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()),
                  key=lambda item: item[1])


def _safe_relative(rel: str, uri: PathLike) -> str:
    """Refuse object keys that would escape the download directory (``../``)."""
    if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
        raise KubetrainError(f"{uri} holds the key {rel!r}, which would land outside the "
                             "destination directory: rename that object")
    return rel


def _metadata(extra: Mapping[str, str] | None, digest: str) -> dict[str, str]:
    return {**{str(k): str(v) for k, v in (extra or {}).items()}, SHA256: digest}


def _verify(uri: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise KubetrainError(f"{uri} is corrupt: its content has sha256 {actual[:16]}... but its "
                             f"metadata says {expected[:16]}...; upload it again")


def _transfer_config(threshold: int) -> TransferConfig:
    return TransferConfig(multipart_threshold=threshold,
                          multipart_chunksize=max(threshold, MIN_PART_SIZE))


@contextlib.contextmanager
def _local_errors(path: Path) -> Iterator[None]:
    """Turn OS errors on local files into one-line KubetrainErrors."""
    try:
        yield
    except FileNotFoundError as e:
        raise KubetrainError(f"{e.filename or path} does not exist: check the path") from e
    except OSError as e:
        raise KubetrainError(f"cannot access {e.filename or path} ({e.strerror}): check the "
                             "path and its permissions") from e


def _put_file(s3: Any, path: Path, bucket: str, key: str, metadata: Mapping[str, str] | None,
              threshold: int) -> dict[str, Any]:
    """Upload one file with its sha256 in the metadata; return its size and sha256."""
    with _local_errors(path):
        size, digest = path.stat().st_size, sha256_file(path)
        s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": _metadata(metadata, digest)},
                       Config=_transfer_config(threshold))
    log.debug("uploaded %s to s3://%s/%s (%d bytes)", path, bucket, key, size)
    return {"size": size, SHA256: digest}


def _get_file(s3: Any, bucket: str, key: str, dest: Path, threshold: int) -> None:
    """Download one object to ``dest`` via a temporary file, checking its sha256 first."""
    expected = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(SHA256)
    with _local_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            s3.download_file(bucket, key, str(tmp), Config=_transfer_config(threshold))
            _verify(f"{_SCHEME}{bucket}/{key}", sha256_file(tmp), expected)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    log.debug("downloaded s3://%s/%s to %s", bucket, key, dest)


def _copy(s3: Any, bucket: str, src_key: str, dest_key: str, digest: str, threshold: int) -> None:
    """Server-side copy, restating the sha256 so it survives multipart copies on any server."""
    s3.copy({"Bucket": bucket, "Key": src_key}, bucket, dest_key,
            ExtraArgs={"Metadata": _metadata(None, digest), "MetadataDirective": "REPLACE"},
            Config=_transfer_config(threshold))


def _head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None if there is no such key."""
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except bex.ClientError as e:
        if _code(e) in _NOT_FOUND_CODES:
            return None
        raise


def _list_keys(s3: Any, bucket: str, prefix: str, limit: int | None = None) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
        if limit is not None and len(keys) >= limit:
            break
    return sorted(keys)


def _delete(s3: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[start:start + 1000]]
        errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get(
            "Errors", [])
        if errors:
            raise KubetrainError(f"could not delete s3://{bucket}/{errors[0]['Key']} "
                                 f"({errors[0].get('Code')}): check delete permission "
                                 "on the bucket")


def _publish_local(files: list[tuple[Path, str]], dest: Path, overwrite: bool) -> None:
    """Local publish: build a sibling directory, then swap it in with one rename."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise KubetrainError(f"{dest} already exists and is not empty: publish to a new "
                             "directory or pass overwrite=True")
    with _local_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".staging-{dest.name}-", dir=dest.parent))
        old = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex[:8]}")
        try:
            entries = []
            for path, rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / rel)
                entries.append({"path": rel, "size": (tmp / rel).stat().st_size,
                                SHA256: sha256_file(tmp / rel)})
            (tmp / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if dest.exists():  # else the swap failed midway: keep the old version
                shutil.rmtree(old, ignore_errors=True)


def _copy_local(src: Path, dest: Path) -> None:
    with _local_errors(src):
        if dest.exists() and dest.resolve() == src.resolve():
            return
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


# --- error translation ------------------------------------------------------------

def _code(error: bex.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _missing(s3: Any, bucket: str, uri: str) -> KubetrainError:
    """Say whether the bucket or only the key is missing (a 404 on HEAD does not tell)."""
    try:
        s3.head_bucket(Bucket=bucket)
    except bex.ClientError as e:
        if _code(e) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
            return _no_bucket(s3, bucket)
    return KubetrainError(f"{uri} does not exist: check the URI (list_uris on its prefix "
                          "shows what is there)")


def _no_bucket(s3: Any, bucket: str) -> KubetrainError:
    return KubetrainError(f"bucket {bucket!r} does not exist at {s3.meta.endpoint_url}: create "
                          "it or fix the bucket name in the URI")


@contextlib.contextmanager
def _s3_errors(s3: Any, uri: PathLike) -> Iterator[None]:
    """Turn boto failures into one-line KubetrainErrors that name the fix (never a secret)."""
    endpoint = s3.meta.endpoint_url
    try:
        yield
    except S3UploadFailedError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, bex.ClientError):
            raise _translate(cause, s3, str(uri)) from e
        raise KubetrainError(f"upload to {uri} failed ({e}): check the endpoint and retry") from e
    except bex.ClientError as e:
        raise _translate(e, s3, str(uri)) from e
    except bex.SSLError as e:
        raise KubetrainError(f"TLS with S3 endpoint {endpoint} failed: check the https URL and "
                             "the CA bundle (AWS_CA_BUNDLE)") from e
    except (bex.ConnectionError, bex.HTTPClientError, RetriesExceededError) as e:
        raise KubetrainError(f"cannot reach S3 endpoint {endpoint} ({type(e).__name__}): check "
                             "S3_ENDPOINT_URL and that the server is up and reachable") from e
    except bex.NoCredentialsError as e:
        raise KubetrainError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or give the pod an IAM role)") from e
    except bex.PartialCredentialsError as e:
        raise KubetrainError(f"incomplete S3 credentials ({e.kwargs.get('cred_var')} is "
                             f"missing): {_CREDENTIAL_FIX}") from e
    except bex.NoRegionError as e:
        raise KubetrainError("no S3 region configured: set AWS_DEFAULT_REGION "
                             "(e.g. us-east-1)") from e


def _translate(error: bex.ClientError, s3: Any, uri: str) -> KubetrainError:
    code = _code(error)
    endpoint = s3.meta.endpoint_url
    if code in _CREDENTIAL_CODES:
        return KubetrainError(f"S3 rejected the credentials for endpoint {endpoint} ({code}): "
                              f"{_CREDENTIAL_FIX}")
    if code == "NoSuchBucket":
        return _no_bucket(s3, split_uri(uri)[0])
    if code in _NOT_FOUND_CODES:
        return _missing(s3, split_uri(uri)[0], uri)
    if code in _FORBIDDEN_CODES:
        return KubetrainError(f"S3 at {endpoint} denied access to {uri} ({code}): "
                              f"{_CREDENTIAL_FIX} and that they are allowed to use this bucket")
    message = error.response.get("Error", {}).get("Message", "")
    return KubetrainError(f"S3 request for {uri} failed at {endpoint} ({code}: {message}): "
                          "check the URI and the server's log")
