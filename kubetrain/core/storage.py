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
  and writes the ``_SUCCESS`` manifest last. Readers (``is_published``,
  ``published_prefixes``, ``download_published``) only ever consider prefixes
  with a manifest, so a publish killed halfway is invisible to them. A killed
  publish cannot clean up after itself, so the next one does: staging prefixes
  and incomplete multipart uploads that are stale (``STAGING_STALE_AFTER_S``)
  or belong to the same pipeline run are removed first, and a retry of the
  same run (``run_id``) replaces its own half-written destination.
* Riding out outages: a dropped connection, a timeout, throttling or a 5xx is
  retried with capped exponential backoff until ``RETRY_BUDGET_S`` has passed
  since the call began, so an S3 server restart costs seconds, not the run.
* One-line errors: bad credentials, a missing bucket or key and an unreachable
  endpoint raise ``KubetrainError`` naming the problem and the fix. Secrets
  never appear in messages or logs: credentials inside an endpoint URL
  (``http://user:secret@host``) are shown as ``http://***@host``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
import botocore.exceptions as bex
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import sha256_file

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
#: Metadata name (and manifest field) of the publishing run's tag: how a retry of the same
#: run recognises the half-written destination it may replace.
RUN_TAG = "kubetrain-run"
#: How long a failing S3 call keeps retrying (connection errors, timeouts, throttling,
#: 5xx), in seconds from its first attempt: long enough to ride out a server restart.
RETRY_BUDGET_S = 60.0
#: First and longest pause between retries (exponential in between, with jitter).
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 4.0
#: Finite socket timeouts, so a hung server counts against the budget instead of hanging
#: the job; a read may wait on a slow server-side copy, hence the longer read timeout.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
#: Default attempt cap per call; the time budget is what normally stops retrying.
DEFAULT_MAX_ATTEMPTS = 100
#: Attempts for the best-effort cleanup after a failed publish: it must not add minutes
#: to a failure; whatever it leaves, the next publish's garbage collection removes.
CLEANUP_MAX_ATTEMPTS = 2
#: Staging prefixes and incomplete multipart uploads older than this are leftovers of a
#: killed publish (no live publish runs this long) and are removed by the next publish.
STAGING_STALE_AFTER_S = 3600.0

_SCHEME = "s3://"
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Lenient on purpose: Ceph and old AWS buckets may hold capitals and underscores.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,62}")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_CREDENTIAL_FIX = (
    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN for temporary credentials)"
)
# Errors worth retrying besides dropped connections: throttling and server-side trouble.
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_DEADLINE = "kubetrain_retry_deadline"  # key in botocore's per-call request context
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_STAGING = ".staging-"


# --- URIs and settings --------------------------------------------------------


def is_s3(uri: PathLike) -> bool:
    """True for ``s3://`` URIs; anything else is a local path."""
    return str(uri).startswith(_SCHEME)


