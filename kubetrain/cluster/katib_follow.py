"""Following a Katib Experiment: its progress, its trials, and the run that owns it.

Split into pure functions over the documents the API returns (`progress_of`,
`follow`, `trial_row`), tested on status documents of each phase, and a thin
`run` that talks to the Kubernetes API: it creates the Experiment, follows it
and deletes it (and its GPU trials) however following ends.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

from kubetrain.cluster import k8s

from kubetrain.core import progress

from kubetrain.training import tuning
from kubetrain.core.errors import KubetrainError
from kubetrain.cluster.katib_checks import GROUP, VERSION, validate

EXPERIMENTS, TRIALS = "experiments", "trials"
EXPERIMENT_LABEL = "katib.kubeflow.org/experiment"  # Katib labels each Trial with it
#: The trial Job's container: Katib collects its metrics, its logs say why a trial failed.
PRIMARY_CONTAINER = "training"
ROLE_FILE = "manifests/base/role.yaml"
PHASES = ("Created", "Running", "Restarting", "Succeeded", "Failed")


# ------------------------------------------------------------------------ progress

def _true_conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    conditions = ((obj.get("status") or {}).get("conditions")) or []
    return [c for c in conditions if str(c.get("status")) == "True"]


def _metric_value(metrics: list[Mapping[str, Any]], name: str, strategy: str = "latest"
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
    true = [c for c in _true_conditions(exp_obj) if c.get("type") in PHASES]
    terminal = [c for c in true if c.get("type") in ("Succeeded", "Failed")]
    current = (terminal or true or [{}])[-1]
    count = lambda key: int(status.get(key) or 0)  # noqa: E731
    counts = {"succeeded": count("trialsSucceeded"), "failed": count("trialsFailed"),
              "running": count("trialsRunning"), "pending": count("trialsPending"),
              "early_stopped": count("trialsEarlyStopped"), "killed": count("trialsKilled"),
              "metrics_unavailable": count("trialMetricsUnavailable")}
    objective = (spec.get("objective") or {}).get("objectiveMetricName", "")
    optimal = status.get("currentOptimalTrial") or {}
    best = None
    if optimal.get("bestTrialName"):
        best = {"trial": optimal["bestTrialName"],
                "value": _metric_value((optimal.get("observation") or {}).get("metrics"),
                                       objective, _strategy(spec, objective)),
                "params": cast_params(optimal.get("parameterAssignments"))}
    return {"name": meta.get("name", "?"), "namespace": meta.get("namespace", ""),
            "phase": current.get("type", "Pending"), "reason": current.get("reason", ""),
            "message": current.get("message", ""), "objective": objective,
            "max_trials": spec.get("maxTrialCount"),
            "max_failed": spec.get("maxFailedTrialCount"),
            # what Katib counts toward maxTrialCount and maxFailedTrialCount
            "done": counts["succeeded"] + counts["failed"] + counts["killed"]
            + counts["early_stopped"] + counts["metrics_unavailable"],
            "failed_total": counts["failed"] + counts["metrics_unavailable"],
            "trials": counts, "best": best}


def _describe(p: Mapping[str, Any]) -> str:
    t = p["trials"]
    best = p["best"]
    best_text = "best -"
    if best and best["value"] is not None:
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in best["params"].items())
        best_text = f"best {p['objective']} {best['value']:.4f} ({params})"
    return (f"Katib Experiment {p['name']}: {p['phase']} | trials {p['done']}/"
            f"{p['max_trials'] or '?'} done: {t['succeeded']} succeeded, {t['failed']} failed, "
            f"{t['early_stopped']} early-stopped; {t['running']} running, {t['pending']} "
            f"pending | {best_text}")


def _timed_out(p: Mapping[str, Any], timeout_s: float) -> str:
    return (f"Katib Experiment {p['name']} did not finish within {timeout_s:g} s (phase "
            f"{p['phase']}, {p['done']}/{p['max_trials'] or '?'} trials done); raise "
            f"--tune-timeout or {_hint(p)}")


def _hint(p: Mapping[str, Any]) -> str:
    ns = f"-n {p['namespace']} " if p["namespace"] else ""
    return f"check `kubectl {ns}describe experiment {p['name']}`"


def follow(get: Callable[[], Mapping[str, Any]], timeout_s: float, poll_s: float = 10.0,
           sleep: Callable[[float], None] = time.sleep,
           now: Callable[[], float] = time.monotonic,
           log: Callable[[str, str], None] = progress.log) -> dict[str, Any]:
    """Poll the Experiment until it ends; return the best hyperparameters and the counts.

    Raises on a Failed Experiment, on failed trials reaching maxFailedTrialCount
    (Katib's own rule: failed >= max, so the step fails even before the
    controller flips the phase) and when `timeout_s` passes.
    """
    return k8s.follow(lambda: progress_of(get()), _outcome, _describe, _timed_out, timeout_s,
                      poll_s, sleep, now, lambda line: log("tune", line))


def _outcome(p: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result of a Succeeded Experiment, None while it runs; raises once it failed."""
    if p["phase"] == "Failed":
        why = ": ".join(x for x in (p["reason"], p["message"]) if x) or "no reason given"
        raise KubetrainError(f"Katib Experiment {p['name']} failed ({why}); {_hint(p)}")
    limit = p["max_failed"]
    if limit is not None and p["failed_total"] and p["failed_total"] >= limit:
        raise KubetrainError(
            f"Katib Experiment {p['name']}: {p['failed_total']} trials failed "
            f"(maxFailedTrialCount {limit}); see the trial logs with `kubectl "
            f"{'-n ' + p['namespace'] + ' ' if p['namespace'] else ''}logs -l "
            f"{EXPERIMENT_LABEL}={p['name']} -c {PRIMARY_CONTAINER}`")
    if p["phase"] != "Succeeded":
        return None
    best = p["best"]
    if not best or best["value"] is None:
        raise KubetrainError(
            f"Katib Experiment {p['name']} succeeded but no trial reported "
            f"{p['objective']}; check that trials print `{p['objective']}=<value>` "
            f"lines and {_hint(p)}")
    return {"name": p["name"], "hyperparameters": best["params"],
            "value": best["value"], "trial": best["trial"], "phase": p["phase"],
            "reason": p["reason"], "trials": p["trials"], "done": p["done"]}


