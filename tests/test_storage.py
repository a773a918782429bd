"""kubetrain.core.storage against a real S3 server (SeaweedFS from the `s3_server` fixture).

No mocks: every S3 test talks HTTP to `weed mini`, and configuration reaches
the code only through the environment variables users set.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from s3_server import S3Server, free_ports

MiB = 1024 * 1024


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
    files = {"model.pt": os.urandom(3000), "meta.json": b'{"classes": 10}',
             "sub/dir/weights.bin": os.urandom(10_000), "empty.txt": b""}
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


def test_settings_from_env_hide_secrets():
    settings = storage.S3Settings.from_env({
        "S3_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_SESSION_TOKEN": "t0ken-value",
        "AWS_REGION": "eu-west-1", "AWS_MAX_ATTEMPTS": "3"})
    assert (settings.endpoint_url, settings.region, settings.access_key, settings.max_attempts) == (
        "http://minio:9000", "eu-west-1", "AKID", 3)
    assert "s3cr3t-value" not in repr(settings) and "t0ken-value" not in repr(settings)
    assert storage.S3Settings.from_env({}) == storage.S3Settings()
    with pytest.raises(KubetrainError, match="http://minio:9000"):
        storage.S3Settings.from_env({"S3_ENDPOINT_URL": "minio:9000"})
    with pytest.raises(KubetrainError, match="AWS_MAX_ATTEMPTS"):
        storage.S3Settings.from_env({"AWS_MAX_ATTEMPTS": "many"})


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
    s3.raw.put_object(Bucket=s3.name, Key="m/weights.bin", Body=b"bad weights" * 1000,
                      Metadata=meta)

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
        published = storage.publish(tmp_path / "model", dest.rstrip("/"),
                                    multipart_threshold=5 * MiB)
    assert published == dest
    assert storage.is_published(dest) and storage.is_published(dest.rstrip("/"))

    # Exactly the files plus the manifest at the destination; no staging keys anywhere.
    assert s3.keys() == sorted(f"models/digits/v1/{k}" for k in [*files, "_SUCCESS"])
    manifest = storage.read_manifest(dest)
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest} == {
        k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()}
    for entry in manifest:  # the copies kept the hash, so downloads stay verified
        head = s3.raw.head_object(Bucket=s3.name, Key=f"models/digits/v1/{entry['path']}")
        assert head["Metadata"]["sha256"] == entry["sha256"]
    assert read_tree(storage.download(dest, tmp_path / "back")) == {
        **files, "_SUCCESS": storage.read_bytes(dest + "_SUCCESS")}

    # Order: staged uploads, then copies into place, then the manifest, then staging cleanup.
    writes = [(op, key) for op, key in log.calls
              if op in ("PutObject", "CreateMultipartUpload", "CopyObject", "UploadPartCopy",
                        "DeleteObjects")]
    manifest_at = writes.index(("PutObject", "models/digits/v1/_SUCCESS"))
    final = [i for i, (op, key) in enumerate(writes) if key.startswith("models/digits/v1/")]
    staged = [i for i, (op, key) in enumerate(writes)
              if key.startswith("models/digits/.staging-v1-")]
    assert final[-1] == manifest_at and staged and max(staged) < min(final)
    assert all(op in ("CopyObject", "CreateMultipartUpload", "UploadPartCopy")
               for op, key in writes[:manifest_at] if key.startswith("models/digits/v1/"))
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


def test_publish_failing_while_staging_leaves_nothing(s3: Bucket, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
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


def test_publish_failing_while_copying_leaves_nothing(s3: Bucket, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
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


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("variable, code", [("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
                                            ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId")])
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
    for call in (lambda: storage.read_bytes("s3://kt-no-such-bucket/k"),
                 lambda: storage.download("s3://kt-no-such-bucket/k", tmp_path / "y"),
                 lambda: storage.list_uris("s3://kt-no-such-bucket/"),
                 lambda: storage.write_bytes("s3://kt-no-such-bucket/k", b"x"),
                 # upload_file wraps the S3 error in S3UploadFailedError
                 lambda: storage.upload(tmp_path / "f.txt", "s3://kt-no-such-bucket/f.txt")):
        with pytest.raises(KubetrainError, match=re.escape(no_bucket)):
            call()


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch):
    port = free_ports(1)[0]  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(KubetrainError, match=f"cannot reach S3 endpoint http://127.0.0.1:{port}.*"
                                             "check S3_ENDPOINT_URL"):
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
    assert {e["path"] for e in storage.read_manifest(tmp_path / "pub")} == set(files)
    manifest = (tmp_path / "pub" / "_SUCCESS").read_bytes()
    assert read_tree(tmp_path / "pub") == {**files, "_SUCCESS": manifest}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    with pytest.raises(KubetrainError, match="overwrite=True"):
        storage.publish(tmp_path / "tree", tmp_path / "pub")


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
