"""The Kubernetes API plumbing a pipeline step shares for the custom objects it runs.

A Katib Experiment (`kubetrain.cluster.katib_follow`) and a Trainer TrainJob
(`kubetrain.cluster.trainjob`) are both created by a step, followed to their end and
deleted. Finding credentials, reading an API error, telling a passing hiccup
from a refusal, the poll-until-done loop and making SIGTERM unwind to the
delete do not depend on the resource, so they live here; every message that
names the resource or its fix (its CRD, its RBAC rule, its kubectl hint) is
written by the caller, next to its API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import threading
from typing import Any, Callable, Iterator, TypeVar

from kubetrain.core.errors import KubetrainError

State = TypeVar("State")
Result = TypeVar("Result")


def run_name(run_id: str, prefix: str, max_len: int) -> str:
    """A per-run resource name: `prefix-` + 10 hex digits of sha256(run_id).

    Hashing keeps any run id (KFP's UUIDs, local names with '_') inside the
    DNS-label rules and `max_len`, and a retried step of the same run finds the
    resource it created.
    """
    prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:max_len - 11] or "kt"
    if not prefix[0].isalpha():
        prefix = "kt-" + prefix[:max_len - 14]
    return f"{prefix}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def custom_objects_api() -> Any:
    """A CustomObjectsApi from the pod's ServiceAccount, else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as e:  # noqa: BLE001 - any kubeconfig problem has the same fix
            raise KubetrainError(
                "no Kubernetes credentials: not running in a pod with a ServiceAccount and no "
                f"usable kubeconfig ({' '.join(str(e).split())[:120]}); run inside the "
                "cluster or set KUBECONFIG") from None
    return client.CustomObjectsApi()


def detail_of(exc: Any) -> str:
    """The API server's own words: the Status body's message, else the body, else the reason."""
    body = str(getattr(exc, "body", "") or "")
    try:
        detail = json.loads(body).get("message", "") if body else ""
    except (ValueError, AttributeError):
        detail = body[:300]
    return detail or str(getattr(exc, "reason", "") or exc)


def api_error(exc: Any, creating: bool, doing: str, *, not_installed: str, gone: str,
              forbidden: str, exists: str, rejected: str) -> KubetrainError:
    """One line for an ApiException: the caller's message for its status, else a generic one.

    A 404 on create means the CRD (or the namespace) is missing, a 404 later
    that someone deleted the object; `doing` completes "Kubernetes API error
    while ..." for any other status.
    """
    status = getattr(exc, "status", None)
    message = {404: not_installed if creating else gone, 403: forbidden, 409: exists,
               400: rejected, 422: rejected}.get(status)
    return KubetrainError(message or f"Kubernetes API error while {doing}: {status or ''} "
                                     f"{detail_of(exc)}")


def transient(exc: Exception) -> bool:
    """Whether polling again may succeed: no HTTP answer (dropped connection, TLS), 5xx or 429."""
    status = getattr(exc, "status", None)
    return status is None and not isinstance(exc, KubetrainError) or (
        isinstance(status, int) and (status >= 500 or status == 429 or status == 0))


def follow(get: Callable[[], State], outcome: Callable[[State], Result | None],
           describe: Callable[[State], str], timed_out: Callable[[State, float], str],
           timeout_s: float, poll_s: float, sleep: Callable[[float], None],
           now: Callable[[], float], log: Callable[[str], None]) -> Result:
    """Poll `get` until `outcome` returns a result; log each new `describe` line once.

    `outcome` raises when the object failed and returns None while it runs.
    Past `timeout_s` this raises `timed_out(state, timeout_s)`; the last sleep is cut
    to the deadline, so a timeout never overshoots by a whole poll.
    """
    started, last = now(), None
    while True:
        state = get()
        line = describe(state)
        if line != last:
            log(line)
            last = line
        result = outcome(state)
        if result is not None:
            return result
        left = timeout_s - (now() - started)
        if left <= 0:
            raise KubetrainError(timed_out(state, timeout_s))
        sleep(min(poll_s, left))


@contextlib.contextmanager
def sigterm_raises(what: str) -> Iterator[None]:
    """Let SIGTERM unwind through the caller's `finally`, so what it created is deleted.

    A cancelled KFP run stops its pods with SIGTERM, whose default action
    skips every `finally`. Only the main thread may set signal handlers;
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(f"terminated by signal {signum} while following {what}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
