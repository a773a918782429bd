"""`kubetrain submit` against a local server that speaks the KFP v2beta1 REST API.

`FakeKFP` implements the endpoints the kfp 2.17 client calls on the way
(health check, pipeline lookup and upload, version upload and listing,
experiment lookup and creation, runs, recurring runs), answers with the JSON
the real API server sends, validates what it receives the way the server does
(the uploaded YAML must parse strictly as PipelineSpec/PlatformSpec, run
parameters must exist in the pipeline with the right type) and records every
request. The tests assert on those recorded requests: the spec and its GPU
placement, the parameters and their JSON types, caching, the cron trigger, the
token, and the one-line errors for 401/404/500 and an unreachable host.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from kubetrain.cluster import submit
from kubetrain.cluster.compile import GPU_STAGES
from kubetrain.config.cluster import ClusterConfig
from kubetrain.core.errors import KubetrainError

TOKEN = "kt-secret-token-0123456789"
API = "/apis/v2beta1"
CREATED = "2025-06-01T03:00:00Z"
GPU_COMPONENTS = tuple(f"comp-{s}" for s in sorted(GPU_STAGES))
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(text: str | bytes) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=LOADER) if d]


# ---------------------------------------------------------------- the fake API server


def rpc_error(status: int, code: int, message: str) -> tuple[int, Any]:
    """A grpc-gateway error body, as the KFP API server sends it."""
    return status, {"error": message, "code": code, "message": message, "details": []}


class FakeKFP:
    """State and routes of a minimal KFP v2beta1 API server."""

    def __init__(self, token: str | None = TOKEN, multi_user: bool = False):
        self.token = token
        self.multi_user = multi_user
        self.requests: list[dict[str, Any]] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # id -> version (its YAML documents under _docs)
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.run_script: list[tuple[str, list[tuple[str, str]]]] = [("SUCCEEDED", [])]
        self.failures: dict[str, tuple[int, Any]] = {}  # "METHOD /path[*]" -> (status, body)
        self.failure_budget: dict[str, int] = {}  # pattern -> answers left before it heals
        self._ids = itertools.count(1)
        self._polls: dict[str, int] = {}
        self.lock = threading.Lock()

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}-5f0c"

    def calls(self, method: str | None = None, path: str | None = None) -> list[dict]:
        return [
            r for r in self.requests if method in (None, r["method"]) and path in (None, r["path"])
        ]

    def route_summary(self) -> list[str]:
        return [f"{r['method']} {r['path']}" for r in self.requests]

    # -- dispatch
    def handle(self, method: str, raw_path: str, headers: dict, body: bytes) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        record: dict[str, Any] = {
            "method": method,
            "path": url.path,
            "query": query,
            "headers": headers,
            "body": body,
        }
        ctype = headers.get("content-type", "")
        if ctype.startswith("application/json") and body:
            record["json"] = json.loads(body)
        if ctype.startswith("multipart/form-data"):
            record["files"] = parse_multipart(ctype, body)
        with self.lock:
            self.requests.append(record)
            key = f"{method} {url.path}"
            for pattern, failure in self.failures.items():
                if key == pattern or (pattern.endswith("*") and key.startswith(pattern[:-1])):
                    if pattern in self.failure_budget:
                        self.failure_budget[pattern] -= 1
                        if self.failure_budget[pattern] <= 0:
                            del self.failures[pattern], self.failure_budget[pattern]
                    return failure
            if self.token and headers.get("authorization") != f"Bearer {self.token}":
                return 401, "Jwt verification fails"  # plain text, as Istio answers
            return self.route(method, url.path, query, record)

    def route(self, method: str, path: str, query: dict, record: dict) -> tuple[int, Any]:
        if not path.startswith(API + "/"):
            return 404, "404 page not found"
        parts = path[len(API) + 1 :].split("/")
        if method == "GET" and parts == ["healthz"]:
            return 200, {
                "commit_sha": "0f4c2b1",
                "tag_name": "2.5.0",
                "multi_user": self.multi_user,
                "pipeline_store": "database",
            }
        if method == "GET" and parts == ["pipelines"]:
            found = [p for p in self.pipelines.values() if matches(p, query.get("filter"))]
            return 200, (
                {"pipelines": found, "total_size": len(found)} if found else {"total_size": 0}
            )
        if method == "POST" and parts == ["pipelines", "upload"]:
            return self.upload(query, record, new_pipeline=True)
        if method == "POST" and parts == ["pipelines", "upload_version"]:
            return self.upload(query, record, new_pipeline=False)
        if (
            method == "GET"
            and len(parts) == 3
            and parts[0] == "pipelines"
            and parts[2] == "versions"
        ):
            if parts[1] not in self.pipelines:
                return rpc_error(404, 5, f"Pipeline {parts[1]} not found")
            versions = sorted(
                (v for v in self.versions.values() if v["pipeline_id"] == parts[1]),
                key=lambda v: v["_seq"],
                reverse=query.get("sort_by", "").endswith(" desc"),
            )
            versions = [public(v) for v in versions]
            size = int(query.get("page_size") or 10)
            return 200, {"pipeline_versions": versions[:size], "total_size": len(versions)}
        if method == "GET" and parts == ["experiments"]:
            found = [
                e
                for e in self.experiments.values()
                if matches(e, query.get("filter"))
                and (not self.multi_user or e["namespace"] == query.get("namespace"))
            ]
            return 200, (
                {"experiments": found, "total_size": len(found)} if found else {"total_size": 0}
            )
        if method == "POST" and parts == ["experiments"]:
            body = record["json"]
            exp_id = self.new_id("exp")
            self.experiments[exp_id] = {
                "experiment_id": exp_id,
                "display_name": body["display_name"],
                "description": body.get("description") or "",
                "created_at": CREATED,
                "namespace": body.get("namespace", "") if self.multi_user else "",
                "storage_state": "AVAILABLE",
            }
            return 200, self.experiments[exp_id]
        if method == "POST" and parts == ["runs"]:
            return self.create_run(record["json"], recurring=False)
        if method == "GET" and len(parts) == 2 and parts[0] == "runs":
            return self.get_run(parts[1])
        if method == "POST" and parts == ["recurringruns"]:
            return self.create_run(record["json"], recurring=True)
        return 404, "404 page not found"

    # -- pipelines
    def upload(self, query: dict, record: dict, new_pipeline: bool) -> tuple[int, Any]:
        files = record.get("files", {})
        if "uploadfile" not in files:
            return rpc_error(
                400,
                3,
                "Failed to create a pipeline due to error parsing "
                "pipeline spec filename: http: no such file",
            )
        filename, data = files["uploadfile"]
        try:
            docs = load_docs(data)
            spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
            for doc in docs[1:]:
                json_format.ParseDict(doc, pipeline_spec_pb2.PlatformSpec())
        except Exception as exc:  # what the server answers for an invalid spec
            return rpc_error(400, 3, f"Failed to create a pipeline: invalid pipeline spec: {exc}")
        if new_pipeline:
            name = query.get("name") or query.get("display_name") or spec.pipeline_info.name
            if any(p["display_name"] == name for p in self.pipelines.values()):
                return rpc_error(
                    409, 6, f"Failed to create a pipeline: pipeline {name} already exists"
                )
            pipeline_id = self.new_id("pipe")
            self.pipelines[pipeline_id] = {
                "pipeline_id": pipeline_id,
                "display_name": name,
                "name": name,
                "description": query.get("description", ""),
                "created_at": CREATED,
                "namespace": query.get("namespace", ""),
            }
            self.add_version(pipeline_id, name, query.get("description", ""), docs)
            return 200, self.pipelines[pipeline_id]
        pipeline_id = query.get("pipelineid", "")
        if pipeline_id not in self.pipelines:
            return rpc_error(
                404, 5, f"Failed to create a pipeline version: pipeline {pipeline_id} not found"
            )
        name = query.get("name") or filename
        if any(
            v["pipeline_id"] == pipeline_id and v["display_name"] == name
            for v in self.versions.values()
        ):
            return rpc_error(
                409, 6, f"Failed to create a pipeline version: version {name} already exists"
            )
        return 200, public(self.add_version(pipeline_id, name, query.get("description", ""), docs))

    def add_version(self, pipeline_id: str, name: str, description: str, docs: list) -> dict:
        version_id = self.new_id("ver")
        self.versions[version_id] = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": version_id,
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": CREATED,
            "_seq": len(self.versions),
            "_docs": docs,
        }
        return self.versions[version_id]

    # -- runs
    def create_run(self, body: dict, recurring: bool) -> tuple[int, Any]:
        if body.get("experiment_id") not in self.experiments:
            return rpc_error(404, 5, f"Experiment {body.get('experiment_id')} not found")
        ref = body.get("pipeline_version_reference")
        if ref:
            version = self.versions.get(ref.get("pipeline_version_id", ""))
            if not version or version["pipeline_id"] != ref.get("pipeline_id"):
                return rpc_error(404, 5, f"Pipeline version {ref} not found")
            spec = version["_docs"][0]
        elif body.get("pipeline_spec"):
            inline = body["pipeline_spec"]
            spec = inline.get("pipeline_spec", inline)
        else:
            return rpc_error(
                400, 3, "Invalid input error: pipeline spec or version reference is required"
            )
        declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
        for name, value in (body.get("runtime_config") or {}).get("parameters", {}).items():
            if name not in declared:
                return rpc_error(400, 3, f"Invalid input error: unknown parameter {name}")
            kind = declared[name]["parameterType"]
            ok = {
                "NUMBER_INTEGER": isinstance(value, int) and not isinstance(value, bool),
                "NUMBER_DOUBLE": isinstance(value, (int, float)) and not isinstance(value, bool),
                "BOOLEAN": isinstance(value, bool),
                "STRING": isinstance(value, str),
            }.get(kind, True)
            if not ok:
                return rpc_error(
                    400, 3, f"Invalid input error: parameter {name} is not {kind}: {value!r}"
                )
        if recurring:
            cron = ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron", "")
            if len(cron.split()) != 6:
                return rpc_error(400, 3, f"Invalid input error: invalid cron {cron!r}")
            job_id = self.new_id("rr")
            self.recurring_runs[job_id] = {
                **body,
                "recurring_run_id": job_id,
                "status": "ENABLED",
                "created_at": CREATED,
                "updated_at": CREATED,
                "max_concurrency": str(body.get("max_concurrency", 1)),
                "namespace": "",
            }
            return 200, self.recurring_runs[job_id]
        run_id = self.new_id("run")
        self.runs[run_id] = {
            **body,
            "run_id": run_id,
            "state": "PENDING",
            "created_at": CREATED,
            "storage_state": "AVAILABLE",
        }
        return 200, self.runs[run_id]

    def get_run(self, run_id: str) -> tuple[int, Any]:
        if run_id not in self.runs:
            return rpc_error(404, 5, f"Run {run_id} not found")
        poll = self._polls.get(run_id, 0)
        self._polls[run_id] = poll + 1
        state, tasks = self.run_script[min(poll, len(self.run_script) - 1)]
        run = {
            **self.runs[run_id],
            "state": state,
            "run_details": {
                "task_details": [
                    {
                        "run_id": run_id,
                        "task_id": f"task-{name}",
                        "display_name": name,
                        "state": st,
                        "create_time": CREATED,
                        **(
                            {"error": {"code": 2, "message": f"{name} crashed"}}
                            if st == "FAILED"
                            else {}
                        ),
                    }
                    for name, st in [("root", state), *tasks]
                ]
            },
        }
        if state == "FAILED":
            run["error"] = {"code": 2, "message": "task train failed: exit status 1"}
        return 200, run


def public(version: dict) -> dict:
    return {k: v for k, v in version.items() if not k.startswith("_")}


def matches(item: dict, filter_json: str | None) -> bool:
    """The EQUALS predicates of a v2beta1 Filter (operation as enum number or name)."""
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        assert predicate["operation"] in (1, "EQUALS"), predicate
        wanted = predicate.get("string_value", predicate.get("stringValue"))
        if item.get(predicate["key"]) != wanted:
            return False
    return True


def parse_multipart(ctype: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    message = BytesParser(policy=email_policy).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body
    )
    return {
        part.get_param("name", header="content-disposition"): (
            part.get_filename() or "",
            part.get_payload(decode=True),
        )
        for part in message.iter_parts()
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, payload = self.server.fake.handle(self.command, self.path, headers, body)
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_server():
    fake = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (submit.ENDPOINT_ENV, submit.UI_ENDPOINT_ENV, submit.TOKEN_PATH_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """The cluster YAML (local when the cluster target is unavailable), compiled once."""
    path = tmp_path_factory.mktemp("yaml") / "kubetrain-training.yaml"
    try:
        return submit.compile_for_submit("cluster", path, ClusterConfig())
    except KubetrainError:
        return submit.compile_for_submit("local", path, ClusterConfig())


def parse(*argv: str) -> argparse.Namespace:
    """Through `add_parser`, as `kubetrain submit` parses them."""
    parser = argparse.ArgumentParser(prog="kubetrain")
    submit.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["submit", *argv])


def run_submit(server: FakeKFP, *argv: str, token: str | None = TOKEN, **kw) -> dict:
    auth = ("--token", token) if token else ()
    return submit.submit(parse("--host", server.host, *auth, *argv), **kw)


def gpu_checks(docs: list[dict], node_label: tuple[str, str]) -> int:
    """Assert the GPU placement of train and tune when the YAML carries it; how many checked."""
    spec = docs[0]
    checked = 0
    for component in GPU_COMPONENTS:
        executor = spec["components"][component]["executorLabel"]
        resources = spec["deploymentSpec"]["executors"][executor]["container"].get("resources")
        if resources and "accelerator" in resources:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert int(resources["accelerator"]["resourceCount"]) == 1
            checked += 1
        if len(docs) > 1:
            placement = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]
            assert placement["nodeSelector"]["labels"] == {node_label[0]: node_label[1]}
            assert {
                "key": "nvidia.com/gpu",
                "operator": "Equal",
                "value": "present",
                "effect": "NoSchedule",
            } in placement["tolerations"]
            checked += 1
    return checked


# ---------------------------------------------------------------- the tests


def test_first_submit_uploads_pipeline_creates_experiment_and_run(kfp_server, capsys):
    result = run_submit(
        kfp_server,
        "--param",
        "epochs=5",
        "--param",
        "learning-rate=0.01",
        "--param",
        "oversample=false",
        "--param",
        "dataset=wine",
        "--gpu-node-selector",
        "pool=a100",
    )

    assert kfp_server.route_summary() == [
        f"GET {API}/healthz",
        f"GET {API}/pipelines",
        f"POST {API}/pipelines/upload",
        f"GET {API}/pipelines/{result['pipeline_id']}/versions",
        f"GET {API}/experiments",
        f"POST {API}/experiments",
        f"POST {API}/runs",
    ]
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in kfp_server.requests)

    lookup = json.loads(kfp_server.calls("GET", f"{API}/pipelines")[0]["query"]["filter"])
    assert lookup["predicates"][0]["key"] == "display_name"
    assert lookup["predicates"][0]["stringValue"] == "kubetrain-training"

    upload = kfp_server.calls("POST", f"{API}/pipelines/upload")[0]
    assert upload["query"]["name"] == "kubetrain-training"
    filename, data = upload["files"]["uploadfile"]
    assert filename.endswith(".yaml")
    docs = load_docs(data)
    assert docs[0]["pipelineInfo"]["name"] == "kubetrain-training"
    assert {"epochs", "learning_rate", "dataset"} <= set(
        docs[0]["root"]["inputDefinitions"]["parameters"]
    )
    if len(docs) > 1 or "accelerator" in json.dumps(docs[0]):  # the cluster target is there
        assert gpu_checks(docs, ("pool", "a100")) >= 2  # --gpu-node-selector reached the YAML

    experiment = kfp_server.calls("POST", f"{API}/experiments")[0]["json"]
    assert experiment["display_name"] == "kubetrain" and experiment["namespace"] == "kubetrain"

    run = kfp_server.calls("POST", f"{API}/runs")[0]["json"]
    params = run["runtime_config"]["parameters"]
    assert params == {"epochs": 5, "learning_rate": 0.01, "oversample": False, "dataset": "wine"}
    assert type(params["epochs"]) is int and type(params["learning_rate"]) is float
    version = next(iter(kfp_server.versions.values()))
    assert run["pipeline_version_reference"] == {
        "pipeline_id": result["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert "pipeline_spec" not in run
    assert run["experiment_id"] == result["experiment_id"]
    assert run["service_account"] == "kubetrain-pipeline-runner"
    assert run["display_name"].startswith("kubetrain-training-")

    run_id = next(iter(kfp_server.runs))
    assert result == {
        "host": kfp_server.host,
        "pipeline_name": "kubetrain-training",
        "version_name": "kubetrain-training",
        "pipeline_id": result["pipeline_id"],
        "version_id": version["pipeline_version_id"],
        "experiment_id": result["experiment_id"],
        "run_id": run_id,
        "url": f"{kfp_server.host}/#/runs/details/{run_id}",
        "state": "PENDING",
    }
    out, err = capsys.readouterr()
    assert f"{kfp_server.host}/#/runs/details/{run_id}" in out
    assert "epochs=5" in out
    assert TOKEN not in out + err


def test_second_submit_uploads_a_new_version_and_reuses_the_experiment(
    kfp_server, compiled, capsys
):
    first = run_submit(kfp_server, "--yaml", str(compiled))
    second = run_submit(
        kfp_server, "--yaml", str(compiled), "--version", "v2-nightly", "--run-name", "retrain"
    )

    assert len(kfp_server.calls("POST", f"{API}/pipelines/upload")) == 1
    (upload,) = kfp_server.calls("POST", f"{API}/pipelines/upload_version")
    assert upload["query"] == {
        "name": "v2-nightly",
        "pipelineid": first["pipeline_id"],
        "description": upload["query"]["description"],
    }
    assert (
        load_docs(upload["files"]["uploadfile"][1])[0]["pipelineInfo"]["name"]
        == "kubetrain-training"
    )
    assert len(kfp_server.calls("POST", f"{API}/experiments")) == 1
    assert second["pipeline_id"] == first["pipeline_id"]
    assert second["experiment_id"] == first["experiment_id"]
    assert second["version_id"] != first["version_id"]
    assert second["version_name"] == "v2-nightly"

    run = kfp_server.calls("POST", f"{API}/runs")[-1]["json"]
    assert run["display_name"] == "retrain"
    assert run["pipeline_version_reference"]["pipeline_version_id"] == second["version_id"]
    assert (
        f"/#/pipelines/details/{first['pipeline_id']}/version/{second['version_id']}"
        in capsys.readouterr().out
    )

    # the default version name: kubetrain version, UTC time, hash of the uploaded YAML
    third = run_submit(kfp_server, "--yaml", str(compiled))
    digest = hashlib.sha256(compiled.read_bytes()).hexdigest()[:8]
    assert re.fullmatch(rf"0\.1\.0-\d{{8}}-\d{{6}}-{digest}", third["version_name"])


def test_recurring_run_sends_the_cron_trigger_and_concurrency(kfp_server, compiled, capsys):
    result = run_submit(
        kfp_server,
        "--yaml",
        str(compiled),
        "--recurring",
        "0 0 3 * * *",
        "--max-concurrency",
        "2",
        "--param",
        "tune_trials=0",
        "--run-name",
        "nightly",
    )

    (job,) = [r["json"] for r in kfp_server.calls("POST", f"{API}/recurringruns")]
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(job["max_concurrency"]) == 2
    assert job["mode"] == "ENABLE" and job["no_catchup"] is True
    assert job["display_name"] == "nightly"
    assert job["runtime_config"]["parameters"] == {"tune_trials": 0}
    assert job["pipeline_version_reference"]["pipeline_id"] == result["pipeline_id"]
    assert not kfp_server.calls("POST", f"{API}/runs")
    assert result["recurring_run_id"] in kfp_server.recurring_runs
    assert result["url"] == f"{kfp_server.host}/#/recurringrun/details/{result['recurring_run_id']}"
    assert result["state"] == "ENABLED"
    assert "0 0 3 * * *" in capsys.readouterr().out


@pytest.mark.parametrize(
    "cron, hint",
    [
        ("0 3 * * *", "did you mean '0 0 3 * * *'"),
        ("every night", "6-field KFP cron"),
        ("0 0 3 * * * *", "6-field KFP cron"),
    ],
)
def test_bad_cron_fails_before_any_request(kfp_server, compiled, cron, hint):
    with pytest.raises(KubetrainError, match=hint.replace("*", r"\*")):
        run_submit(kfp_server, "--yaml", str(compiled), "--recurring", cron)
    assert kfp_server.requests == []


def test_wait_polls_until_succeeded_and_prints_task_progress(kfp_server, compiled, capsys):
    kfp_server.run_script = [
        ("RUNNING", [("ingest", "RUNNING")]),
        ("RUNNING", [("ingest", "SUCCEEDED"), ("train", "RUNNING")]),
        ("RUNNING", [("ingest", "SUCCEEDED"), ("train", "RUNNING")]),
        ("SUCCEEDED", [("ingest", "SUCCEEDED"), ("train", "SUCCEEDED")]),
    ]
    naps: list[float] = []
    result = run_submit(
        kfp_server, "--yaml", str(compiled), "--wait", "--poll-interval", "7", sleep=naps.append
    )

    run_id = result["run_id"]
    assert result["state"] == "SUCCEEDED"
    assert len(kfp_server.calls("GET", f"{API}/runs/{run_id}")) == 4
    assert naps == [7.0, 7.0, 7.0]
    name = kfp_server.runs[run_id]["display_name"]
    out = capsys.readouterr().out
    progress = [line.split("] ", 1)[1] for line in out.splitlines() if "] " in line]
    assert progress == [
        f"run {name}: RUNNING",
        "task ingest: RUNNING",
        "task ingest: SUCCEEDED",
        "task train: RUNNING",
        "task train: SUCCEEDED",
        f"run {name} SUCCEEDED: {result['url']}",
    ]
    assert out.rstrip().endswith(result["url"])


def test_wait_on_a_failed_run_is_an_error_with_exit_code_2(kfp_server, compiled, capsys):
    kfp_server.run_script = [("RUNNING", [("train", "RUNNING")]), ("FAILED", [("train", "FAILED")])]
    code = submit.main(
        [
            "--host",
            kfp_server.host,
            "--token",
            TOKEN,
            "--yaml",
            str(compiled),
            "--wait",
            "--poll-interval",
            "0",
        ]
    )
    assert code == 2
    out, err = capsys.readouterr()
    assert "task train: FAILED (train crashed)" in out
    (line,) = err.splitlines()
    assert line.startswith("error: run kubetrain-training-")
    assert re.search(r"ended FAILED after +\d+m\d\ds: task train failed: exit status 1", line)
    assert f"{kfp_server.host}/#/runs/details/" in line


def test_wait_rides_out_a_restarting_api_server(kfp_server, compiled, capsys):
    kfp_server.run_script = [("RUNNING", []), ("SUCCEEDED", [])]
    kfp_server.failures[f"GET {API}/runs/*"] = (503, "upstream connect error or disconnect")
    kfp_server.failure_budget[f"GET {API}/runs/*"] = 2
    result = run_submit(kfp_server, "--yaml", str(compiled), "--wait", sleep=lambda s: None)
    assert result["state"] == "SUCCEEDED"
    out = capsys.readouterr().out
    assert "poll 2/3 failed, retrying: the KFP API at" in out and "server error (503)" in out

    kfp_server.failures[f"GET {API}/runs/*"] = rpc_error(503, 14, "no healthy upstream")
    with pytest.raises(
        KubetrainError,
        match=r"server error \(503\) while polling run "
        r"run-\d+-5f0c: no healthy upstream$",
    ):
        run_submit(kfp_server, "--yaml", str(compiled), "--wait", sleep=lambda s: None)
    polls = [r for r in kfp_server.calls("GET") if r["path"].startswith(f"{API}/runs/")]
    assert len(polls) == 4 + 1 + submit.POLL_RETRIES  # 2 failed + 2 answered, then 1 + 3 failed


def test_wait_gives_up_after_the_timeout(kfp_server, compiled):
    kfp_server.run_script = [("RUNNING", [])]
    ticks = iter(range(0, 10_000, 30))
    with pytest.raises(KubetrainError, match=r"still RUNNING after 100s; it keeps running"):
        run_submit(
            kfp_server,
            "--yaml",
            str(compiled),
            "--wait",
            "--timeout",
            "100",
            sleep=lambda s: None,
            clock=lambda: float(next(ticks)),
        )


def test_no_cache_sends_the_spec_inline_with_caching_off_in_every_dag(kfp_server, compiled):
    result = run_submit(kfp_server, "--yaml", str(compiled), "--no-cache", "--param", "epochs=3")

    run = kfp_server.calls("POST", f"{API}/runs")[0]["json"]
    assert "pipeline_version_reference" not in run  # caching can't ride on a version reference
    inline = run["pipeline_spec"]
    docs = load_docs(compiled.read_text())
    spec = inline["pipeline_spec"] if len(docs) > 1 else inline
    if len(docs) > 1:  # the GPU placement travels with the inline spec
        assert inline["platform_spec"] == docs[1]
        assert gpu_checks([spec, inline["platform_spec"]], ClusterConfig().node_label) == 2 * len(
            GPU_COMPONENTS
        )
    tasks = list(spec["root"]["dag"]["tasks"].values())
    tasks += [
        t for c in spec["components"].values() for t in c.get("dag", {}).get("tasks", {}).values()
    ]
    assert len(tasks) > len(spec["root"]["dag"]["tasks"])  # nested (condition) DAGs included
    # protobuf JSON leaves false out: `cachingOptions: {}` is caching off for the driver
    assert all(t.get("cachingOptions", {}).get("enableCache", False) is False for t in tasks)
    compiled_on = [
        t
        for c in [docs[0]["root"], *docs[0]["components"].values()]
        for t in c.get("dag", {}).get("tasks", {}).values()
        if t.get("cachingOptions", {}).get("enableCache")
    ]
    assert len(compiled_on) > len(docs[0]["root"]["dag"]["tasks"])  # nested ones were on
    assert run["runtime_config"]["parameters"] == {"epochs": 3}
    # the version is still uploaded for the UI, with caching as compiled
    assert result["version_id"] in kfp_server.versions
    stored = kfp_server.versions[result["version_id"]]["_docs"][0]
    assert stored["root"]["dag"]["tasks"] == docs[0]["root"]["dag"]["tasks"]


@pytest.mark.parametrize(
    "params, message",
    [
        (
            ["epochs=5", "epoks=3"],
            r"--param epoks: not a pipeline parameter \(did you mean epochs\?\)",
        ),
        (["epochs=-1"], r"epochs=-1 is out of range"),
        (["epochs=many"], r"epochs must be a int, got 'many'"),
        (["optimizer=lbfgs"], r"optimizer='lbfgs' is not supported; use one of: sgd, adam, adamw"),
        (["test_fraction=0.5", "val_fraction=0.4"], r"keep it below 0.8"),
        (["oversample=maybe"], r"oversample must be true or false"),
        (["dataset=data/train.csv"], r"is a local path, which pods on the cluster cannot read"),
        (["epochs"], r"must be KEY=VALUE"),
    ],
)
def test_bad_params_fail_before_any_request(kfp_server, compiled, params, message):
    argv = [arg for p in params for arg in ("--param", p)]
    with pytest.raises(KubetrainError, match=message) as info:
        run_submit(kfp_server, "--yaml", str(compiled), *argv)
    assert "\n" not in str(info.value)
    assert kfp_server.requests == []


def test_extra_pipeline_parameters_are_typed_from_the_yaml(kfp_server, compiled):
    run_submit(
        kfp_server,
        "--yaml",
        str(compiled),
        "--param",
        "publish_uri=s3://models/kt",
        "--param",
        "model_name=digits-cnn",
    )
    run = kfp_server.calls("POST", f"{API}/runs")[0]["json"]
    assert run["runtime_config"]["parameters"] == {
        "publish_uri": "s3://models/kt",
        "model_name": "digits-cnn",
    }


def bad_token(server: FakeKFP) -> dict:
    return {"token": "wrong-" + TOKEN}


def wrong_path(server: FakeKFP) -> dict:
    return {"host": server.host + "/pipeline"}


def server_error(server: FakeKFP) -> dict:
    server.failures[f"POST {API}/runs"] = rpc_error(
        500, 13, "Internal error: Failed to create a run: database is locked"
    )
    return {}


def forbidden(server: FakeKFP) -> dict:
    server.failures[f"POST {API}/pipelines/upload"] = (403, "RBAC: access denied")
    return {}


@pytest.mark.parametrize(
    "setup, wording",
    [
        (
            bad_token,
            r"^the KFP API at http://127\.0\.0\.1:\d+ rejected the credentials \(401\) "
            r"while checking the KFP API health: Jwt verification fails; pass --token or "
            r"set KF_PIPELINES_SA_TOKEN_PATH",
        ),
        (
            forbidden,
            r"rejected the credentials \(403\) while uploading pipeline "
            r"'kubetrain-training': RBAC: access denied; pass --token",
        ),
        (
            wrong_path,
            r"^the KFP API at http://127\.0\.0\.1:\d+/pipeline answered not found \(404\) "
            r"while checking the KFP API health: 404 page not found; check --host and "
            r"that Kubeflow Pipelines v2 is installed",
        ),
        (
            server_error,
            r"had a server error \(500\) while creating run 'kubetrain-training-\d{8}-"
            r"\d{6}': Internal error: Failed to create a run: database is locked$",
        ),
    ],
)
def test_api_errors_are_one_clean_line_without_the_token(
    kfp_server, compiled, capsys, setup, wording
):
    overrides = setup(kfp_server)
    host = overrides.get("host", kfp_server.host)
    token = overrides.get("token", TOKEN)
    code = submit.main(["--host", host, "--token", token, "--yaml", str(compiled)])
    assert code == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("error: ")
    assert re.search(wording, line[len("error: ") :]), line
    assert token not in out + err and TOKEN not in out + err
    assert "Traceback" not in err


def test_unreachable_host_is_one_clean_line(compiled, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = submit.main(
        ["--host", f"http://127.0.0.1:{port}", "--token", TOKEN, "--yaml", str(compiled)]
    )
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"error: cannot reach the KFP API at http://127.0.0.1:{port} "
        "(connection refused) while checking the KFP API health: check --host"
    )
    assert TOKEN not in line


def test_missing_host_names_the_flag_and_the_variable(compiled):
    with pytest.raises(KubetrainError, match=r"pass --host or set KF_PIPELINES_ENDPOINT"):
        submit.submit(parse("--yaml", str(compiled)))


def test_host_token_and_ui_from_the_kfp_environment(kfp_server, compiled, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", kfp_server.host)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("KF_PIPELINES_UI_ENDPOINT", "https://kubeflow.example.com/pipeline")
    result = submit.submit(
        parse("--yaml", str(compiled), "--namespace", "team-a", "--experiment", "nightly")
    )
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in kfp_server.requests)
    ui = "https://kubeflow.example.com/pipeline"
    assert result["url"] == f"{ui}/#/runs/details/{result['run_id']}"
    experiment = kfp_server.calls("POST", f"{API}/experiments")[0]["json"]
    assert experiment == {"display_name": "nightly", "namespace": "team-a"}
    lookup = kfp_server.calls("GET", f"{API}/experiments")[0]["query"]
    assert lookup["namespace"] == "team-a"

    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(
        KubetrainError,
        match=r"KF_PIPELINES_SA_TOKEN_PATH=.*missing cannot be "
        r"read",
    ):
        submit.submit(parse("--yaml", str(compiled)))


@pytest.mark.integration  # a subprocess
def test_module_cli_smoke(kfp_server, compiled, tmp_path):
    """`python -m kubetrain.cluster.submit` end to end in a fresh interpreter, env settings."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {
        **os.environ,
        "KF_PIPELINES_ENDPOINT": kfp_server.host,
        "KF_PIPELINES_SA_TOKEN_PATH": str(token_file),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetrain.cluster.submit",
            "--yaml",
            str(compiled),
            "--param",
            "epochs=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    run_id = next(iter(kfp_server.runs))
    assert f"{kfp_server.host}/#/runs/details/{run_id}" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert kfp_server.calls("POST", f"{API}/runs")[0]["json"]["runtime_config"]["parameters"] == {
        "epochs": 2
    }
