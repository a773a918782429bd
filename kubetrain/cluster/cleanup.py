"""What the pipeline's exit handler does when a run ends: clean up, then tell someone.

A failed or cancelled run can leave a SparkApplication (and its driver and
executors), a Katib Experiment (and its trial pods) or a TrainJob (and its GPU
pods) behind: the step that owned it may have been
killed before its own `finally` ran. Their names derive from the run id
(`k8s.run_name`), so the exit task can find and delete them without any
state. It then POSTs a small JSON document to a webhook, if a URL was given
through a Secret (it is never a pipeline parameter, so it never shows in the
compiled YAML or the UI).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from typing import Any

from kubetrain.cluster import follow, k8s
from kubetrain.cluster import katib_checks as katib_api
from kubetrain.cluster import spark as spark_api
from kubetrain.cluster import trainjob as trainjob_api
from kubetrain.cluster.katib import experiment_name
from kubetrain.config.cluster import ClusterConfig

#: The variable the webhook Secret's `url` key becomes in the exit task.
WEBHOOK_ENV = "KUBETRAIN_WEBHOOK_URL"
#: Final states after which nothing is left to clean (KFP's PipelineTaskFinalStatus.state).
CLEAN_END = frozenset({"SUCCEEDED"})


def leftovers(run_id: str, namespace: str) -> list[follow.Ref]:
    """The custom objects a run may have created, by their deterministic names."""
    exp = experiment_name(run_id)
    job = k8s.run_name(run_id, "kubetrain-train", trainjob_api.MAX_NAME)
    app = spark_api.application_name(run_id)
    return [
        follow.Ref.of(
            spark_api.GROUP,
            spark_api.VERSION,
            spark_api.PLURAL,
            "SparkApplication",
            namespace,
            app,
        ),
        follow.Ref.of(
            katib_api.GROUP, katib_api.VERSION, "experiments", "Katib Experiment", namespace, exp
        ),
        follow.Ref.of(
            trainjob_api.GROUP,
            trainjob_api.VERSION,
            trainjob_api.PLURAL,
            "TrainJob",
            namespace,
            job,
        ),
    ]


def clean_up(
    run_id: str,
    cluster: ClusterConfig,
    state: str,
    error_message: str = "",
    api: Any = None,
    post: Callable[[str, bytes], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Delete what a failed/cancelled run left (unless `finished_jobs=keep`); notify; report."""
    deleted: list[str] = []
    if state not in CLEAN_END and cluster.finished_jobs != "keep":
        api = api or k8s.custom_objects_api()
        pace = follow.Pace(timeout_s=follow.DELETE_BUDGET_S)

        def note(line: str) -> None:
            if line.startswith("deleted "):
                deleted.append(line.removeprefix("deleted "))
            log(line)

        for ref in leftovers(run_id, cluster.namespace):
            follow.delete(api, ref, error=follow.generic_error(ref.title), pace=pace, log=note)
    report = {"run_id": run_id, "state": state, "error": error_message[:500], "deleted": deleted}
    url = os.environ.get(WEBHOOK_ENV, "")
    if url:
        try:
            (post or _post)(url, json.dumps(report).encode())
            log("notified the webhook")
        except Exception as exc:  # noqa: BLE001 - a notification must not fail the run's end
            log(f"could not notify the webhook ({type(exc).__name__})")  # no URL: it is secret
    return report


def _post(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - user's URL
        response.read()
