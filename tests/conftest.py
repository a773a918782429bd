"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from kubetrain.local.runner import unshadow_docker
from s3_server import S3Server, start

# pytest puts the repo root on sys.path, where docker/ (Dockerfiles) would pose as
# the `docker` package and break kfp.local's import.
unshadow_docker()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models train faster on one thread, and parallel test work shares 2 cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server (own ports, temp data) for the session; killed at teardown.

    Yields an `S3Server` with `endpoint_url`, `access_key`, `secret_key`,
    `region`, `client()` and `make_bucket()`.
    """
    try:
        server: S3Server = start(tmp_path_factory.mktemp("seaweedfs"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS variables at the SeaweedFS server; returns a fresh bucket name."""
    for name in ("AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_MAX_ATTEMPTS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    return s3_server.make_bucket()
