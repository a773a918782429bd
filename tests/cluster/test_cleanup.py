"""The exit handler's task: delete what a failed run left, and POST a notification."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from fakes import api_exception
from kubetrain.cluster import cleanup
from kubetrain.config.cluster import ClusterConfig


class FakeApi:
    """Records deletes; objects listed in `present` exist, others answer 404."""

    def __init__(self, present: set[str]):
        self.present, self.deleted = present, []

    def delete_namespaced_custom_object(
        self, group, version, namespace, plural, name, propagation_policy=None
    ):
        if name not in self.present:
            raise api_exception(404, "not found")
        self.deleted.append((plural, namespace, name))


def refs(run_id: str = "run-1") -> dict[str, str]:
    return {r.plural: r.name for r in cleanup.leftovers(run_id, "kubetrain")}


def test_a_failed_run_deletes_its_spark_application_experiment_and_trainjob():
    names = refs()
    api = FakeApi(set(names.values()))
    report = cleanup.clean_up(
        "run-1", ClusterConfig(), "FAILED", "boom", api=api, log=lambda line: None
    )
    assert sorted(api.deleted) == sorted((p, "kubetrain", n) for p, n in names.items())
    assert report["state"] == "FAILED" and len(report["deleted"]) == 3


def test_names_match_what_the_steps_create():
    from kubetrain.cluster import k8s, katib, spark, trainjob

    names = refs("abc")
    assert names["sparkapplications"] == spark.application_name("abc")
    assert names["experiments"] == katib.experiment_name("abc")
    assert names["trainjobs"] == k8s.run_name("abc", "kubetrain-train", trainjob.MAX_NAME)


@pytest.mark.parametrize("state, keep", [("SUCCEEDED", "delete"), ("FAILED", "keep")])
def test_nothing_is_deleted_after_success_or_when_told_to_keep(state, keep):
    api = FakeApi(set(refs().values()))
    cluster = ClusterConfig(finished_jobs=keep)
    report = cleanup.clean_up("run-1", cluster, state, api=api, log=lambda line: None)
    assert api.deleted == [] and report["deleted"] == []


def test_already_gone_objects_are_fine():
    api = FakeApi(set())
    report = cleanup.clean_up("run-1", ClusterConfig(), "CANCELED", api=api, log=lambda line: None)
    assert report["deleted"] == []


def test_webhook_gets_the_report_and_its_url_is_never_logged(monkeypatch):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/hook?token=secret-token"
    monkeypatch.setenv(cleanup.WEBHOOK_ENV, url)
    lines: list[str] = []
    cleanup.clean_up("run-9", ClusterConfig(), "SUCCEEDED", api=FakeApi(set()), log=lines.append)
    thread.join(timeout=10)
    server.server_close()
    assert received == [{"run_id": "run-9", "state": "SUCCEEDED", "error": "", "deleted": []}]
    assert not any("secret-token" in line for line in lines)


def test_an_unreachable_webhook_does_not_fail_the_cleanup(monkeypatch):
    monkeypatch.setenv(cleanup.WEBHOOK_ENV, "http://127.0.0.1:9/hook?token=secret-token")
    lines: list[str] = []
    report = cleanup.clean_up(
        "run-9", ClusterConfig(), "FAILED", api=FakeApi(set()), log=lines.append
    )
    assert report["state"] == "FAILED"
    assert any("could not notify" in line for line in lines)
    assert not any("secret-token" in line for line in lines)
