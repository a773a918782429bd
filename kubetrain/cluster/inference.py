"""The deploy step on a cluster: a KServe ``InferenceService`` serving the published bundle.

The document (``serving.kserve.io/v1beta1``):

* a custom predictor: the project's CPU image running ``kubetrain serve --bundle
  s3://...`` (`kubetrain.serving.server`, the same code path as serving locally) on
  port 8080, with the Open Inference Protocol's health endpoints as probes;
* the restricted profile of `kubetrain.cluster.security` (pod and container
  securityContext, ``/tmp`` and cache emptyDirs) and the workload service account
  (no RBAC, no token), with the S3 keys as ``secretKeyRef`` only;
* ``serving.kserve.io/deploymentMode: RawDeployment``: a plain Deployment whose
  rolling update keeps the old pods serving until the new ones are Ready (Knative
  would restrict the restricted profile's pod fields);
* the bundle's URI as the ``kubetrain.io/bundle`` annotation: the next run reads it
  to find the champion.

The step (`deploy`): champion/challenger (`kubetrain.serving.challenge`) on the run's
raw test rows; if the new model wins, create or replace the InferenceService, wait
for Ready at the new generation through the shared follower
(`kubetrain.cluster.follow`), and smoke-test the endpoint with held-out rows (the
replies must equal the bundle's own predictions). If any of that fails the previous
spec is applied again (or a first deploy deleted), so the previous model keeps
serving, and the step fails with the reason.
"""

from __future__ import annotations

import copy
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

from kubetrain.cluster import follow as follower
from kubetrain.cluster import k8s, security
from kubetrain.config.cluster import ClusterConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError, require

GROUP, VERSION, PLURAL, KIND = (
    "serving.kserve.io",
    "v1beta1",
    "inferenceservices",
    "InferenceService",
)
API_VERSION = f"{GROUP}/{VERSION}"
#: The container name KServe expects for a custom predictor.
CONTAINER = "kserve-container"
PORT = 8080
BUNDLE_ANNOTATION = "kubetrain.io/bundle"
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
#: Held-out rows the smoke test sends (one request).
SMOKE_ROWS = 20
#: Longest InferenceService name: KServe derives <name>-predictor-<namespace> host names.
MAX_NAME = 45
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def service_name(model_name: str) -> str:
    """The InferenceService of a model: the model name as a DNS-1035 label (it must stay
    the same across runs: the next run finds its champion there)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:MAX_NAME].rstrip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}"[:MAX_NAME].rstrip("-")
    return name


def inference_service(
    cluster: ClusterConfig, name: str, bundle_uri: str, runtime: str = "pytorch", run_id: str = ""
) -> dict[str, Any]:
    """The InferenceService serving ``bundle_uri`` (s3://) as model ``name`` (validated)."""
    require(
        bundle_uri.startswith("s3://"),
        f"the InferenceService serves bundles from S3, not {bundle_uri!r}: set publish_uri "
        "to an s3:// prefix",
    )
    require(
        len(name) <= MAX_NAME and _NAME.match(name) is not None,
        f"InferenceService name {name!r} must be a DNS label of at most {MAX_NAME} characters",
    )
    quantities = {"cpu": cluster.cpu_cpu, "memory": cluster.cpu_memory}
    probe = {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "periodSeconds": 5}
    container = {
        "name": CONTAINER,
        "image": cluster.image("cpu"),
        "command": ["kubetrain", "serve"],
        "args": [
            "--bundle",
            bundle_uri,
            "--port",
            str(PORT),
            "--model-name",
            name,
            "--runtime",
            runtime,
        ],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "env": cluster.s3_env() + [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {
            "requests": dict(quantities),
            "limits": {"cpu": cluster.cpu_limit(), "memory": cluster.cpu_memory},
        },
        "readinessProbe": probe,
        "livenessProbe": {
            **probe,
            "httpGet": {**probe["httpGet"], "path": "/v2/health/live"},
            "initialDelaySeconds": 30,
        },  # fmt: skip
    }
    pod = security.harden_pod_spec(
        {**cluster.cpu_scheduling(), "containers": [container]}, cluster.workload_service_account
    )
    isvc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": cluster.namespace,
            "labels": k8s.labels("serve"),
            "annotations": {
                MODE_ANNOTATION: "RawDeployment",
                BUNDLE_ANNOTATION: bundle_uri,
                **({"kubetrain.io/run-id": run_id} if run_id else {}),
            },
        },
        "spec": {"predictor": {"minReplicas": 1, **pod}},
    }
    return validate(isvc)


def validate(isvc: dict[str, Any]) -> dict[str, Any]:
    """Structural checks of what KServe's webhook would refuse or what serving relies on."""
    require(
        isvc.get("apiVersion") == API_VERSION and isvc.get("kind") == KIND,
        f"not an InferenceService: {isvc.get('apiVersion')!r} {isvc.get('kind')!r}",
    )
    predictor = isvc["spec"]["predictor"]
    containers = predictor.get("containers") or []
    require(
        len(containers) == 1 and containers[0]["name"] == CONTAINER,
        f"a custom predictor has one container named {CONTAINER}",
    )
    args = containers[0]["args"]
    require(
        args[args.index("--bundle") + 1] == isvc["metadata"]["annotations"][BUNDLE_ANNOTATION],
        "the served bundle and the kubetrain.io/bundle annotation differ",
    )
    require(
        containers[0]["securityContext"].get("runAsNonRoot") is True,
        "the predictor container must run as non-root",
    )
    return isvc


