"""kubetrain.core.storage against a real S3 server (SeaweedFS from the `s3_server` fixture).

No mocks: every S3 test talks HTTP to `weed mini`, and configuration reaches
the code only through the environment variables users set. Failures are
injected for real: the server is crashed (SIGKILL) and restarted mid-transfer,
and a publishing process is SIGKILLed mid-upload or mid-copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from s3_server import S3Server, free_ports, point_aws_at, start

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
#: How long the server stays down in the crash tests before it is restarted.
DOWNTIME_S = 2.0


@dataclass
class Bucket:
    """A fresh bucket on the test server, with the env vars pointing at it."""

    name: str
    raw: object  # plain boto3 client, to inspect and tamper behind storage's back
    server: S3Server

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def keys(self) -> list[str]:
        listing = self.raw.list_objects_v2(Bucket=self.name)
        return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture
def s3(s3_server: S3Server, s3_env: str) -> Bucket:
    return Bucket(s3_env, s3_server.client(), s3_server)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "model.pt": os.urandom(3000),
        "meta.json": b'{"classes": 10}',
        "sub/dir/weights.bin": os.urandom(10_000),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- URIs and settings -------------------------------------------------------------


def test_split_uri_and_is_s3():
    assert storage.split_uri("s3://data/a/b.csv") == ("data", "a/b.csv")
    assert storage.split_uri("s3://data") == ("data", "")
    assert storage.is_s3("s3://data/x") and not storage.is_s3("/tmp/x")
    for bad in ("s3:///key", "s3://b/k", "data/a.csv", "s3://bad bucket/k"):
        with pytest.raises(KubetrainError, match="s3://BUCKET/KEY"):
            storage.split_uri(bad)


def test_split_uri_rejects_dot_and_empty_segments():
    """Old code passed these through and the server answered `400 Bad Request`."""
    for bad, fix in [
        ("s3://bk/x/../y", "s3://bk/y"),
        ("s3://bk/x/./y", "s3://bk/x/y"),
        ("s3://bk/x//y", "s3://bk/x/y"),
        ("s3://bk//x", "s3://bk/x"),
        ("s3://bk/x/y/../", "s3://bk/x/"),
        ("s3://bk/..", "remove them"),
        ("s3://bk/../x", "remove them"),
    ]:
        with pytest.raises(KubetrainError) as err:
            storage.split_uri(bad)
        message = str(err.value)
        assert message.startswith(f"{bad!r} has an empty, '.' or '..' segment"), message
        assert fix in message and "\n" not in message
    # Dots inside names and a trailing '/' (a prefix) stay fine.
    assert storage.split_uri("s3://bk/x/.hidden/a..b/") == ("bk", "x/.hidden/a..b/")
    assert storage.split_uri("s3://bk/") == ("bk", "")


def test_settings_from_env_hide_secrets():
    settings = storage.S3Settings.from_env(
        {
            "S3_ENDPOINT_URL": "http://minio:9000",
            "AWS_ACCESS_KEY_ID": "AKID",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
            "AWS_SESSION_TOKEN": "t0ken-value",
            "AWS_REGION": "eu-west-1",
            "AWS_MAX_ATTEMPTS": "3",
        }
    )
    assert (settings.endpoint_url, settings.region, settings.access_key, settings.max_attempts) == (
        "http://minio:9000",
        "eu-west-1",
        "AKID",
        3,
    )
    assert "s3cr3t-value" not in repr(settings) and "t0ken-value" not in repr(settings)
    assert storage.S3Settings.from_env({}) == storage.S3Settings()
    with pytest.raises(KubetrainError, match="http://minio:9000"):
        storage.S3Settings.from_env({"S3_ENDPOINT_URL": "minio:9000"})
    with pytest.raises(KubetrainError, match="AWS_MAX_ATTEMPTS"):
        storage.S3Settings.from_env({"AWS_MAX_ATTEMPTS": "many"})


def test_endpoint_credentials_are_redacted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """user:secret@ in S3_ENDPOINT_URL used to show up in errors, reprs and tracebacks."""
    port = free_ports(1)[0]  # nothing listens there
    endpoint = f"http://admin:pa55-w0rd-secret@127.0.0.1:{port}"
    settings = storage.S3Settings.from_env({"S3_ENDPOINT_URL": endpoint})
    assert "pa55-w0rd-secret" not in repr(settings) and "***@127.0.0.1" in repr(settings)
    with pytest.raises(KubetrainError) as err:  # no scheme: the fix repeats the endpoint
        storage.S3Settings.from_env({"S3_ENDPOINT_URL": endpoint[len("http://") :]})
    assert "pa55-w0rd-secret" not in str(err.value) and "http://***@127.0.0.1" in str(err.value)

    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-access-key")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # one retry: its log line is checked too
    with caplog.at_level(logging.DEBUG, logger="kubetrain"), pytest.raises(KubetrainError) as err:
        storage.read_bytes("s3://bucket/key")
    message = str(err.value)
    assert f"cannot reach S3 endpoint http://***@127.0.0.1:{port}" in message
    chain, e = [], err.value
    while e is not None:  # what a traceback prints: every chained exception
        chain.append(str(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "retry 1" in logs
    for secret in ("pa55-w0rd-secret", "admin:", "AKIAEXAMPLEKEY123456", "very-secret-access-key"):
        assert secret not in "\n".join(chain) and secret not in logs, secret
    assert storage.redact(f"GET {endpoint}/b/k failed") == (
        f"GET http://***@127.0.0.1:{port}/b/k failed"
    )


def test_endpoint_credentials_are_redacted_in_server_errors(
    s3: Bucket, monkeypatch: pytest.MonkeyPatch
):
    """Errors the server answers (here NoSuchBucket) name the endpoint without its user part."""
    endpoint = s3.server.endpoint_url.replace("http://", "http://admin:pa55-w0rd-secret@")
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    storage.write_bytes(s3.uri("k"), b"x")  # the user part itself is harmless to S3
    with pytest.raises(KubetrainError) as err:
        storage.read_bytes("s3://kt-no-such-bucket/k")
    redacted = s3.server.endpoint_url.replace("http://", "http://***@")
    assert str(err.value) == (
        f"bucket 'kt-no-such-bucket' does not exist at {redacted}: "
        "create it or fix the bucket name in the URI"
    )


# --- round trips ----------------------------------------------------------------------


def test_bytes_round_trip_stores_sha256(s3: Bucket):
    data = b"hello kubetrain " * 100
    storage.write_bytes(s3.uri("a/b.bin"), data, metadata={"stage": "ingest"})
    assert storage.read_bytes(s3.uri("a/b.bin")) == data
    meta = s3.raw.head_object(Bucket=s3.name, Key="a/b.bin")["Metadata"]
    assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "stage": "ingest"}
    assert storage.exists(s3.uri("a/b.bin"))
    assert storage.exists(s3.uri("a")) and storage.exists(s3.uri("a/"))  # prefix as directory
    assert not storage.exists(s3.uri("a/c.bin")) and not storage.exists(s3.uri("b/"))
    assert storage.exists(s3.uri()) and not storage.exists("s3://no-such-bucket-kt/x")


def test_file_round_trip(s3: Bucket, tmp_path: Path):
    src = tmp_path / "model.pt"
    src.write_bytes(os.urandom(50_000))
    uri = s3.uri("runs/1/model.pt")
    assert storage.upload(src, uri, metadata={"run": "1"}) == uri
    storage.upload(src, s3.uri("runs/2/"))  # trailing slash: keep the file name
    assert s3.keys() == ["runs/1/model.pt", "runs/2/model.pt"]
    assert s3.raw.head_object(Bucket=s3.name, Key="runs/1/model.pt")["Metadata"]["run"] == "1"

    out = storage.download(s3.uri("runs/1/model.pt"), tmp_path / "out" / "m.pt")
    assert out == tmp_path / "out" / "m.pt" and out.read_bytes() == src.read_bytes()
    into_dir = storage.download(s3.uri("runs/2/model.pt"), tmp_path / "out")
    assert into_dir == tmp_path / "out" / "model.pt" and into_dir.read_bytes() == src.read_bytes()
    # No temporary .part files are left next to the downloads.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.pt", "model.pt"]


def test_directory_round_trip(s3: Bucket, tmp_path: Path):
    files = make_tree(tmp_path / "src")
    storage.upload(tmp_path / "src", s3.uri("exp/v1/"))
    assert storage.list_uris(s3.uri("exp/v1/")) == sorted(s3.uri(f"exp/v1/{k}") for k in files)
    assert storage.list_uris(s3.uri("nothing/")) == []
    assert storage.download(s3.uri("exp/v1/"), tmp_path / "a") == tmp_path / "a"
    assert read_tree(tmp_path / "a") == files
    storage.download(s3.uri("exp/v1"), tmp_path / "b")  # no trailing slash: still a directory
    assert read_tree(tmp_path / "b") == files


# --- integrity ----------------------------------------------------------------------


def test_corrupted_object_is_detected(s3: Bucket, tmp_path: Path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"good weights" * 1000)
    storage.upload(src, s3.uri("m/weights.bin"))
    meta = s3.raw.head_object(Bucket=s3.name, Key="m/weights.bin")["Metadata"]
    # Overwrite the content behind storage's back but keep the old sha256 metadata.
    s3.raw.put_object(
        Bucket=s3.name, Key="m/weights.bin", Body=b"bad weights" * 1000, Metadata=meta
    )

    with pytest.raises(KubetrainError, match=r"s3://.*/m/weights.bin is corrupt.*upload it again"):
        storage.download(s3.uri("m/weights.bin"), tmp_path / "dl" / "weights.bin")
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())
    with pytest.raises(KubetrainError, match="is corrupt"):
        storage.read_bytes(s3.uri("m/weights.bin"))
    # An object without the hash (written by another tool) is read without a check.
    s3.raw.put_object(Bucket=s3.name, Key="foreign.txt", Body=b"x")
    assert storage.read_bytes(s3.uri("foreign.txt")) == b"x"


def test_multipart_upload_and_download(s3: Bucket, tmp_path: Path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MiB + 123))
    storage.upload(big, s3.uri("big.bin"), multipart_threshold=5 * MiB)
    head = s3.raw.head_object(Bucket=s3.name, Key="big.bin")
    assert re.fullmatch(r'"[0-9a-f]{32}-2"', head["ETag"]), head["ETag"]  # two parts: 5 MiB + rest
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    out = storage.download(s3.uri("big.bin"), tmp_path / "copy.bin", multipart_threshold=5 * MiB)
    assert out.read_bytes() == big.read_bytes()


# --- publish --------------------------------------------------------------------------


class CallLog:
    """Records the S3 operations storage's own (cached) client sends, in order."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.client = storage.client()

    def __enter__(self):
        self.client.meta.events.register("before-parameter-build.s3", self._record)
        return self

    def __exit__(self, *exc):
        self.client.meta.events.unregister("before-parameter-build.s3", self._record)

    def _record(self, params, model, **_):
        self.calls.append((model.name, params.get("Key", "")))


