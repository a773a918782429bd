"""Test doubles: time for follow loops (Katib, TrainJob, KFP runs) that run in microseconds,
and the API failures every custom-object follower must ride out or report."""

from __future__ import annotations

import json


class Clock:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def api_exception(status: int, message: str = "", reason: str = "x"):
    """An ApiException as the kubernetes client raises it, with a Status body."""
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return exc


def transient_errors() -> list[Exception]:
    """One of each kind the retry policy retries: 5xx, 429, a dropped connection, no answer."""
    import urllib3

    return [
        api_exception(503, "etcdserver: leader changed"),
        api_exception(429, "too many requests"),
        ConnectionResetError("connection reset by peer"),
        urllib3.exceptions.ProtocolError("Connection aborted."),
    ]


def backoff_sleeps(poll_s: float, failures: int, cap_s: float = 60.0) -> list[float]:
    """The sleeps after `failures` transient errors in a row: poll_s doubled each time, capped."""
    return [min(max(poll_s, 1.0) * 2**i, cap_s) for i in range(failures)]
