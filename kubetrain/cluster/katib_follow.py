"""Following a Katib Experiment: its progress, its trials, and the run that owns it.

Split into pure functions over the documents the API returns (`progress_of`,
`follow`, `trial_row`), tested on status documents of each phase, and a thin
`run` that talks to the Kubernetes API through `kubetrain.cluster.follow`: it
creates the Experiment (or re-attaches to the one an earlier attempt of the
step created), follows it and deletes it (and its GPU trials) however following
ends. Everything that names Katib (its CRD, its RBAC rule, its kubectl hints)
is written here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubetrain.cluster import follow as follower
from kubetrain.cluster import k8s
from kubetrain.cluster.katib_checks import GROUP, VERSION, validate
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.training import tuning

EXPERIMENTS, TRIALS = "experiments", "trials"
EXPERIMENT_LABEL = "katib.kubeflow.org/experiment"  # Katib labels each Trial with it
#: The trial Job's container: Katib collects its metrics, its logs say why a trial failed.
PRIMARY_CONTAINER = "training"
ROLE_FILE = "manifests/base/role.yaml"
PHASES = ("Created", "Running", "Restarting", "Succeeded", "Failed")


# ------------------------------------------------------------------------ progress


def _metric_value(
    metrics: list[Mapping[str, Any]], name: str, strategy: str = "latest"
) -> float | None:
    for m in metrics or []:
        if m.get("name") == name:
            raw = m.get(strategy) or m.get("latest")
            try:
                value = float(raw)
            except (TypeError, ValueError):
                return None  # "unavailable": the trial printed no such metric
            return value if math.isfinite(value) else None
    return None


def _strategy(spec: Mapping[str, Any], metric: str) -> str:
    for s in ((spec.get("objective") or {}).get("metricStrategies")) or []:
        if s.get("name") == metric:
            return s.get("value") or "latest"
    return "latest"


def cast_params(assignments: list[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Katib's string assignments back to RunConfig names and Python types (tuning.Param.cast)."""
    space = {p.name: p for p in tuning.search_space()}
    out: dict[str, Any] = {}
    for a in assignments or []:
        field = str(a.get("name")).replace("-", "_")
        param = space.get(field) or tuning.Param(field, "categorical")
        out[field] = param.cast(a.get("value"))
    return out


def progress_of(exp_obj: Mapping[str, Any]) -> dict[str, Any]:
    """Phase, trial counts and best trial so far of an Experiment document."""
    meta, spec = exp_obj.get("metadata") or {}, exp_obj.get("spec") or {}
    status = exp_obj.get("status") or {}
    true = [c for c in follower.true_conditions(exp_obj) if c.get("type") in PHASES]
    terminal = [c for c in true if c.get("type") in ("Succeeded", "Failed")]
    current = (terminal or true or [{}])[-1]
    count = lambda key: int(status.get(key) or 0)  # noqa: E731
    counts = {
        "succeeded": count("trialsSucceeded"),
        "failed": count("trialsFailed"),
        "running": count("trialsRunning"),
        "pending": count("trialsPending"),
        "early_stopped": count("trialsEarlyStopped"),
        "killed": count("trialsKilled"),
        "metrics_unavailable": count("trialMetricsUnavailable"),
    }
    objective = (spec.get("objective") or {}).get("objectiveMetricName", "")
    optimal = status.get("currentOptimalTrial") or {}
    best = None
    if optimal.get("bestTrialName"):
        best = {
            "trial": optimal["bestTrialName"],
            "value": _metric_value(
                (optimal.get("observation") or {}).get("metrics"),
                objective,
                _strategy(spec, objective),
            ),
            "params": cast_params(optimal.get("parameterAssignments")),
        }
    return {
        "name": meta.get("name", "?"),
        "namespace": meta.get("namespace", ""),
        "phase": current.get("type", "Pending"),
        "reason": current.get("reason", ""),
        "message": current.get("message", ""),
        "objective": objective,
        "max_trials": spec.get("maxTrialCount"),
        "max_failed": spec.get("maxFailedTrialCount"),
        # what Katib counts toward maxTrialCount and maxFailedTrialCount
        "done": counts["succeeded"]
        + counts["failed"]
        + counts["killed"]
        + counts["early_stopped"]
        + counts["metrics_unavailable"],
        "failed_total": counts["failed"] + counts["metrics_unavailable"],
        "trials": counts,
        "best": best,
    }


def _describe(p: Mapping[str, Any]) -> str:
    t = p["trials"]
    best = p["best"]
    best_text = "best -"
    if best and best["value"] is not None:
        params = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in best["params"].items()
        )
        best_text = f"best {p['objective']} {best['value']:.4f} ({params})"
    return (
        f"Katib Experiment {p['name']}: {p['phase']} | trials {p['done']}/"
        f"{p['max_trials'] or '?'} done: {t['succeeded']} succeeded, {t['failed']} failed, "
        f"{t['early_stopped']} early-stopped; {t['running']} running, {t['pending']} "
        f"pending | {best_text}"
    )