def test_publish_is_atomic(s3: Bucket, tmp_path: Path):
    files = make_tree(tmp_path / "model")
    (tmp_path / "model" / "big.bin").write_bytes(os.urandom(5 * MiB + 1))  # multipart upload + copy
    files = read_tree(tmp_path / "model")
    dest = s3.uri("models/digits/v1/")
    assert not storage.is_published(dest)

    with CallLog() as log:
        published = storage.publish(
            tmp_path / "model", dest.rstrip("/"), multipart_threshold=5 * MiB
        )
    assert published == dest
    assert storage.is_published(dest) and storage.is_published(dest.rstrip("/"))

    # Exactly the files plus the manifest at the destination; no staging keys anywhere.
    assert s3.keys() == sorted(f"models/digits/v1/{k}" for k in [*files, "_SUCCESS"])
    manifest = storage.read_manifest(dest)
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest} == {
        k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()
    }
    for entry in manifest:  # the copies kept the hash, so downloads stay verified
        head = s3.raw.head_object(Bucket=s3.name, Key=f"models/digits/v1/{entry['path']}")
        assert head["Metadata"]["sha256"] == entry["sha256"]
    assert read_tree(storage.download(dest, tmp_path / "back")) == {
        **files,
        "_SUCCESS": storage.read_bytes(dest + "_SUCCESS"),
    }

    # Order: staged uploads, then copies into place, then the manifest, then staging cleanup.
    writes = [
        (op, key)
        for op, key in log.calls
        if op
        in ("PutObject", "CreateMultipartUpload", "CopyObject", "UploadPartCopy", "DeleteObjects")
    ]
    manifest_at = writes.index(("PutObject", "models/digits/v1/_SUCCESS"))
    final = [i for i, (op, key) in enumerate(writes) if key.startswith("models/digits/v1/")]
    staged = [
        i for i, (op, key) in enumerate(writes) if key.startswith("models/digits/.staging-v1-")
    ]
    assert final[-1] == manifest_at and staged and max(staged) < min(final)
    assert all(
        op in ("CopyObject", "CreateMultipartUpload", "UploadPartCopy")
        for op, key in writes[:manifest_at]
        if key.startswith("models/digits/v1/")
    )
    assert writes[-1][0] == "DeleteObjects"

    # A second publish to the same prefix is refused unless asked to overwrite.
    with pytest.raises(KubetrainError, match="already holds .* published version.*overwrite=True"):
        storage.publish(tmp_path / "model", dest)


