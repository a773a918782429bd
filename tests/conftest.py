"""Shared pytest fixtures, and the test tiers.

Every test gets exactly one tier marker, assigned here at collection:

- ``e2e``: the whole pipeline through kfp.local or the `kubetrain` CLI; marked
  explicitly (``pytestmark = pytest.mark.e2e``).
- ``integration``: real external processes or servers: marked explicitly
  (``pytestmark = pytest.mark.integration`` in the module, or on the test), or
  using one of `INTEGRATION_FIXTURES` (directly or through another fixture).
- ``unit``: everything else; `make test-fast` (``pytest -m unit``) runs these.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetrain.local.runner import unshadow_docker
from s3_server import S3Server, point_aws_at, start

# pytest puts the repo root on sys.path, where docker/ (Dockerfiles) would pose as
# the `docker` package and break kfp.local's import.
unshadow_docker()

#: fixtures that start real servers or processes: a test using one is an integration test
INTEGRATION_FIXTURES = frozenset(
    {
        "s3_server",
        "s3_env",
        "s3_env_module",  # SeaweedFS (here)
        "image_venv",  # docker/install.sh into a clean venv (tests/test_images.py)
        "kfp_local",  # kfp.local SubprocessRunner component runs (tests/test_components_local.py)
    }
)


def tier_of(item: pytest.Item) -> str:
    """The highest tier the test's explicit marks or its fixtures call for."""
    if item.get_closest_marker("e2e"):
        return "e2e"
    if item.get_closest_marker("integration") or INTEGRATION_FIXTURES.intersection(
        getattr(item, "fixturenames", ())
    ):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test its one tier marker, so `-m unit|integration|e2e` selects tiers."""
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)


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


def _point_aws_at(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    point_aws_at(s3_server, monkeypatch)
    return s3_server.make_bucket()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS variables at the SeaweedFS server; returns a fresh bucket name."""
    return _point_aws_at(s3_server, monkeypatch)


@pytest.fixture(scope="module")
def s3_env_module(s3_server: S3Server) -> Iterator[str]:
    """`s3_env` for module-scoped fixtures (one pipeline run shared by several tests):
    the variables stay set until the module's last test is done."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _point_aws_at(s3_server, monkeypatch)