def _timed_out(p: Mapping[str, Any], timeout_s: float) -> str:
    return (
        f"Katib Experiment {p['name']} did not finish within {timeout_s:g} s (phase "
        f"{p['phase']}, {p['done']}/{p['max_trials'] or '?'} trials done); raise "
        f"--wait-timeout or {_hint(p)}"
    )


def _hint(p: Mapping[str, Any]) -> str:
    ns = f"-n {p['namespace']} " if p["namespace"] else ""
    return f"check `kubectl {ns}describe experiment {p['name']}`"


def follow(
    get: Callable[[], Mapping[str, Any]],
    timeout_s: float,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str, str], None] = progress.log,
    error: follower.Error | None = None,
    initial: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Poll the Experiment until it ends; return the best hyperparameters and the counts.

    Raises on a Failed Experiment, on failed trials reaching maxFailedTrialCount
    (Katib's own rule: failed >= max, so the step fails even before the
    controller flips the phase) and when `timeout_s` passes. Transient API
    errors of `get` are retried under `kubetrain.cluster.follow`'s one policy;
    `initial` (the Experiment sent) stands in for the state until a read succeeds.
    """
    first = progress_of(initial or {})
    return follower.poll(
        lambda: progress_of(get()),
        _outcome,
        _describe,
        _timed_out,
        state=first,
        pace=follower.Pace(timeout_s, poll_s, sleep, now),
        log=lambda line: log("tune", line),
        error=error,
        what=f"Katib Experiment {first['name']}",
    )


def _outcome(p: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result of a Succeeded Experiment, None while it runs; raises once it failed."""
    if p["phase"] == "Failed":
        raise KubetrainError(
            f"Katib Experiment {p['name']} failed "
            f"({follower.why(p['reason'], p['message'])}); {_hint(p)}"
        )
    limit = p["max_failed"]
    if limit is not None and p["failed_total"] and p["failed_total"] >= limit:
        raise KubetrainError(
            f"Katib Experiment {p['name']}: {p['failed_total']} trials failed "
            f"(maxFailedTrialCount {limit}); see the trial logs with `kubectl "
            f"{'-n ' + p['namespace'] + ' ' if p['namespace'] else ''}logs -l "
            f"{EXPERIMENT_LABEL}={p['name']} -c {PRIMARY_CONTAINER}`"
        )
    if p["phase"] != "Succeeded":
        return None
    best = p["best"]
    if not best or best["value"] is None:
        raise KubetrainError(
            f"Katib Experiment {p['name']} succeeded but no trial reported "
            f"{p['objective']}; check that trials print `{p['objective']}=<value>` "
            f"lines and {_hint(p)}"
        )
    return {
        "name": p["name"],
        "hyperparameters": best["params"],
        "value": best["value"],
        "trial": best["trial"],
        "phase": p["phase"],
        "reason": p["reason"],
        "trials": p["trials"],
        "done": p["done"],
    }


# ------------------------------------------------------------------------- trials


def _state(trial: Mapping[str, Any]) -> str:
    types = {c.get("type") for c in follower.true_conditions(trial)}
    for katib, ours in (
        ("Failed", "FAIL"),
        ("MetricsUnavailable", "FAIL"),
        ("Killed", "KILLED"),
        ("EarlyStopped", "PRUNED"),
        ("Succeeded", "COMPLETE"),
        ("Running", "RUNNING"),
    ):
        if katib in types:
            return ours
    return "PENDING"