def object_uri(uri: PathLike) -> str:
    """An artifact URI that pods on the cluster can read: s3:// (KFP's minio:// is the
    same store, reached through S3_ENDPOINT_URL); a local path is refused."""
    text = str(uri)
    if text.startswith("minio://"):
        text = "s3://" + text[len("minio://") :]
    if not is_s3(text):
        raise KubetrainError(
            f"{str(uri)!r} is not in object storage; pods on the cluster read "
            "and write s3:// URIs only (set pipeline_root to s3://BUCKET/PREFIX)"
        )
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
    bucket, _, key = text[len(_SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise KubetrainError(
            f"{text!r} has no valid bucket name: write it as s3://BUCKET/KEY "
            "(bucket: 3-63 letters, digits, '.', '-' or '_')"
        )
    # S3 keys are plain strings: '..' does not go up, '//' makes an empty folder name and
    # servers differ on whether they refuse such keys (400) or store them literally.
    segments = key.split("/")[:-1] if key.endswith("/") else key.split("/")
    if key and any(part in ("", ".", "..") for part in segments):
        clean = posixpath.normpath(key.lstrip("/"))
        fix = (
            f"write it as {_SCHEME}{bucket}/{clean}{'/' if key.endswith('/') else ''}"
            if clean not in (".", "..") and not clean.startswith("../")
            else "remove them from the key"
        )
        raise KubetrainError(
            f"{text!r} has an empty, '.' or '..' segment in its key, which S3 "
            f"does not resolve like a path: {fix}"
        )
    return bucket, key


def redact(text: object) -> str:
    """``text`` with credentials removed: ``user:secret@`` in URLs becomes ``***@`` and the
    values of the AWS credential variables become ``***``.

    Endpoints and botocore's exception texts can carry credentials (people put
    MinIO users into S3_ENDPOINT_URL); messages and logs end up in CI and pod
    logs, so everything this module prints goes through here.
    """
    out = _USERINFO.sub(r"\1***@", str(text))
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name, "").strip()
        if len(value) >= 8:  # shorter values would blank out ordinary words
            out = out.replace(value, "***")
    return out


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
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __repr__(self) -> str:
        """Without secrets or keys (endpoint credentials redacted), so settings can be logged."""
        endpoint = redact(self.endpoint_url) if self.endpoint_url else None
        return (
            f"S3Settings(endpoint_url={endpoint!r}, region={self.region!r}, "
            f"access_key={'***' if self.access_key else None!r}, "
            f"max_attempts={self.max_attempts})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Read the standard AWS variables plus ``S3_ENDPOINT_URL`` (MinIO, Ceph, SeaweedFS)."""
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            return next((env[n].strip() for n in names if env.get(n, "").strip()), None)

        endpoint = get("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            shown = redact("http://" + endpoint)[len("http://") :]
            raise KubetrainError(
                f"S3_ENDPOINT_URL={shown!r} has no scheme: "
                f"write it as http://{shown} or https://{shown}"
            )
        attempts = get("AWS_MAX_ATTEMPTS") or str(DEFAULT_MAX_ATTEMPTS)
        if not attempts.isdigit() or int(attempts) < 1:
            raise KubetrainError(
                f"AWS_MAX_ATTEMPTS={attempts!r} is not a positive integer: "
                "set it to e.g. 5 or unset it"
            )
        return cls(
            endpoint_url=endpoint,
            region=get("AWS_DEFAULT_REGION", "AWS_REGION"),
            access_key=get("AWS_ACCESS_KEY_ID"),
            secret_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            max_attempts=int(attempts),
        )


def client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for ``settings`` (default: from the environment), cached per settings.

    Every call, including the part uploads and copies boto3's transfer manager
    makes, retries dropped connections, timeouts, throttling and 5xx with
    capped exponential backoff until ``RETRY_BUDGET_S`` seconds have passed
    since its first attempt (or ``max_attempts`` ran out): botocore's own
    count-based retries spend 5 attempts in a few seconds, which a server
    restart outlasts. Timeouts are finite, so a hung server fails the call
    instead of the job hanging. A custom endpoint gets path-style addressing
    because MinIO/Ceph/SeaweedFS buckets are not DNS names.
    """
    return _client(settings or S3Settings.from_env())


@functools.lru_cache(maxsize=8)
def _client(settings: S3Settings) -> Any:
    # botocore's retry handler gets a single attempt, so ours alone decides on retries.
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=config,
    )
    s3.meta.events.register("before-call.s3", _start_retry_clock, unique_id="kubetrain-retry-clock")
    s3.meta.events.register(
        "needs-retry.s3",
        functools.partial(_retry_delay, settings.max_attempts),
        unique_id="kubetrain-retry-budget",
    )
    return s3


def _start_retry_clock(context: dict[str, Any], **_: Any) -> None:
    """Stamp each call with its retry deadline (read at call time, so tests can shrink it)."""
    context.setdefault(_DEADLINE, time.monotonic() + RETRY_BUDGET_S)


def _retry_delay(
    max_attempts: int,
    attempts: int,
    response: Any,
    caught_exception: Any,
    request_dict: dict[str, Any],
    operation: Any,
    **_: Any,
) -> float | None:
    """botocore ``needs-retry`` hook: seconds to wait before the next attempt, None to give up."""
    reason = _transient(response, caught_exception)
    if reason is None or attempts >= max_attempts:
        return None
    deadline = request_dict.get("context", {}).get(_DEADLINE)
    remaining = (deadline if deadline is not None else time.monotonic()) - time.monotonic()
    if remaining <= 0:
        return None
    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempts - 1))
    delay = min(remaining, delay * random.uniform(0.5, 1.0))
    log.warning(
        "S3 %s failed (%s); retry %d in %.2f s (giving up %.0f s after the first try)",
        operation.name,
        redact(reason),
        attempts,
        delay,
        RETRY_BUDGET_S,
    )
    return delay


def _transient(response: Any, caught_exception: Any) -> str | None:
    """Why a failed attempt is worth repeating, or None when repeating cannot help."""
    if caught_exception is not None:
        retryable = isinstance(
            caught_exception, (bex.ConnectionError, bex.HTTPClientError)
        ) and not isinstance(caught_exception, bex.SSLError)
        return f"{type(caught_exception).__name__}: {caught_exception}" if retryable else None
    if not response:
        return None
    http, parsed = response
    code = str((parsed or {}).get("Error", {}).get("Code", ""))
    status = getattr(http, "status_code", 0)
    if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
        return f"HTTP {status} {code}".strip()
    return None


# --- public operations ----------------------------------------------------------


def upload(
    local_path: PathLike,
    uri: PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    multipart_threshold: int = MULTIPART_THRESHOLD,
) -> str:
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


def download(
    uri: PathLike, dest_path: PathLike, *, multipart_threshold: int = MULTIPART_THRESHOLD
) -> Path:
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
            _get_file(s3, bucket, k, dest / _safe_relative(k[len(key) :], uri), multipart_threshold)
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
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            Metadata=_metadata(metadata, hashlib.sha256(data).hexdigest()),
        )


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


def delete_objects(prefix_uri: PathLike, names: list[str]) -> None:
    """Delete the objects ``names`` (relative keys) under the s3:// ``prefix_uri``; missing
    ones are fine. Batched, and unlike pyarrow's S3FileSystem it leaves no directory marker
    behind (`kubetrain.data.shards` writes with pyarrow and cleans up with this)."""
    bucket, key = split_uri(prefix_uri)
    s3 = client()
    with _s3_errors(s3, prefix_uri):
        _delete(s3, bucket, [_join(key, name) for name in names])


def is_published(prefix_uri: PathLike) -> bool:
    """Whether ``publish`` finished writing ``prefix_uri`` (its manifest exists)."""
    return exists(_join(_as_dir(str(prefix_uri)), MANIFEST))


def read_manifest(prefix_uri: PathLike) -> list[dict[str, Any]]:
    """The files (``path``, ``size``, ``sha256``) of a published prefix."""
    uri = _join(_as_dir(str(prefix_uri)), MANIFEST)
    if not exists(uri):
        raise KubetrainError(
            f"{prefix_uri} is not published (no {MANIFEST}): publish it "
            "first, or wait for the running publish to finish"
        )
    return json.loads(read_bytes(uri))["files"]


def published_prefixes(parent_uri: PathLike) -> list[str]:
    """The published prefixes directly under ``parent_uri`` (e.g. a model's versions),
    oldest manifest first; each ends in '/'.

    Only prefixes whose ``_SUCCESS`` manifest exists count, so versions that a
    killed or running publish left half-written are never listed. Ordered by
    when the manifest was written (S3's LastModified, local mtime) because
    version names need not sort by time (run-derived names do not).
    """
    parent = _as_dir(str(parent_uri))
    if not is_s3(parent):
        root = _local(parent)
        found = [
            (p.stat().st_mtime, p.name)
            for p in (root.iterdir() if root.is_dir() else [])
            if not p.name.startswith(".") and (p / MANIFEST).is_file()
        ]
        return [f"{parent}{name}/" for _, name in sorted(found)]
    bucket, key = split_uri(parent)
    s3 = client()
    pattern = re.compile(re.escape(key) + r"([^/.][^/]*)/" + re.escape(MANIFEST))
    found = []
    with _s3_errors(s3, parent):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                match = pattern.fullmatch(obj["Key"])
                if match:
                    found.append((obj["LastModified"], match.group(1)))
    return [f"{parent}{name}/" for _, name in sorted(found)]


def download_published(
    prefix_uri: PathLike, dest_path: PathLike, *, multipart_threshold: int = MULTIPART_THRESHOLD
) -> Path:
    """Download a published prefix: exactly the files its manifest lists, plus the manifest.

    Refuses a prefix without ``_SUCCESS`` (half-written by a killed publish) and
    checks every file against the manifest's size and sha256, so what lands
    in ``dest_path`` is the complete version the publisher wrote, never stray
    or leftover objects. The files are collected in a temporary sibling
    directory and moved into place at the end: an interrupted download leaves
    ``dest_path`` untouched.
    """
    prefix = _as_dir(str(prefix_uri))
    dest = _local(dest_path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise KubetrainError(
            f"{dest} already exists and is not empty: download the published "
            f"version {prefix} into a new or empty directory"
        )
    manifest = read_manifest(prefix)
    with _local_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".download-{dest.name}-", dir=dest.parent))
        try:
            for entry in manifest:
                rel = _safe_relative(entry["path"], prefix)
                local = download(
                    _join(prefix, rel), tmp / rel, multipart_threshold=multipart_threshold
                )
                if (local.stat().st_size, sha256_file(local)) != (entry["size"], entry[SHA256]):
                    raise KubetrainError(
                        f"{_join(prefix, rel)} does not match the {MANIFEST} "
                        f"manifest of {prefix} (size or sha256 differ): "
                        "publish that version again"
                    )
            download(_join(prefix, MANIFEST), tmp / MANIFEST)
            tmp.chmod(0o755)  # mkdtemp makes 0700
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def publish(
    local_dir: PathLike,
    dest_prefix_uri: PathLike,
    *,
    overwrite: bool = False,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    run_id: str = "",
) -> str:
    """Copy ``local_dir`` to ``dest_prefix_uri`` so readers see all of it or nothing.

    S3 has no multi-object transaction, so: upload everything under a
    temporary sibling prefix (``.staging-<name>-[<run tag>-]<uuid>/``), copy
    each object server-side to its final key, write the ``_SUCCESS`` manifest
    (JSON: each file's path, size and sha256, and the run) last, then delete
    the staging keys. If anything fails, what was written is deleted again and
    open multipart uploads are aborted. Overwriting first removes the old
    manifest, so the prefix reads as unpublished until the new version is
    complete. Returns the destination prefix (ending in '/').

    A process killed mid-publish cleans up nothing, so every publish starts by
    collecting that garbage next to ``dest``: staging prefixes and incomplete
    multipart uploads older than ``STAGING_STALE_AFTER_S``, or from the same
    ``run_id``. With a ``run_id`` (the pipeline run's id, stable across the
    step's retries), a destination written by the same run is the retry's own
    leftover: a half-written one is removed first and replaced, a complete one
    with the same content is kept as is (the retry succeeds without copying),
    a complete one with other content is replaced. Anything at ``dest``
    written by another run, or without a run, still needs ``overwrite=True``.
    """
    src = _local(local_dir)
    if not src.is_dir():
        raise KubetrainError(f"{src} is not a directory: publish takes the directory to upload")
    files = _files(src)
    if not files:
        raise KubetrainError(f"{src} is empty: there is nothing to publish")
    if any(rel == MANIFEST for _, rel in files):
        raise KubetrainError(
            f"{src / MANIFEST} clashes with the publish manifest: rename or remove it"
        )
    tag = _run_tag(run_id)
    dest = _as_dir(str(dest_prefix_uri))
    if not is_s3(dest):
        _publish_local(files, _local(dest), overwrite, tag)
        return dest
    bucket, key = split_uri(dest)
    if not key:
        raise KubetrainError(
            f"{dest} is a bucket root: publish under a prefix, e.g. {dest}models/v1/"
        )
    parent, _, name = key.rstrip("/").rpartition("/")
    parent = _as_dir(parent) if parent else ""
    staging = f"{parent}{_STAGING}{name}-{tag + '-' if tag else ''}{uuid.uuid4().hex[:12]}/"
    with _local_errors(src):
        entries = [
            {"path": rel, "size": path.stat().st_size, SHA256: sha256_file(path)}
            for path, rel in files
        ]
    manifest = json.dumps(
        {"files": entries, **({RUN_TAG: tag, "run_id": run_id} if tag else {})}, indent=1
    ).encode()
    extra = {RUN_TAG: tag} if tag else None
    settings = S3Settings.from_env()
    s3 = client(settings)
    with _s3_errors(s3, dest):
        try:
            _collect_garbage(s3, bucket, parent, key, tag)
        except bex.ClientError as e:  # housekeeping must not block publishing
            if _code(e) not in _FORBIDDEN_CODES | {"NotImplemented", "MethodNotAllowed"}:
                raise
            log.warning(
                "cannot clean up after failed publishes under s3://%s/%s (%s): "
                "allow listing and aborting multipart uploads there",
                bucket,
                parent,
                _code(e),
            )
        existing = _list_keys(s3, bucket, key)
        published = key + MANIFEST in existing
        ours = bool(existing) and _written_by_run(s3, bucket, key, existing, tag)
        if published and ours and _manifest_files(s3, bucket, key) == entries:
            log.info("%s already holds this run's publish of the same files; keeping it", dest)
            return dest
        if existing and not (overwrite or ours):
            state = "a published version" if published else "unpublished leftovers"
            raise KubetrainError(
                f"{dest} already holds {len(existing)} objects ({state}): publish "
                "to a new prefix (e.g. a new version) or pass overwrite=True"
            )
        if existing and not published:  # half-written by a killed publish: start clean
            log.info("removing %d objects a failed publish left at %s", len(existing), dest)
            _abort_uploads(s3, bucket, key)
            _delete(s3, bucket, existing)
            existing = []
        written: list[str] = []
        try:
            for (path, rel), entry in zip(files, entries, strict=True):
                _put_file(
                    s3, path, bucket, staging + rel, extra, multipart_threshold, entry[SHA256]
                )
            if published:
                _delete(s3, bucket, [key + MANIFEST])
            for entry in entries:
                written.append(key + entry["path"])
                _copy(
                    s3,
                    bucket,
                    staging + entry["path"],
                    written[-1],
                    entry[SHA256],
                    multipart_threshold,
                    extra,
                )
            _delete(s3, bucket, sorted(set(existing) - set(written) - {key + MANIFEST}))
            s3.put_object(
                Bucket=bucket,
                Key=key + MANIFEST,
                Body=manifest,
                ContentType="application/json",
                Metadata=_metadata(extra, hashlib.sha256(manifest).hexdigest()),
            )
        except BaseException:
            # Best effort with few retries: this must not turn a failure into a long hang,
            # and what it cannot remove the next publish's garbage collection will.
            quick = client(
                replace(settings, max_attempts=min(settings.max_attempts, CLEANUP_MAX_ATTEMPTS))
            )
            for cleanup in (
                lambda: _delete(quick, bucket, written),
                lambda: _abort_uploads(quick, bucket, staging),
                lambda: _abort_uploads(quick, bucket, key),
                lambda: _delete(quick, bucket, _list_keys(quick, bucket, staging)),
            ):
                with contextlib.suppress(Exception):
                    cleanup()
            raise
        with contextlib.suppress(Exception):  # published; a leftover staging prefix is only garbage
            _delete(s3, bucket, _list_keys(s3, bucket, staging))
    log.info("published %d files to %s", len(files), dest)
    return dest


def _run_tag(run_id: str) -> str:
    """A short, header-safe stand-in for a run id (ids may be long or hold any character)."""
    return "r" + hashlib.sha256(run_id.encode()).hexdigest()[:12] if run_id else ""


def _written_by_run(s3: Any, bucket: str, key: str, existing: list[str], tag: str) -> bool:
    """Whether everything under ``key`` was written by the run tagged ``tag``.

    A complete version says so in its manifest; a half-written one only in
    the metadata of each object its copies put there.
    """
    if not tag:
        return False
    if key + MANIFEST in existing:
        body = s3.get_object(Bucket=bucket, Key=key + MANIFEST)["Body"].read()
        with contextlib.suppress(ValueError, AttributeError):
            return json.loads(body).get(RUN_TAG) == tag
        return False
    for k in existing:
        head = _head(s3, bucket, k)
        if head is not None and head.get("Metadata", {}).get(RUN_TAG) != tag:
            return False
    return True


def _manifest_files(s3: Any, bucket: str, key: str) -> Any:
    """The ``files`` list of the manifest under ``key`` (None if unreadable)."""
    body = s3.get_object(Bucket=bucket, Key=key + MANIFEST)["Body"].read()
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(body).get("files")
    return None


def _server_now(response: Mapping[str, Any]) -> datetime:
    """The server's clock (its Date header), so ages of objects do not depend on ours."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    with contextlib.suppress(TypeError, ValueError):
        if date:
            return parsedate_to_datetime(date)
    return datetime.now(UTC)


def _collect_garbage(s3: Any, bucket: str, parent: str, dest_key: str, tag: str) -> None:
    """Remove what killed publishes left next to ``dest_key``: whole staging prefixes and
    incomplete multipart uploads that are stale or belong to this run (tag ``tag``).

    Fresh leftovers of other runs stay: they may be a publish running right now.
    Staging age is its newest object's, so a slow publish still uploading is
    never mistaken for a dead one.
    """
    root = parent + _STAGING

    def doomed(segment: str, newest: datetime, now: datetime) -> bool:
        same_run = bool(tag) and re.search(f"-{tag}-[0-9a-f]{{12}}$", segment) is not None
        return same_run or (now - newest).total_seconds() >= STAGING_STALE_AFTER_S

    groups: dict[str, tuple[datetime, list[str]]] = {}
    now = datetime.now(UTC)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
        now = _server_now(page)
        for obj in page.get("Contents", []):
            segment = obj["Key"][len(parent) :].split("/", 1)[0]
            newest, keys = groups.get(segment, (obj["LastModified"], []))
            groups[segment] = (max(newest, obj["LastModified"]), [*keys, obj["Key"]])
    stale = [
        k
        for segment, (newest, keys) in groups.items()
        if doomed(segment, newest, now)
        for k in keys
    ]
    if stale:
        log.info(
            "removing %d objects of failed publishes under %s%s",
            len(stale),
            f"s3://{bucket}/",
            root,
        )
        _delete(s3, bucket, stale)
    # Multipart uploads: the whole model prefix (copies into any version may have died),
    # or only staging and the destination when publishing at the bucket's top level.
    for prefix in [parent] if parent else [root, dest_key]:
        for page in s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            now = _server_now(page)
            for upload in page.get("Uploads", []):
                segment = upload["Key"][len(parent) :].split("/", 1)[0]
                in_staging = upload["Key"].startswith(root)
                if (in_staging and doomed(segment, upload["Initiated"], now)) or (
                    now - upload["Initiated"]
                ).total_seconds() >= STAGING_STALE_AFTER_S:
                    log.info(
                        "aborting incomplete multipart upload of s3://%s/%s", bucket, upload["Key"]
                    )
                    _abort(s3, bucket, upload)


def _abort_uploads(s3: Any, bucket: str, prefix: str) -> None:
    """Abort every incomplete multipart upload under ``prefix`` (their parts cost storage
    and never expire on servers without a lifecycle rule)."""
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            _abort(s3, bucket, upload)


def _abort(s3: Any, bucket: str, upload: Mapping[str, Any]) -> None:
    try:
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    except bex.ClientError as e:
        if _code(e) not in ("NoSuchUpload", "404"):  # finished or aborted meanwhile
            raise


# --- helpers --------------------------------------------------------------------


def _local(path: PathLike) -> Path:
    """A local path, refusing URIs of schemes this module does not speak."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if _OTHER_SCHEME.match(text):
        raise KubetrainError(
            f"{text!r} uses an unsupported scheme: use s3://BUCKET/KEY or a local path"
        )
    return Path(text)


def _as_dir(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def _join(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix.rstrip("/") else rel


def _require_key(key: str, uri: PathLike) -> None:
    if not key or key.endswith("/"):
        raise KubetrainError(
            f"{uri} names a bucket or prefix, not an object: "
            "add the object key, e.g. s3://BUCKET/path/file"
        )


def _files(root: Path) -> list[tuple[Path, str]]:
    """(path, relative posix path) of every file under ``root`` (or ``root`` itself), sorted."""
    if root.is_file():
        return [(root, root.name)]
    return sorted(
        ((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()),
        key=lambda item: item[1],
    )


def _safe_relative(rel: str, uri: PathLike) -> str:
    """Refuse object keys that would escape the download directory (``../``)."""
    if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
        raise KubetrainError(
            f"{uri} holds the key {rel!r}, which would land outside the "
            "destination directory: rename that object"
        )
    return rel


def _metadata(extra: Mapping[str, str] | None, digest: str) -> dict[str, str]:
    return {**{str(k): str(v) for k, v in (extra or {}).items()}, SHA256: digest}


def _verify(uri: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise KubetrainError(
            f"{uri} is corrupt: its content has sha256 {actual[:16]}... but its "
            f"metadata says {expected[:16]}...; upload it again"
        )


def _transfer_config(threshold: int) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=threshold, multipart_chunksize=max(threshold, MIN_PART_SIZE)
    )


@contextlib.contextmanager
def _local_errors(path: Path) -> Iterator[None]:
    """Turn OS errors on local files into one-line KubetrainErrors."""
    try:
        yield
    except FileNotFoundError as e:
        raise KubetrainError(f"{e.filename or path} does not exist: check the path") from e
    except OSError as e:
        raise KubetrainError(
            f"cannot access {e.filename or path} ({e.strerror}): check the path and its permissions"
        ) from e


def _put_file(
    s3: Any,
    path: Path,
    bucket: str,
    key: str,
    metadata: Mapping[str, str] | None,
    threshold: int,
    digest: str | None = None,
) -> dict[str, Any]:
    """Upload one file with its sha256 in the metadata (``digest`` if the caller already
    hashed it); return its size and sha256."""
    with _local_errors(path):
        size, digest = path.stat().st_size, digest or sha256_file(path)
        s3.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": _metadata(metadata, digest)},
            Config=_transfer_config(threshold),
        )
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


def _copy(
    s3: Any,
    bucket: str,
    src_key: str,
    dest_key: str,
    digest: str,
    threshold: int,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Server-side copy, restating the sha256 (and ``metadata``) so they survive multipart
    copies on any server."""
    s3.copy(
        {"Bucket": bucket, "Key": src_key},
        bucket,
        dest_key,
        ExtraArgs={"Metadata": _metadata(metadata, digest), "MetadataDirective": "REPLACE"},
        Config=_transfer_config(threshold),
    )


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
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get(
            "Errors", []
        )
        if errors:
            raise KubetrainError(
                f"could not delete s3://{bucket}/{errors[0]['Key']} "
                f"({errors[0].get('Code')}): check delete permission "
                "on the bucket"
            )


def _publish_local(
    files: list[tuple[Path, str]], dest: Path, overwrite: bool, tag: str = ""
) -> None:
    """Local publish: build a sibling directory, then swap it in with one rename.

    The rename makes half-written destinations impossible; what a killed
    publish leaves is a staging directory, collected like S3 staging prefixes.
    """
    ours = False
    if tag and (dest / MANIFEST).is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            ours = json.loads((dest / MANIFEST).read_text()).get(RUN_TAG) == tag
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not (overwrite or ours):
        raise KubetrainError(
            f"{dest} already exists and is not empty: publish to a new "
            "directory or pass overwrite=True"
        )
    with _local_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        for leftover in dest.parent.glob(f"{_STAGING}*"):
            same_run = bool(tag) and f"-{tag}-" in leftover.name
            if same_run or time.time() - leftover.stat().st_mtime >= STAGING_STALE_AFTER_S:
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(
            tempfile.mkdtemp(
                prefix=f"{_STAGING}{dest.name}-{tag + '-' if tag else ''}", dir=dest.parent
            )
        )
        old = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex[:8]}")
        try:
            entries = []
            for path, rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / rel)
                entries.append(
                    {
                        "path": rel,
                        "size": (tmp / rel).stat().st_size,
                        SHA256: sha256_file(tmp / rel),
                    }
                )
            (tmp / MANIFEST).write_text(
                json.dumps({"files": entries, **({RUN_TAG: tag} if tag else {})}, indent=1)
            )
            tmp.chmod(0o755)  # mkdtemp makes 0700: a server under another user reads it
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


def _endpoint(s3: Any) -> str:
    """The client's endpoint for messages, without credentials."""
    return redact(s3.meta.endpoint_url)


def _missing(s3: Any, bucket: str, uri: str) -> KubetrainError:
    """Say whether the bucket or only the key is missing (a 404 on HEAD does not tell)."""
    try:
        s3.head_bucket(Bucket=bucket)
    except bex.ClientError as e:
        if _code(e) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
            return _no_bucket(s3, bucket)
    return KubetrainError(
        f"{uri} does not exist: check the URI (list_uris on its prefix shows what is there)"
    )


def _no_bucket(s3: Any, bucket: str) -> KubetrainError:
    return KubetrainError(
        f"bucket {bucket!r} does not exist at {_endpoint(s3)}: create "
        "it or fix the bucket name in the URI"
    )


@contextlib.contextmanager
def _s3_errors(s3: Any, uri: PathLike) -> Iterator[None]:
    """Turn boto failures into one-line KubetrainErrors that name the fix (never a secret).

    The message is redacted; the original exception stays attached as the
    cause (for the traceback) only when none of its texts holds a credential.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - narrowed in _explain; the rest re-raises as is
        error = _explain(e, s3, str(uri))
        if error is None:
            raise
        message = redact(str(error))
        if _leaks(e):
            raise KubetrainError(message) from None
        raise KubetrainError(message) from e


def _leaks(error: BaseException) -> bool:
    """Whether ``error`` or anything chained to it prints a credential."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if redact(str(current)) != str(current):
            return True
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return False


def _explain(e: Exception, s3: Any, uri: str) -> KubetrainError | None:
    """The one-line error for a boto failure, or None for anything else."""
    endpoint = _endpoint(s3)
    if isinstance(e, S3UploadFailedError):
        cause = e.__cause__ or e.__context__
        if isinstance(cause, bex.ClientError):
            return _translate(cause, s3, uri)
        return KubetrainError(f"upload to {uri} failed ({e}): check the endpoint and retry")
    if isinstance(e, bex.ClientError):
        return _translate(e, s3, uri)
    if isinstance(e, bex.SSLError):
        return KubetrainError(
            f"TLS with S3 endpoint {endpoint} failed: check the https URL and "
            "the CA bundle (AWS_CA_BUNDLE)"
        )
    if isinstance(e, (bex.ConnectionError, bex.HTTPClientError, RetriesExceededError)):
        return KubetrainError(
            f"cannot reach S3 endpoint {endpoint} ({type(e).__name__}; "
            f"retried for up to {RETRY_BUDGET_S:.0f} s): check "
            "S3_ENDPOINT_URL and that the server is up and reachable"
        )
    if isinstance(e, bex.NoCredentialsError):
        return KubetrainError(
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or give the pod an IAM role)"
        )
    if isinstance(e, bex.PartialCredentialsError):
        return KubetrainError(
            f"incomplete S3 credentials ({e.kwargs.get('cred_var')} is missing): {_CREDENTIAL_FIX}"
        )
    if isinstance(e, bex.NoRegionError):
        return KubetrainError("no S3 region configured: set AWS_DEFAULT_REGION (e.g. us-east-1)")
    return None


def _translate(error: bex.ClientError, s3: Any, uri: str) -> KubetrainError:
    code = _code(error)
    endpoint = _endpoint(s3)
    if code in _CREDENTIAL_CODES:
        return KubetrainError(
            f"S3 rejected the credentials for endpoint {endpoint} ({code}): {_CREDENTIAL_FIX}"
        )
    if code == "NoSuchBucket":
        return _no_bucket(s3, split_uri(uri)[0])
    if code in _NOT_FOUND_CODES:
        return _missing(s3, split_uri(uri)[0], uri)
    if code in _FORBIDDEN_CODES:
        return KubetrainError(
            f"S3 at {endpoint} denied access to {uri} ({code}): "
            f"{_CREDENTIAL_FIX} and that they are allowed to use this bucket"
        )
    message = error.response.get("Error", {}).get("Message", "")
    return KubetrainError(
        f"S3 request for {uri} failed at {endpoint} ({code}: {message}): "
        "check the URI and the server's log"
    )