def test_publish_overwrite_replaces_old_version(s3: Bucket, tmp_path: Path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "old.bin").write_bytes(b"old")
    (tmp_path / "v1" / "same.bin").write_bytes(b"first")
    storage.publish(tmp_path / "v1", s3.uri("m/"))
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "same.bin").write_bytes(b"second")
    storage.publish(tmp_path / "v2", s3.uri("m/"), overwrite=True)
    assert s3.keys() == ["m/_SUCCESS", "m/same.bin"]
    assert storage.read_bytes(s3.uri("m/same.bin")) == b"second"
    assert [e["path"] for e in storage.read_manifest(s3.uri("m"))] == ["same.bin"]


def test_publish_failing_while_staging_leaves_nothing(
    s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / "model" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "model" / name).write_bytes(os.urandom(1000))
    real_put = storage._put_file

    def put_file_losing_c(s3_client, path, *args):
        if path.name == "c.bin":  # the file disappears after a.bin and b.bin were staged
            path.unlink()
        return real_put(s3_client, path, *args)

    monkeypatch.setattr(storage, "_put_file", put_file_losing_c)
    with pytest.raises(KubetrainError, match=r"c\.bin does not exist"):
        storage.publish(tmp_path / "model", s3.uri("models/v1/"))
    assert s3.keys() == []  # neither the destination nor the staging prefix holds anything
    assert not storage.is_published(s3.uri("models/v1/"))