def _seconds(status: Mapping[str, Any]) -> float | None:
    from datetime import datetime

    try:
        start = datetime.fromisoformat(str(status["startTime"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(status["completionTime"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return round((end - start).total_seconds(), 3)


def trial_row(trial: Mapping[str, Any], number: int) -> dict[str, Any]:
    """One Katib Trial as a row of the local trial table (number, state, value, params...)."""
    spec, status = trial.get("spec") or {}, trial.get("status") or {}
    objective = (spec.get("objective") or {}).get("objectiveMetricName", "")
    metrics = (status.get("observation") or {}).get("metrics") or []
    state = _state(trial)
    value = (
        None if state == "FAIL" else _metric_value(metrics, objective, _strategy(spec, objective))
    )
    row: dict[str, Any] = {
        "number": number,
        "name": (trial.get("metadata") or {}).get("name", ""),
        "state": state,
        "value": value,
        "params": cast_params(spec.get("parameterAssignments")),
        "metrics": {m["name"]: _metric_value(metrics, m["name"]) for m in metrics if m.get("name")},
        "intermediate": [],  # per-epoch values live in Katib's DB, not on the Trial
        "seconds": _seconds(status),
    }
    if state == "FAIL":
        failed = [
            c
            for c in follower.true_conditions(trial)
            if c.get("type") in ("Failed", "MetricsUnavailable")
        ]
        row["error"] = (
            ": ".join(x for x in (failed[-1].get("reason"), failed[-1].get("message")) if x)
            if failed
            else "failed"
        )
    return row


def trial_rows(items: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of all Trials, numbered in creation order like Optuna's trial numbers."""
    ordered = sorted(
        items,
        key=lambda t: (
            str((t.get("metadata") or {}).get("creationTimestamp", "")),
            str((t.get("metadata") or {}).get("name", "")),
        ),
    )
    return [trial_row(t, i) for i, t in enumerate(ordered)]


# ------------------------------------------------------------------ Kubernetes API


def api_error(
    exc: BaseException, action: str, namespace: str, name: str, service_account: str = ""
) -> KubetrainError:
    """One line naming the cause and the fix of a Kubernetes API failure (action: a verb)."""
    who = f"ServiceAccount {service_account}" if service_account else "this identity"
    return k8s.api_error(
        exc,
        action == "create",
        f"trying to {action} Katib Experiment {name} in {namespace}",
        not_installed=(
            f"Katib is not installed (no experiments.kubeflow.org CRD) or namespace "
            f"{namespace} does not exist; check `kubectl get crd experiments.kubeflow.org` "
            f"and `kubectl get namespace {namespace}`"
        ),
        gone=(
            f"Katib Experiment {name} is gone from namespace {namespace} "
            f"(deleted while kubetrain was following it?)"
        ),
        forbidden=(
            f"{who} may not {action} Katib experiments/trials in namespace {namespace}; "
            f"apply the Role and RoleBinding in {ROLE_FILE} (`kubectl apply -k manifests/base`)"
        ),
        exists=(
            f"Katib Experiment {name} already exists in namespace {namespace} and was not "
            f"created by kubetrain; delete it (`kubectl -n {namespace} delete experiment "
            f"{name}`) or use another name"
        ),
        rejected=f"Katib rejected Experiment {name}: {k8s.detail_of(exc)}",
    )


def _list_trials(api, namespace: str, name: str) -> list[Mapping[str, Any]]:
    listing = api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, TRIALS, label_selector=f"{EXPERIMENT_LABEL}={name}"
    )
    return listing.get("items") or []


def trial_table(
    api,
    namespace: str,
    name: str,
    service_account: str = "",
    pace: follower.Pace | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict]:
    """The Experiment's Trials (label katib.kubeflow.org/experiment=NAME) as table rows.

    With `pace` the listing is retried under the follower's one policy; without,
    it is tried once.
    """
    error = _error_for(namespace, name, service_account)
    pace = pace or follower.Pace(timeout_s=0)
    return trial_rows(
        follower.call(
            lambda: _list_trials(api, namespace, name),
            "list",
            f"the trials of Katib Experiment {name}",
            error=error,
            pace=pace,
            log=log,
        )
    )


def _error_for(namespace: str, name: str, account: str) -> follower.Error:
    return lambda exc, verb: api_error(exc, verb, namespace, name, account)


def run(
    exp: dict[str, Any],
    namespace: str,
    api=None,
    timeout_s: float = 6 * 3600,
    keep: bool = False,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str, str], None] = progress.log,
    service_account: str = "",
) -> tuple[dict[str, Any], list[dict]]:
    """Create the Experiment (or re-attach to this run's), follow it, read its trials.

    `service_account` is the identity making these API calls (the pipeline
    runner's, `ClusterConfig.service_account`), named when one is refused; not
    the trial pods' account, which has no API rights at all.

    It is deleted unless `keep`, in a `finally`, so a timeout, a failure or a
    cancelled run (SIGTERM) does not leave GPU trials running; an Experiment
    of that name that kubetrain did not create (409 without our labels) is never
    touched. Returns (follow's result, trial rows).
    """
    validate(exp)
    name = exp["metadata"]["name"]
    exp = {**exp, "metadata": {**exp["metadata"], "namespace": namespace}}
    account = service_account
    api = api or k8s.custom_objects_api()
    ref = follower.Ref(
        GROUP,
        VERSION,
        EXPERIMENTS,
        namespace,
        name,
        f"Katib Experiment {name}",
        f"kubectl -n {namespace} delete experiment {name}",
    )
    pace = follower.Pace(timeout_s, poll_s, sleep, now)
    say = lambda line: log("tune", line)  # noqa: E731
    error = _error_for(namespace, name, account)
    with follower.owned(api, ref, exp, error=error, pace=pace, keep=keep, log=say) as created:
        if created:
            say(
                f"created Katib Experiment {name} in namespace {namespace} "
                f"({exp['spec']['algorithm']['algorithmName']}, "
                f"{exp['spec']['maxTrialCount']} trials, "
                f"{exp['spec']['parallelTrialCount']} in parallel)"
            )
        try:
            result = follow(
                lambda: follower.get(api, ref),
                timeout_s,
                poll_s,
                sleep=sleep,
                now=now,
                log=log,
                error=error,
                initial=exp,
            )
        except KubetrainError as e:
            rows = _rows_or_empty(api, namespace, name, account)
            first = next((r for r in rows if r["state"] == "FAIL" and r.get("error")), None)
            if first is None:
                raise
            raise KubetrainError(
                f"{e}; first failed trial {first['name']}: {first['error']}"
            ) from None
        return result, trial_table(api, namespace, name, account, pace, say)


def _rows_or_empty(api, namespace: str, name: str, account: str) -> list[dict]:
    try:
        return trial_table(api, namespace, name, account)
    except Exception:  # reporting the original failure matters more than the detail
        return []