# ------------------------------------------------------------------------- trials

def _state(trial: Mapping[str, Any]) -> str:
    types = {c.get("type") for c in _true_conditions(trial)}
    for katib, ours in (("Failed", "FAIL"), ("MetricsUnavailable", "FAIL"), ("Killed", "KILLED"),
                        ("EarlyStopped", "PRUNED"), ("Succeeded", "COMPLETE"),
                        ("Running", "RUNNING")):
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
    value = None if state == "FAIL" else _metric_value(metrics, objective,
                                                       _strategy(spec, objective))
    row: dict[str, Any] = {
        "number": number, "name": (trial.get("metadata") or {}).get("name", ""),
        "state": state, "value": value, "params": cast_params(spec.get("parameterAssignments")),
        "metrics": {m["name"]: _metric_value(metrics, m["name"]) for m in metrics
                    if m.get("name")},
        "intermediate": [],  # per-epoch values live in Katib's DB, not on the Trial
        "seconds": _seconds(status)}
    if state == "FAIL":
        failed = [c for c in _true_conditions(trial)
                  if c.get("type") in ("Failed", "MetricsUnavailable")]
        row["error"] = ": ".join(x for x in (failed[-1].get("reason"), failed[-1].get("message"))
                                 if x) if failed else "failed"
    return row