def test_publish_failing_while_copying_leaves_nothing(
    s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    make_tree(tmp_path / "model")
    real_copy = storage._copy
    copies = []

    def copy_after_losing_source(s3_client, bucket, src_key, *args):
        copies.append(src_key)
        if len(copies) == 2:  # someone deletes a staged object mid-publish: a real S3 404
            s3.raw.delete_object(Bucket=bucket, Key=src_key)
        return real_copy(s3_client, bucket, src_key, *args)

    monkeypatch.setattr(storage, "_copy", copy_after_losing_source)
    with pytest.raises(KubetrainError, match="does not exist"):
        storage.publish(tmp_path / "model", s3.uri("models/v1/"))
    assert len(copies) == 2  # the first copy had landed at the destination
    assert s3.keys() == []
    assert not storage.is_published(s3.uri("models/v1/"))


def published_tree(root: Path) -> dict[str, bytes]:
    """A small model directory with one file big enough for multipart (5 MiB parts)."""
    files = {
        "a.bin": os.urandom(2000),
        "big.bin": os.urandom(6 * MiB + 7),
        "c.json": b"{}",
        "sub/d.bin": os.urandom(3000),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def uploads(bucket: Bucket, prefix: str = "") -> list[str]:
    """Keys of the bucket's incomplete multipart uploads."""
    listing = bucket.raw.list_multipart_uploads(Bucket=bucket.name, Prefix=prefix)
    return sorted(u["Key"] for u in listing.get("Uploads", []))


def test_readers_only_see_published_prefixes(s3: Bucket, tmp_path: Path):
    """A version without `_SUCCESS` (half-copied) is neither listed nor downloadable."""
    files = make_tree(tmp_path / "model")
    storage.publish(tmp_path / "model", s3.uri("models/m/v1/"))
    s3.raw.put_object(Bucket=s3.name, Key="models/m/v2/model.pt", Body=b"half")  # killed copy
    s3.raw.put_object(Bucket=s3.name, Key="models/m/v0/_SUCCESS/x", Body=b"not a manifest")
    assert storage.published_prefixes(s3.uri("models/m")) == [s3.uri("models/m/v1/")]
    assert storage.published_prefixes(s3.uri("models/none/")) == []

    got = storage.download_published(s3.uri("models/m/v1"), tmp_path / "v1")
    assert got.stat().st_mode & 0o777 == 0o755
    manifest = storage.read_bytes(s3.uri("models/m/v1/_SUCCESS"))
    assert read_tree(got) == {**files, "_SUCCESS": manifest}
    with pytest.raises(KubetrainError, match="models/m/v2/ is not published"):
        storage.download_published(s3.uri("models/m/v2/"), tmp_path / "v2")
    assert not (tmp_path / "v2").exists()
    with pytest.raises(KubetrainError, match="not empty"):
        storage.download_published(s3.uri("models/m/v1/"), tmp_path / "v1")

    # Only what the manifest lists is fetched, and it must be what the manifest says.
    s3.raw.put_object(Bucket=s3.name, Key="models/m/v1/stray.bin", Body=b"stray")
    assert "stray.bin" not in read_tree(
        storage.download_published(s3.uri("models/m/v1/"), tmp_path / "again")
    )
    storage.write_bytes(s3.uri("models/m/v1/meta.json"), b'{"classes": 3}')  # own sha256 is fine
    with pytest.raises(KubetrainError, match="meta.json does not match the _SUCCESS manifest"):
        storage.download_published(s3.uri("models/m/v1/"), tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_publish_aborts_its_multipart_uploads(s3: Bucket, tmp_path: Path):
    """A part upload fails and boto3's own abort fails too: publish aborts the upload itself."""
    published_tree(tmp_path / "model")

    class InjectedError(Exception):
        pass

    calls = dict.fromkeys(("UploadPart", "AbortMultipartUpload"), 0)

    def fail(operation: str, nth: int):
        def handler(**_):
            calls[operation] += 1
            if calls[operation] == nth:
                raise InjectedError(f"{operation} #{nth} failed")

        return handler

    events = storage.client().meta.events
    handlers = {
        "UploadPart": fail("UploadPart", 2),
        "AbortMultipartUpload": fail("AbortMultipartUpload", 1),
    }
    for operation, handler in handlers.items():
        events.register(f"before-send.s3.{operation}", handler)
    try:
        with pytest.raises(InjectedError, match="UploadPart #2"):
            storage.publish(tmp_path / "model", s3.uri("models/m/v1/"), multipart_threshold=5 * MiB)
    finally:
        for operation, handler in handlers.items():
            events.unregister(f"before-send.s3.{operation}", handler)
    assert calls["AbortMultipartUpload"] >= 1  # boto3 tried (and failed) to clean up
    assert uploads(s3) == [] and s3.keys() == []


def test_publish_collects_garbage_of_killed_publishes(
    s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Staging prefixes and multipart uploads left by killed publishes go once stale."""
    make_tree(tmp_path / "model")
    leftovers = [
        "models/m/.staging-v0-0123456789ab/model.pt",
        "models/m/.staging-v0-0123456789ab/sub/weights.bin",
    ]
    for key in leftovers:
        s3.raw.put_object(Bucket=s3.name, Key=key, Body=b"staged")
    for key in ("models/m/.staging-v0-0123456789ab/big.bin", "models/m/v0/big.bin"):
        s3.raw.create_multipart_upload(Bucket=s3.name, Key=key)
    s3.raw.put_object(Bucket=s3.name, Key="models/other/.staging-v0-0123456789ab/x", Body=b"x")

    # Fresh leftovers of another run may be a publish in progress: they stay.
    storage.publish(tmp_path / "model", s3.uri("models/m/v1/"))
    assert set(leftovers) <= set(s3.keys())
    assert uploads(s3) == ["models/m/.staging-v0-0123456789ab/big.bin", "models/m/v0/big.bin"]

    monkeypatch.setattr(storage, "STAGING_STALE_AFTER_S", 0.0)  # everything is stale now
    storage.publish(tmp_path / "model", s3.uri("models/m/v2/"))
    assert uploads(s3) == []
    assert [k for k in s3.keys() if ".staging-" in k] == [  # noqa: SIM118 - not a dict
        "models/other/.staging-v0-0123456789ab/x"
    ]  # another model's prefix is not touched
    assert storage.published_prefixes(s3.uri("models/m/")) == [
        s3.uri("models/m/v1/"),
        s3.uri("models/m/v2/"),
    ]


def test_publish_with_run_id_replaces_only_its_own_leftovers(s3: Bucket, tmp_path: Path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "w.bin").write_bytes(b"one")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "w.bin").write_bytes(b"two")
    dest = s3.uri("models/m/run-1/")
    assert storage.publish(tmp_path / "one", dest, run_id="run-1") == dest
    manifest = storage.read_bytes(dest + "_SUCCESS")
    # A retry with the same files keeps the version as it is (no unpublished window).
    with CallLog() as log:
        assert storage.publish(tmp_path / "one", dest, run_id="run-1") == dest
    assert not [op for op, _ in log.calls if op in ("PutObject", "CopyObject", "DeleteObjects")]
    assert storage.read_bytes(dest + "_SUCCESS") == manifest
    # A retry with other content replaces it; another run (or none) is refused.
    storage.publish(tmp_path / "two", dest, run_id="run-1")
    assert storage.read_bytes(dest + "w.bin") == b"two"
    for other in ("run-2", ""):
        with pytest.raises(
            KubetrainError, match=r"already holds 2 objects \(a published version\)"
        ):
            storage.publish(tmp_path / "one", dest, run_id=other)
    # Half-written leftovers by another run stay refused too.
    s3.raw.put_object(Bucket=s3.name, Key="models/m/run-3/w.bin", Body=b"x")
    with pytest.raises(KubetrainError, match="unpublished leftovers"):
        storage.publish(tmp_path / "one", s3.uri("models/m/run-3/"), run_id="run-4")


KILLABLE_PUBLISH = """
import sys, time
from pathlib import Path
from kubetrain.core import storage

src, dest, run_id, operation, nth, marker = sys.argv[1:]
calls = []

def freeze(**_):
    calls.append(operation)
    if len(calls) == int(nth):
        Path(marker).touch()
        time.sleep(600)  # the test SIGKILLs this process here, mid-transfer

storage.client().meta.events.register(f"before-send.s3.{operation}", freeze)
storage.publish(src, dest, run_id=run_id, multipart_threshold=5 * 1024 * 1024)
"""


def publish_and_kill(
    src: Path, dest: str, run_id: str, operation: str, nth: int, tmp_path: Path
) -> None:
    """Run `storage.publish` in a child process and SIGKILL it at the nth `operation` call:
    no `finally`, no cleanup, exactly what a pod eviction or OOM kill does."""
    marker = tmp_path / f"frozen-{operation}"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLABLE_PUBLISH,
            str(src),
            dest,
            run_id,
            operation,
            str(nth),
            str(marker),
        ],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, f"publish exited ({child.returncode}) before {operation}"
            assert time.monotonic() < deadline, f"publish never reached {operation} #{nth}"
            time.sleep(0.05)
        time.sleep(0.3)  # let parallel parts land, as they would before a real kill
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


@pytest.mark.parametrize(
    "operation, nth, half_copied",
    [
        ("UploadPart", 2, []),  # staging big.bin, part 2 of 2
        ("UploadPartCopy", 2, ["a.bin"]),  # copying big.bin into place, a.bin already there
    ],
)
def test_killed_publish_is_invisible_and_its_retry_finishes(
    s3: Bucket, tmp_path: Path, operation: str, nth: int, half_copied: list[str]
):
    files = published_tree(tmp_path / "model")
    dest, run = s3.uri("models/m/run-7/"), "kfp-run-7"
    publish_and_kill(tmp_path / "model", dest, run, operation, nth, tmp_path)

    # What the killed process left: staging objects, an open multipart upload and, when it
    # died while copying, final objects without a manifest.
    left = s3.keys()
    assert [k for k in left if k.startswith("models/m/run-7/")] == [
        f"models/m/run-7/{k}" for k in half_copied
    ]
    assert [k for k in left if k.startswith("models/m/.staging-run-7-")]
    assert uploads(s3, "models/m/")
    # Readers never see it ...
    assert not storage.is_published(dest)
    assert storage.published_prefixes(s3.uri("models/m/")) == []
    with pytest.raises(KubetrainError, match="is not published"):
        storage.download_published(dest, tmp_path / "early")
    if half_copied:  # ... another run does not take the half-copied version over ...
        with pytest.raises(KubetrainError, match="unpublished leftovers.*overwrite=True"):
            storage.publish(tmp_path / "model", dest, run_id="another-run")

    # ... and the retry of the same run cleans up and finishes.
    assert storage.publish(tmp_path / "model", dest, run_id=run) == dest
    assert s3.keys() == sorted(f"models/m/run-7/{k}" for k in [*files, "_SUCCESS"])
    assert uploads(s3) == []
    got = storage.download_published(dest, tmp_path / "got")
    assert read_tree(got) == {**files, "_SUCCESS": storage.read_bytes(dest + "_SUCCESS")}


# --- riding out a server crash ------------------------------------------------------------


@pytest.fixture(scope="module")
def crashy_server(tmp_path_factory: pytest.TempPathFactory):
    """A server of its own, so crashing it cannot break other modules' tests."""
    try:
        server = start(tmp_path_factory.mktemp("seaweedfs-crashy"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def crashy(crashy_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    point_aws_at(crashy_server, monkeypatch)
    if crashy_server.process.poll() is not None:  # a failed test left it down
        crashy_server.restart()
    return Bucket(crashy_server.make_bucket(), crashy_server.client(), crashy_server)


class Crash:
    """Kill the server just before the nth request of `operation` storage sends, and start
    it again (same ports, same data) DOWNTIME_S seconds later."""

    def __init__(self, server: S3Server, operation: str, nth: int):
        self.server, self.operation, self.nth = server, operation, nth
        self.count, self.lock = 0, threading.Lock()
        self.killed_at = self.back_at = 0.0
        self.restarter: threading.Thread | None = None
        self.error: BaseException | None = None

    def __enter__(self) -> Crash:
        storage.client().meta.events.register(f"before-send.s3.{self.operation}", self._hit)
        return self

    def __exit__(self, *exc) -> None:
        storage.client().meta.events.unregister(f"before-send.s3.{self.operation}", self._hit)
        if self.restarter:
            self.restarter.join(timeout=60)
        if self.error:
            raise self.error

    def _hit(self, **_) -> None:
        with self.lock:
            self.count += 1
            if self.count != self.nth:
                return
        self.server.kill()
        self.killed_at = time.monotonic()
        self.restarter = threading.Thread(target=self._restart)
        self.restarter.start()

    def _restart(self) -> None:
        try:
            time.sleep(DOWNTIME_S)
            self.server.restart()
            self.back_at = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported by __exit__
            self.error = e


@pytest.mark.parametrize(
    "operation, nth",
    [
        ("UploadPart", 2),  # staging: multipart upload of big.bin
        ("UploadPartCopy", 1),  # copying big.bin into place (multipart copy)
        ("CopyObject", 2),  # copying a small file into place
    ],
)
def test_publish_survives_a_server_crash(
    crashy: Bucket, tmp_path: Path, operation: str, nth: int, caplog: pytest.LogCaptureFixture
):
    files = published_tree(tmp_path / "model")
    dest = crashy.uri("models/m/v1/")
    with (
        caplog.at_level(logging.WARNING, logger="kubetrain"),
        Crash(crashy.server, operation, nth) as crash,
    ):
        assert storage.publish(tmp_path / "model", dest, multipart_threshold=5 * MiB) == dest
    assert crash.killed_at and crash.back_at - crash.killed_at >= DOWNTIME_S
    assert any("retry" in r.getMessage() for r in caplog.records)
    assert crashy.keys() == sorted(f"models/m/v1/{k}" for k in [*files, "_SUCCESS"])
    assert uploads(crashy) == []
    got = storage.download_published(dest, tmp_path / "got", multipart_threshold=5 * MiB)
    assert read_tree(got) == {**files, "_SUCCESS": storage.read_bytes(dest + "_SUCCESS")}


def test_download_survives_a_server_crash(crashy: Bucket, tmp_path: Path):
    files = published_tree(tmp_path / "model")
    dest = storage.publish(tmp_path / "model", crashy.uri("models/m/v1/"))
    with Crash(crashy.server, "GetObject", 2) as crash:
        got = storage.download_published(dest, tmp_path / "got", multipart_threshold=5 * MiB)
    assert crash.back_at
    assert read_tree(got) == {**files, "_SUCCESS": storage.read_bytes(dest + "_SUCCESS")}


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variable, code",
    [
        ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
        ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials(s3: Bucket, monkeypatch: pytest.MonkeyPatch, variable: str, code: str):
    wrong = "wrong-" + os.urandom(8).hex()
    monkeypatch.setenv(variable, wrong)
    with pytest.raises(KubetrainError) as err:
        storage.write_bytes(s3.uri("x.bin"), b"data")
    message = str(err.value)
    assert f"S3 rejected the credentials for endpoint {s3.server.endpoint_url} ({code})" in message
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and "\n" not in message
    assert wrong not in message and s3.server.secret_key not in message
    with pytest.raises(KubetrainError) as err:  # HEAD: a bare 403, no error code in the body
        storage.exists(s3.uri("x.bin"))
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value) and wrong not in str(err.value)
    assert s3.keys() == []


def test_missing_object_and_bucket(s3: Bucket, tmp_path: Path):
    missing = s3.uri("no/such/key.bin")
    with pytest.raises(KubetrainError, match=f"^{re.escape(missing)} does not exist"):
        storage.read_bytes(missing)
    with pytest.raises(KubetrainError, match=f"^{re.escape(missing)} does not exist"):
        storage.download(missing, tmp_path / "x")
    with pytest.raises(KubetrainError, match="not published"):
        storage.read_manifest(s3.uri("no/"))
    with pytest.raises(KubetrainError, match="names a bucket or prefix"):
        storage.read_bytes(s3.uri("dir/"))
    no_bucket = f"bucket 'kt-no-such-bucket' does not exist at {s3.server.endpoint_url}"
    (tmp_path / "f.txt").write_text("x")
    for call in (
        lambda: storage.read_bytes("s3://kt-no-such-bucket/k"),
        lambda: storage.download("s3://kt-no-such-bucket/k", tmp_path / "y"),
        lambda: storage.list_uris("s3://kt-no-such-bucket/"),
        lambda: storage.write_bytes("s3://kt-no-such-bucket/k", b"x"),
        # upload_file wraps the S3 error in S3UploadFailedError
        lambda: storage.upload(tmp_path / "f.txt", "s3://kt-no-such-bucket/f.txt"),
    ):
        with pytest.raises(KubetrainError, match=re.escape(no_bucket)):
            call()


def test_retry_budget_bounds_the_time_spent_on_an_unreachable_endpoint(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Connection errors are retried for RETRY_BUDGET_S seconds, not a fixed few attempts."""
    port = free_ports(1)[0]
    monkeypatch.setattr(storage, "RETRY_BUDGET_S", 1.5)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    s3 = storage.client()
    assert (s3.meta.config.connect_timeout, s3.meta.config.read_timeout) == (
        storage.CONNECT_TIMEOUT_S,
        storage.READ_TIMEOUT_S,
    )
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="kubetrain"),
        pytest.raises(KubetrainError, match="cannot reach S3 endpoint"),
    ):
        storage.read_bytes("s3://bucket/key")
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 4, elapsed
    retries = [r for r in caplog.records if "GetObject failed" in r.getMessage()]
    assert len(retries) >= 3  # backoff starts small: several tries fit into the budget


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch):
    port = free_ports(1)[0]  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(
        KubetrainError,
        match=f"cannot reach S3 endpoint http://127.0.0.1:{port}.*check S3_ENDPOINT_URL",
    ):
        storage.read_bytes("s3://bucket/key")


# --- local paths ----------------------------------------------------------------------


def test_local_path_variants(tmp_path: Path):
    storage.write_bytes(tmp_path / "a" / "b.bin", b"abc")
    assert storage.read_bytes(tmp_path / "a" / "b.bin") == b"abc"
    assert storage.exists(tmp_path / "a" / "b.bin") and not storage.exists(tmp_path / "nope")
    copied = storage.upload(tmp_path / "a" / "b.bin", f"{tmp_path}/c/")
    assert copied == str(tmp_path / "c" / "b.bin")
    assert storage.download(tmp_path / "c" / "b.bin", tmp_path / "d.bin").read_bytes() == b"abc"

    files = make_tree(tmp_path / "tree")
    storage.upload(tmp_path / "tree", tmp_path / "up")
    assert read_tree(tmp_path / "up") == files
    assert read_tree(storage.download(tmp_path / "up", tmp_path / "down")) == files
    assert storage.list_uris(tmp_path / "up") == sorted(str(tmp_path / "up" / k) for k in files)
    assert storage.list_uris(tmp_path / "nope") == []

    assert not storage.is_published(tmp_path / "pub")
    assert storage.publish(tmp_path / "tree", tmp_path / "pub") == f"{tmp_path / 'pub'}/"
    assert storage.is_published(tmp_path / "pub")
    assert (tmp_path / "pub").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert {e["path"] for e in storage.read_manifest(tmp_path / "pub")} == set(files)
    manifest = (tmp_path / "pub" / "_SUCCESS").read_bytes()
    assert read_tree(tmp_path / "pub") == {**files, "_SUCCESS": manifest}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    with pytest.raises(KubetrainError, match="overwrite=True"):
        storage.publish(tmp_path / "tree", tmp_path / "pub")


def test_local_publish_with_run_id(tmp_path: Path):
    """Local publishes are one rename, so only staging directories can be left behind."""
    files = make_tree(tmp_path / "tree")
    dest = tmp_path / "models" / "run-1"
    storage.publish(tmp_path / "tree", dest, run_id="run-1")
    (tmp_path / "models" / ".staging-v0-stale").mkdir()
    os.utime(tmp_path / "models" / ".staging-v0-stale", (0, 0))  # a killed publish, long ago
    (tmp_path / "models" / ".staging-v0-fresh").mkdir()  # maybe running right now
    storage.publish(tmp_path / "tree", dest, run_id="run-1")  # the retry of the same run
    assert read_tree(dest) == {**files, "_SUCCESS": (dest / "_SUCCESS").read_bytes()}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".staging-v0-fresh", "run-1"]
    with pytest.raises(KubetrainError, match="overwrite=True"):
        storage.publish(tmp_path / "tree", dest, run_id="run-2")


def test_local_path_errors(tmp_path: Path):
    with pytest.raises(KubetrainError, match="does not exist"):
        storage.read_bytes(tmp_path / "missing.bin")
    with pytest.raises(KubetrainError, match="does not exist"):
        storage.download(tmp_path / "missing.bin", tmp_path / "x")
    with pytest.raises(KubetrainError, match="does not exist"):
        storage.upload(tmp_path / "missing.bin", "s3://bucket/x")
    with pytest.raises(KubetrainError, match="unsupported scheme"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(KubetrainError, match="not a directory"):
        storage.publish(tmp_path / "missing", tmp_path / "pub")