# --- status ---------------------------------------------------------------------------


def _state(isvc: dict[str, Any], generation: int) -> str:
    """``ready`` (at ``generation`` or later), ``failed`` or ``waiting``."""
    status = isvc.get("status") or {}
    model = status.get("modelStatus") or {}
    if model.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec"):
        return "failed"
    observed = int(status.get("observedGeneration") or 0)
    ready = any(c.get("type") == "Ready" for c in follower.true_conditions(isvc))
    return "ready" if ready and observed >= generation else "waiting"


def _describe(isvc: dict[str, Any]) -> str:
    status = isvc.get("status") or {}
    conditions = status.get("conditions") or []
    shown = ", ".join(f"{c.get('type')}={c.get('status')}" for c in conditions) or "no status yet"
    return f"InferenceService {isvc['metadata']['name']}: {shown}"


def _failure(isvc: dict[str, Any]) -> str:
    status = isvc.get("status") or {}
    info = (status.get("modelStatus") or {}).get("lastFailureInfo") or {}
    if info:
        return follower.why(info.get("reason", ""), info.get("message", ""))
    bad = [c for c in status.get("conditions") or [] if str(c.get("status")) == "False"]
    return follower.why(bad[0].get("reason", ""), bad[0].get("message", "")) if bad else ""


def wait_ready(
    get: Callable[[], dict[str, Any]], generation: int, pace: follower.Pace, log: follower.Log
) -> dict[str, Any]:
    """Follow the InferenceService until it is Ready at ``generation`` (returns it)."""

    def outcome(isvc: dict[str, Any]) -> dict[str, Any] | None:
        state = _state(isvc, generation)
        if state == "failed":
            raise KubetrainError(
                f"InferenceService {isvc['metadata']['name']} failed: {_failure(isvc)}"
            )
        return isvc if state == "ready" else None

    def timed_out(isvc: dict[str, Any], timeout_s: float) -> str:
        meta = isvc["metadata"]
        why = _failure(isvc)
        return (
            f"InferenceService {meta['namespace']}/{meta['name']} was not Ready within "
            f"{timeout_s:g} s{f' ({why})' if why else ''}; inspect it with kubectl -n "
            f"{meta['namespace']} describe inferenceservice {meta['name']}"
        )

    return follower.poll(
        get, outcome, _describe, timed_out, state=get(), pace=pace, log=log, what="InferenceService"
    )


# --- the smoke test ------------------------------------------------------------------------


def endpoint(isvc: dict[str, Any]) -> str:
    """The in-cluster base URL of a Ready InferenceService."""
    status = isvc.get("status") or {}
    url = (status.get("address") or {}).get("url") or status.get("url") or ""
    require(bool(url), f"InferenceService {isvc['metadata']['name']} is Ready but has no URL")
    return url.rstrip("/")


def smoke_test(
    base_url: str, name: str, rows: list[Any], expected: Any, timeout_s: float = 60
) -> None:
    """POST ``rows`` to the endpoint; its predictions must equal ``expected`` (the bundle's
    own `Prediction` of those rows, computed in this step)."""
    body = json.dumps({"id": "kubetrain-smoke-test", "rows": rows}).encode()
    url = f"{base_url}/v2/models/{name}/infer"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            reply = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:200]
        raise KubetrainError(f"smoke test: {url} answered {exc.code}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise KubetrainError(f"smoke test: no answer from {url}: {exc}") from None
    outputs = {o["name"]: o for o in reply.get("outputs") or []}
    if expected.values is not None:
        got = np.asarray((outputs.get("value") or {}).get("data", []), np.float32)
        want = expected.values
    else:
        got = np.asarray((outputs.get("probabilities") or {}).get("data", []), np.float32)
        want = expected.probabilities.ravel()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise KubetrainError(
            f"smoke test: {url} does not serve the new bundle: its predictions of "
            f"{len(rows)} held-out rows differ from the bundle's own"
        )


# --- the whole step -----------------------------------------------------------------------


def _api_error(exc: Any, verb: str, namespace: str, name: str) -> KubetrainError:
    return k8s.custom_object_error(
        exc,
        verb,
        KIND,
        f"{PLURAL}.{GROUP}",
        namespace,
        name,
        not_installed=(
            "KServe is not installed (no inferenceservices.serving.kserve.io CRD); install "
            "it (https://kserve.github.io/website/) or run without --deploy"
        ),
    )


def _read(
    api: Any, ref: follower.Ref, error: follower.Error, pace: follower.Pace, log
) -> dict | None:
    """The InferenceService as it is now, or None when there is none."""

    def attempt() -> dict | None:
        try:
            return follower.get(api, ref)
        except Exception as exc:  # noqa: BLE001 - only a 404 is handled here
            if getattr(exc, "status", None) == 404:
                return None
            raise

    return follower.call(attempt, "get", ref.title, error=error, pace=pace, log=log)


def apply(
    api: Any, ref: follower.Ref, body: dict[str, Any], existing: dict | None, *, error, pace, log
) -> int:
    """Create ``body`` or replace ``existing`` with it; returns the generation to wait for."""
    if existing is None:
        follower.create(api, ref, body, error=error, pace=pace, log=log)
        current = follower.call(
            lambda: follower.get(api, ref), "get", ref.title, error=error, pace=pace, log=log
        )
        return int(current["metadata"].get("generation") or 1)
    new = copy.deepcopy(body)
    new["metadata"]["resourceVersion"] = existing["metadata"].get("resourceVersion")
    replaced = follower.call(
        lambda: api.replace_namespaced_custom_object(
            ref.group, ref.version, ref.namespace, ref.plural, ref.name, new
        ),
        "update",
        ref.title,
        error=error,
        pace=pace,
        log=log,
    )
    return int((replaced.get("metadata") or {}).get("generation") or 1)


def _previous_spec(existing: dict[str, Any]) -> dict[str, Any]:
    """What re-applying ``existing`` sends: its metadata that matters and its spec."""
    meta = existing["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta
        },
        "spec": existing["spec"],
    }