def trial_rows(items: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of all Trials, numbered in creation order like Optuna's trial numbers."""
    ordered = sorted(items, key=lambda t: (str((t.get("metadata") or {}).get(
        "creationTimestamp", "")), str((t.get("metadata") or {}).get("name", ""))))
    return [trial_row(t, i) for i, t in enumerate(ordered)]


# ------------------------------------------------------------------ Kubernetes API

def api_error(exc: Exception, action: str, namespace: str, name: str,
              service_account: str = "") -> KubetrainError:
    """One line naming the cause and the fix of a Kubernetes API failure."""
    who = f"ServiceAccount {service_account}" if service_account else "this identity"
    return k8s.api_error(
        exc, action == "create", f"trying to {action} Katib Experiment {name} in {namespace}",
        not_installed=(
            f"Katib is not installed (no experiments.kubeflow.org CRD) or namespace "
            f"{namespace} does not exist; check `kubectl get crd experiments.kubeflow.org` "
            f"and `kubectl get namespace {namespace}`"),
        gone=(f"Katib Experiment {name} is gone from namespace {namespace} "
              f"(deleted while kubetrain was following it?)"),
        forbidden=(
            f"{who} may not {action} Katib experiments/trials in namespace {namespace}; "
            f"apply the Role and RoleBinding in {ROLE_FILE} (`kubectl apply -k manifests/base`)"),
        exists=(f"Katib Experiment {name} already exists in namespace {namespace}; delete it "
                f"(`kubectl -n {namespace} delete experiment {name}`) or use another name"),
        rejected=f"Katib rejected Experiment {name}: {k8s.detail_of(exc)}")


def _service_account(exp: Mapping[str, Any]) -> str:
    job = ((exp.get("spec") or {}).get("trialTemplate") or {}).get("trialSpec") or {}
    return ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get(
        "serviceAccountName", "")


def trial_table(api, namespace: str, name: str, service_account: str = "") -> list[dict]:
    """The Experiment's Trials (label katib.kubeflow.org/experiment=NAME) as table rows."""
    try:
        listing = api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, TRIALS, label_selector=f"{EXPERIMENT_LABEL}={name}")
    except Exception as e:  # ApiException; the kubernetes package is imported lazily
        if getattr(e, "status", None) is None:
            raise
        raise api_error(e, "list", namespace, name, service_account) from None
    return trial_rows(listing.get("items") or [])


def run(exp: dict[str, Any], namespace: str, api=None, timeout_s: float = 6 * 3600,
        keep: bool = False, poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.monotonic,
        log: Callable[[str, str], None] = progress.log) -> tuple[dict[str, Any], list[dict]]:
    """Create the Experiment, follow it, read its trials; delete it unless `keep`.

    Deletion happens in a `finally`, so a timeout, a failure or a cancelled
    run (SIGTERM) does not leave GPU trials running; an Experiment this call
    did not create (409) is never touched. Returns (follow's result, trial rows).
    """
    validate(exp)
    name = exp["metadata"]["name"]
    exp = {**exp, "metadata": {**exp["metadata"], "namespace": namespace}}
    account = _service_account(exp)
    api = api or k8s.custom_objects_api()
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, exp)
    except Exception as e:
        if getattr(e, "status", None) is None:
            raise
        raise api_error(e, "create", namespace, name, account) from None
    log("tune", f"created Katib Experiment {name} in namespace {namespace} "
                f"({exp['spec']['algorithm']['algorithmName']}, "
                f"{exp['spec']['maxTrialCount']} trials, "
                f"{exp['spec']['parallelTrialCount']} in parallel)")
    last: dict[str, Any] = {}

    def get() -> Mapping[str, Any]:
        nonlocal last
        try:
            last = api.get_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, name)
        except Exception as e:
            status = getattr(e, "status", None)
            if not k8s.transient(e):
                raise api_error(e, "get", namespace, name, account) from None
            if not last:  # nothing known yet: no progress to report from
                last = exp
            log("tune", f"Kubernetes API unavailable ({status or type(e).__name__}); retrying")
        return last

    try:
        with k8s.sigterm_raises("a Katib Experiment"):
            try:
                result = follow(get, timeout_s, poll_s, sleep=sleep, now=now, log=log)
            except KubetrainError as e:
                rows = _rows_or_empty(api, namespace, name, account)
                first = next((r for r in rows if r["state"] == "FAIL" and r.get("error")), None)
                if first is None:
                    raise
                raise KubetrainError(f"{e}; first failed trial {first['name']}: "
                                     f"{first['error']}") from None
            return result, trial_table(api, namespace, name, account)
    finally:
        if keep:
            log("tune", f"kept Katib Experiment {name} (delete it with `kubectl -n "
                        f"{namespace} delete experiment {name}`)")
        else:
            _delete(api, namespace, name, log)


def _rows_or_empty(api, namespace: str, name: str, account: str) -> list[dict]:
    try:
        return trial_table(api, namespace, name, account)
    except Exception:  # reporting the original failure matters more than the detail
        return []


def _delete(api, namespace: str, name: str, log: Callable[[str, str], None]) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, name)
        log("tune", f"deleted Katib Experiment {name} (and its trials)")
    except Exception as e:
        if getattr(e, "status", None) == 404:
            return
        log("tune", f"could not delete Katib Experiment {name} ({getattr(e, 'status', '')} "
                    f"{type(e).__name__}); delete it with `kubectl -n {namespace} delete "
                    f"experiment {name}`")
