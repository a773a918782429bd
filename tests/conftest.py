"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from s3_server import S3Server, start


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