def deploy(
    cluster: ClusterConfig,
    run_id: str,
    req: Any,
    *,
    api: Any = None,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The deploy step (``req``: `kubetrain.stages.DeployRequest`); returns its record."""
    from kubetrain.serving import challenge

    log = log or (lambda message: progress.log("deploy", message))
    name = service_name(req.publish.model_name)
    runtime = req.deploy.serving_runtime
    body = inference_service(cluster, name, req.bundle_uri, runtime, run_id)
    new, heldout = challenge.load(req.bundle_uri, req.table_path, req.test_path, runtime)
    api = api or k8s.custom_objects_api()
    ref = follower.Ref.of(GROUP, VERSION, PLURAL, KIND, cluster.namespace, name)
    pace = follower.Pace(cluster.wait_timeout, poll_s, sleep, now)

    def error(exc: BaseException, verb: str) -> KubetrainError:
        return _api_error(exc, verb, cluster.namespace, name)

    existing = _read(api, ref, error, pace, log)
    if existing is not None and not follower.ours(body, existing):
        raise KubetrainError(
            f"an InferenceService named {name} already exists in {cluster.namespace} and was "
            "not created by kubetrain; delete it or set another model_name"
        )
    served = ((existing or {}).get("metadata") or {}).get("annotations", {}).get(BUNDLE_ANNOTATION)
    champion, note = None, ""
    if served:
        try:
            champion = challenge.load_bundle(served, runtime)
        except KubetrainError as exc:
            note = f"the served bundle {served} cannot be loaded ({exc}); "
    decision = challenge.challenge(new, champion, heldout, req.deploy.deploy_margin)
    record = {
        "target": "kserve",
        "inference_service": f"{cluster.namespace}/{name}",
        "challenger": req.bundle_uri,
        "champion": served,
        "decision": decision.to_dict(),
        "deployed": False,
    }
    if note:
        record["note"] = note.rstrip("; ")
    if not decision.deploy:
        return record
    rows = heldout.rows[:SMOKE_ROWS]
    expected = new.predict_rows(rows)
    try:
        generation = apply(api, ref, body, existing, error=error, pace=pace, log=log)
        log(
            f"{'updated' if existing else 'created'} InferenceService {ref.title}: {req.bundle_uri}"
        )
        ready = wait_ready(lambda: follower.get(api, ref), generation, pace, log)
        smoke_test(endpoint(ready), name, rows, expected)
    except BaseException as exc:  # a timeout, a failed rollout, a wrong answer, SIGTERM
        _roll_back(api, ref, existing, error=error, pace=pace, log=log)
        if isinstance(exc, KubetrainError):
            kept = "the previous model keeps serving" if existing else "nothing was deployed"
            raise KubetrainError(f"{exc}; rolled back: {kept}") from None
        raise
    log(f"InferenceService {ref.title} serves {req.bundle_uri}; smoke test passed")
    return {**record, "deployed": True, "url": endpoint(ready)}


def _roll_back(api: Any, ref: follower.Ref, existing: dict | None, *, error, pace, log) -> None:
    """Re-apply the previous spec (KServe then rolls back to it), or delete a first deploy."""
    if existing is None:
        follower.delete(api, ref, error=error, pace=pace, log=log)
        return
    try:
        current = _read(api, ref, error, pace, log)
        apply(api, ref, _previous_spec(existing), current, error=error, pace=pace, log=log)
        log(f"re-applied the previous spec of {ref.title}")
    except Exception as exc:  # noqa: BLE001 - the original failure is what the step reports
        log(f"could not roll back {ref.title} ({exc}); re-apply its previous spec by hand")


def to_yaml(isvc: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(isvc, sort_keys=False)
