"""Following a Kubernetes custom object a step owns: create it, poll it to its end, delete it.

A Katib Experiment and a Kubeflow Trainer TrainJob today (a SparkApplication
or an InferenceService later) live the same life inside the step that needs
them, so one follower serves them all:

* `create`: objects are named from the run (`k8s.run_name`), so a 409
  AlreadyExists means an earlier attempt of this very step (a preempted or
  retried pod) created it: the follower re-attaches to it instead of failing
  or creating a second one. An object of that name without the body's kind and
  labels is someone else's; that 409 fails with the caller's message.
* `poll`: read the object until the caller's `outcome` says it is done, log
  each new `describe` line once; a failed object raises the caller's message
  with the controller's reason (`why`).
* one retry policy for every API call (`call`, `poll`): no HTTP answer, 5xx
  and 429 are retried with capped exponential backoff until the follow
  timeout; anything else fails at once with the caller's one-line message.
* `owned`: create, then delete however the block ends (failure, timeout,
  SIGTERM from a cancelled run) unless told to keep the object.

Nothing here names a resource: CRD names, RBAC rules and kubectl hints are the
caller's, passed as `Ref.title`, `Ref.delete_hint` and the `error` function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kubetrain.cluster import k8s
from kubetrain.core.errors import KubetrainError

T = TypeVar("T")
State = TypeVar("State")
Result = TypeVar("Result")

#: Longest wait between two tries of a failing API call.
BACKOFF_CAP_S = 60.0
#: How long deleting keeps retrying: a cancelled pod is killed ~30 s after SIGTERM.
DELETE_BUDGET_S = 20.0

#: (exception, verb) -> the caller's one-line error; verb is create, get, list or delete.
Error = Callable[[BaseException, str], KubetrainError]
Log = Callable[[str], None]


@dataclass(frozen=True)
class Ref:
    """Where one custom object lives, and how messages name it (the caller's words)."""

    group: str
    version: str
    plural: str
    namespace: str
    name: str
    title: str  # "Katib Experiment x", "TrainJob ns/x"
    delete_hint: str = ""  # "kubectl -n ns delete experiment x"

    @classmethod
    def of(cls, group: str, version: str, plural: str, kind: str, namespace: str, name: str) -> Ref:
        """The usual wording: "TrainJob ns/x", deleted with "kubectl -n ns delete trainjob x"
        (the kubectl resource is the kind's last word, lower-cased)."""
        resource = kind.split()[-1].lower()
        return cls(
            group,
            version,
            plural,
            namespace,
            name,
            f"{kind} {namespace}/{name}",
            f"kubectl -n {namespace} delete {resource} {name}",
        )


@dataclass(frozen=True)
class Pace:
    """How long to follow and how often to look; tests pass a fake clock."""

    timeout_s: float
    poll_s: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.monotonic
    cap_s: float = BACKOFF_CAP_S


def generic_error(what: str) -> Error:
    """An `Error` for callers without resource-specific messages: status and the server's words."""

    def error(exc: BaseException, verb: str) -> KubetrainError:
        return KubetrainError(f"Kubernetes API error while trying to {verb} {what}: {_cause(exc)}")

    return error


# ------------------------------------------------------------------ the retry policy


def backoff(failures: int, pace: Pace) -> float:
    """The wait after `failures` failed tries in a row: the poll interval, doubled, capped."""
    return min(max(pace.poll_s, 1.0) * 2.0 ** min(failures - 1, 30), pace.cap_s)


def retry_wait(
    exc: BaseException, failures: int, verb: str, what: str, error: Error, pace: Pace, log: Log
) -> float:
    """The one retry policy: seconds to wait before trying again, or raise at once.

    Transient (`k8s.transient`: no HTTP answer, 5xx, 429): log and back off.
    An API refusal (any other status): the caller's one-line `error`. Anything
    else (a bug, a KubetrainError) propagates unchanged.
    """
    if not k8s.transient(exc):
        if isinstance(getattr(exc, "status", None), int):
            raise error(exc, verb) from None
        raise exc
    wait = backoff(failures, pace)
    log(
        f"Kubernetes API unavailable while trying to {verb} {what} ({_cause(exc)}); "
        f"retry {failures} in {wait:g} s"
    )
    return wait


def call(fn: Callable[[], T], verb: str, what: str, *, error: Error, pace: Pace, log: Log) -> T:
    """`fn()`, one API call, under the retry policy; past `pace.timeout_s` the last error fails."""
    started, failures = pace.now(), 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by retry_wait
            failures += 1
            wait = retry_wait(exc, failures, verb, what, error, pace, log)
            left = pace.timeout_s - (pace.now() - started)
            if left <= 0:
                raise KubetrainError(
                    f"{error(exc, verb)} (gave up after {failures} tries in {pace.timeout_s:g} s)"
                ) from None
            pace.sleep(min(wait, left))


def _cause(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    text = (
        f"{status} {k8s.detail_of(exc)}" if status is not None else f"{type(exc).__name__}: {exc}"
    )
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


# ------------------------------------------------------------------- the object


def get(api: Any, ref: Ref) -> dict[str, Any]:
    """The object as the API server has it now (one try; `call` and `poll` retry)."""
    return api.get_namespaced_custom_object(
        ref.group, ref.version, ref.namespace, ref.plural, ref.name
    )


def ours(body: Mapping[str, Any], existing: Mapping[str, Any]) -> bool:
    """Whether `existing` is what `body` creates: same kind and every label of `body`.

    Names derive from the run id, so this tells an earlier attempt of the same
    step from a stranger's object that happens to have the name.
    """
    labels = (body.get("metadata") or {}).get("labels") or {}
    found = (existing.get("metadata") or {}).get("labels") or {}
    return (
        bool(labels)
        and existing.get("kind") == body.get("kind")
        and all(found.get(k) == v for k, v in labels.items())
    )


def create(
    api: Any, ref: Ref, body: Mapping[str, Any], *, error: Error, pace: Pace, log: Log
) -> bool:
    """Create `body`; True when this call created it, False when it re-attached (409, ours).

    A create retried after a dropped answer may find its own object: that 409
    re-attaches too. A 409 for an object that is not ours raises `error`.
    """
    conflicts: list[BaseException] = []

    def attempt() -> bool:
        try:
            api.create_namespaced_custom_object(
                ref.group, ref.version, ref.namespace, ref.plural, dict(body)
            )
        except Exception as exc:  # noqa: BLE001 - only a 409 is handled here
            if getattr(exc, "status", None) != 409:
                raise
            conflicts.append(exc)
            return False
        return True

    if call(attempt, "create", ref.title, error=error, pace=pace, log=log):
        return True
    existing = call(lambda: get(api, ref), "get", ref.title, error=error, pace=pace, log=log)
    if not ours(body, existing):
        raise error(conflicts[-1], "create")
    log(f"re-attached to {ref.title}: an earlier attempt of this step created it")
    return False


def delete(api: Any, ref: Ref, *, error: Error, pace: Pace, log: Log) -> None:
    """Delete the object (its children go in the background); never raises.

    It runs in a `finally`, where an exception would hide why following ended:
    a failure is logged with the caller's manual hint instead. 404 = already gone.
    """

    def attempt() -> bool:
        try:
            api.delete_namespaced_custom_object(
                ref.group,
                ref.version,
                ref.namespace,
                ref.plural,
                ref.name,
                propagation_policy="Background",
            )
        except Exception as exc:  # noqa: BLE001 - only a 404 is handled here
            if getattr(exc, "status", None) != 404:
                raise
            return False
        return True

    budget = dataclasses.replace(pace, timeout_s=min(pace.timeout_s, DELETE_BUDGET_S))
    try:
        if call(attempt, "delete", ref.title, error=error, pace=budget, log=log):
            log(f"deleted {ref.title}")
    except Exception as exc:  # noqa: BLE001 - reported, never raised (see above)
        hint = f"; delete it with `{ref.delete_hint}`" if ref.delete_hint else ""
        log(f"could not delete {ref.title} ({exc}){hint}")


@contextlib.contextmanager
def owned(
    api: Any, ref: Ref, body: Mapping[str, Any], *, error: Error, pace: Pace, keep: bool, log: Log
) -> Iterator[bool]:
    """Create (or re-attach to) the object for the block; delete it afterwards unless `keep`.

    Yields whether this call created it. SIGTERM raises inside the block, so a
    cancelled run deletes too; someone else's object (409, not `ours`) fails in
    `create` and is never touched.
    """
    with sigterm_raises(ref.title):
        created = create(api, ref, body, error=error, pace=pace, log=log)
        try:
            yield created
        finally:
            if keep:
                hint = f" (delete it with `{ref.delete_hint}`)" if ref.delete_hint else ""
                log(f"kept {ref.title}{hint}")
            else:
                delete(api, ref, error=error, pace=pace, log=log)


# ------------------------------------------------------------------- following


def poll(
    get: Callable[[], State],
    outcome: Callable[[State], Result | None],
    describe: Callable[[State], str],
    timed_out: Callable[[State, float], str],
    *,
    state: State,
    pace: Pace,
    log: Log,
    error: Error | None = None,
    what: str = "the object",
) -> Result:
    """Read with `get` until `outcome` returns a result; log each new `describe` line once.

    `outcome` raises when the object failed and returns None while it runs.
    Reads that fail transiently are retried under the one policy (backing off
    instead of polling); `state` is the last good read, initially what the
    caller knows (the body). Past `pace.timeout_s` this raises
    `timed_out(state, timeout_s)`; the last sleep is cut to the deadline.
    """
    error = error or generic_error(what)
    started, last, failures = pace.now(), None, 0
    while True:
        try:
            state = get()
        except Exception as exc:  # noqa: BLE001 - classified by retry_wait
            failures += 1
            wait = retry_wait(exc, failures, "get", what, error, pace, log)
        else:
            failures = 0
            line = describe(state)
            if line != last:
                log(line)
                last = line
            result = outcome(state)
            if result is not None:
                return result
            wait = pace.poll_s
        left = pace.timeout_s - (pace.now() - started)
        if left <= 0:
            message = timed_out(state, pace.timeout_s)
            if failures:
                message += f"; the last {failures} read(s) got no answer from the Kubernetes API"
            raise KubetrainError(message)
        pace.sleep(min(wait, left))


def true_conditions(obj: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The object's status conditions that hold now (status "True"), in the controller's order."""
    conditions = (((obj or {}).get("status") or {}).get("conditions")) or []
    return [c for c in conditions if str(c.get("status")) == "True"]


def why(reason: str, message: str) -> str:
    """The controller's own words for an outcome: "reason: message"."""
    return ": ".join(x for x in (reason, message) if x) or "no reason given"


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
