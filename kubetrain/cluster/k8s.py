"""The Kubernetes API plumbing a pipeline step shares for the custom objects it runs.

A Katib Experiment (`kubetrain.cluster.katib_follow`) and a Trainer TrainJob
(`kubetrain.cluster.trainjob`) are both created by a step, followed to their end and
deleted (`kubetrain.cluster.follow`). Naming a run's object, finding credentials,
reading an API error and telling a passing hiccup from a refusal do not depend
on the resource, so they live here; every message that names the resource or
its fix (its CRD, its RBAC rule, its kubectl hint) is written by the caller,
next to its API.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from kubetrain.core.errors import KubetrainError

#: What every object kubetrain creates, and its pods, carry: the label the manifests put
#: on their objects and the optional pod policy (manifests/README.md) selects on.
PART_OF = {"app.kubernetes.io/part-of": "kubetrain"}


def labels(component: str) -> dict[str, str]:
    """The labels of an object a stage creates (and, copied by its operator, its pods)."""
    return {**PART_OF, "app.kubernetes.io/component": component}


def run_name(run_id: str, prefix: str, max_len: int) -> str:
    """A per-run resource name: `prefix-` + 10 hex digits of sha256(run_id).

    Hashing keeps any run id (KFP's UUIDs, local names with '_') inside the
    DNS-label rules and `max_len`, and a retried step of the same run finds the
    resource it created.
    """
    prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[: max_len - 11] or "kt"
    if not prefix[0].isalpha():
        prefix = "kt-" + prefix[: max_len - 14]
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
                "cluster or set KUBECONFIG"
            ) from None
    return client.CustomObjectsApi()


def detail_of(exc: Any) -> str:
    """The API server's own words: the Status body's message, else the body, else the reason."""
    body = str(getattr(exc, "body", "") or "")
    try:
        detail = json.loads(body).get("message", "") if body else ""
    except (ValueError, AttributeError):
        detail = body[:300]
    return detail or str(getattr(exc, "reason", "") or exc)


def api_error(
    exc: Any,
    creating: bool,
    doing: str,
    *,
    not_installed: str,
    gone: str,
    forbidden: str,
    exists: str,
    rejected: str,
) -> KubetrainError:
    """One line for an ApiException: the caller's message for its status, else a generic one.

    A 404 on create means the CRD (or the namespace) is missing, a 404 later
    that someone deleted the object; `doing` completes "Kubernetes API error
    while ..." for any other status.
    """
    status = getattr(exc, "status", None)
    message = {
        404: not_installed if creating else gone,
        403: forbidden,
        409: exists,
        400: rejected,
        422: rejected,
    }.get(status)
    return KubetrainError(
        message or f"Kubernetes API error while {doing}: {status or ''} {detail_of(exc)}"
    )


def transient(exc: BaseException) -> bool:
    """Whether calling again may succeed: no HTTP answer at all, 5xx or 429.

    "No answer" is a dropped or refused connection, a timeout or a TLS failure
    (OSError, urllib3's and http.client's errors; the client reports TLS as
    status 0). A refusal (4xx), a `KubetrainError` or a bug is never transient.
    """
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return status >= 500 or status in (0, 429)
    return isinstance(exc, _no_answer_errors())


def _no_answer_errors() -> tuple[type[BaseException], ...]:
    import http.client

    kinds: list[type[BaseException]] = [OSError, http.client.HTTPException]
    try:
        import urllib3

        kinds.append(urllib3.exceptions.HTTPError)
    except ImportError:  # the kubernetes client brings urllib3; without it nothing else answers
        pass
    return tuple(kinds)


#: What a step was doing when an API call of each verb failed.
_DOING = {"create": "creating", "get": "following", "delete": "deleting"}


def custom_object_error(
    exc: Any, verb: str, kind: str, resource: str, namespace: str, name: str, not_installed: str
) -> KubetrainError:
    """One line naming the cause and the fix of a failed call on a custom resource
    (``kind`` TrainJob, ``resource`` trainjobs.trainer.kubeflow.org; verb create, get or
    delete); ``not_installed`` says how to install its controller."""
    detail = detail_of(exc)
    if getattr(exc, "status", None) == 404 and 'namespaces "' in detail:
        return KubetrainError(
            f"namespace {namespace!r} does not exist: set --namespace to "
            "your Kubeflow profile's namespace"
        )
    doing = _DOING.get(verb, verb)
    rejected = f"the API server rejected {kind} {name}: {detail}"
    plural = resource.split(".")[0]
    return api_error(
        exc,
        verb == "create",
        f"{doing} {kind} {namespace}/{name}",
        not_installed=not_installed,
        gone=f"{kind} {namespace}/{name} disappeared while {doing} (deleted by someone?)",
        # an admission webhook refuses with 403 too: that is the document, not RBAC
        forbidden=rejected
        if "admission webhook" in detail
        else (
            f"not allowed to {verb} {resource} in namespace {namespace} ({detail}); grant "
            f"the step's service account create/get/delete on {plural} "
            "(manifests/base/role.yaml)"
        ),
        exists=(
            f"a {kind} named {name} already exists in {namespace} and was not created "
            "by kubetrain; delete it or use another run"
        ),
        rejected=rejected,
    )
