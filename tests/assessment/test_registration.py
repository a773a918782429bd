"""Registering a published version in the Kubeflow Model Registry, through its own client.

No registry server can run here (it needs its database and the Kubeflow stack), so the
test runs the real `model-registry` client against a small real HTTP stand-in that
implements only the REST endpoints registering uses (api/model_registry/v1: find and
create the registered model, find and create the version, add its artifact), and
checks what arrived.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from kubetrain.assessment.registration import register, shown
from kubetrain.core.errors import KubetrainError

pytestmark = pytest.mark.integration
API = "/api/model_registry/v1"


class Registry:
    """The stand-in's state: objects by kind, and every request seen."""

    def __init__(self, fail: bool = False) -> None:
        self.models: list[dict] = []
        self.versions: list[dict] = []
        self.artifacts: list[dict] = []
        self.seen: list[tuple[str, str, dict]] = []
        self.fail = fail


def _handler(state: Registry):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            state.seen.append(("GET", url.path, query))
            if state.fail:
                return self._send(500, {"code": "500", "message": "database is down"})
            if url.path == f"{API}/registered_models":
                return self._send(200, {"items": state.models, "nextPageToken": "", "pageSize": 1,
                                        "size": len(state.models)})  # fmt: skip
            if url.path == f"{API}/registered_model":
                found = [m for m in state.models if m["name"] == query.get("name")]
            elif url.path == f"{API}/model_version":
                found = [
                    v for v in state.versions
                    if v["name"] == query.get("name")
                    and v["registeredModelId"] == query.get("parentResourceId")
                ]  # fmt: skip
            else:
                return self._send(404, {"code": "404", "message": "no such endpoint"})
            if found:
                return self._send(200, found[0])
            return self._send(404, {"code": "404", "message": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            path = urlsplit(self.path).path
            state.seen.append(("POST", path, body))
            made = {**body, "id": str(len(state.seen)), "createTimeSinceEpoch": "1",
                    "lastUpdateTimeSinceEpoch": "1"}  # fmt: skip
            if path == f"{API}/registered_models":
                state.models.append(made)
            elif path == f"{API}/model_versions":
                state.versions.append(made)
            elif path.startswith(f"{API}/model_versions/") and path.endswith("/artifacts"):
                state.artifacts.append({**made, "versionId": path.split("/")[-2]})
            else:
                return self._send(404, {"code": "404", "message": "no such endpoint"})
            return self._send(201, made)

    return Handler


@pytest.fixture
def registry():
    state = Registry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bundle(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "model.onnx",
    )
    return tmp_path


METRICS = {"accuracy": 0.93, "macro_f1": 0.91, "roc_auc": None, "task": "classification"}


def test_a_version_is_registered_with_uri_format_metrics_and_run_id(registry, bundle):
    state, url = registry
    uri = "s3://ml/models/churn/run-abc/"
    record = register(url, "churn", "run-abc", uri, bundle, METRICS, "abc")
    assert record["registered"] is True
    (model,) = state.models
    (version,) = state.versions
    (artifact,) = state.artifacts
    assert model["name"] == "churn"
    assert version["name"] == "run-abc" and version["registeredModelId"] == model["id"]
    assert "abc" in version["description"]
    props = version["customProperties"]
    assert props["test_accuracy"]["double_value"] == 0.93
    assert props["pipeline_run_id"]["string_value"] == "abc"
    assert props["bundle_uri"]["string_value"] == uri and "test_roc_auc" not in props
    assert artifact["uri"] == uri and artifact["versionId"] == version["id"]
    assert (artifact["modelFormatName"], artifact["modelFormatVersion"]) == ("onnx", "17")
    # a retried publish of the same run: its version is there, nothing is added
    again = register(url, "churn", "run-abc", uri, bundle, METRICS, "abc")
    assert again["registered"] is False and len(state.versions) == 1


def test_a_refusal_is_one_line_without_credentials(registry, bundle):
    state, url = registry
    state.fail = True
    secret_url = url.replace("http://", "http://admin:hunter2@")
    with pytest.raises(KubetrainError) as caught:
        register(secret_url, "churn", "run-1", "s3://b/m/", bundle, METRICS, "1")
    message = str(caught.value)
    assert "\n" not in message and "hunter2" not in message and "model registry" in message
    assert shown(secret_url) == url
