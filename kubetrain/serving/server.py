"""`kubetrain serve`: a bundle over the KServe Open Inference Protocol v2 (REST).

Why FastAPI and not KServe's own ``kserve.ModelServer``: every ``kserve`` release
conflicts with this project's pins (kserve 0.21.0 requires ``pandas<3``; constraints.txt
has pandas 3.1.1, which clean's encodings are built and tested on, and a different
pandas could change the encoding a served row gets). The endpoints are the protocol's,
so KServe's InferenceService, its clients and its probes work with this server as they
do with KServe's:

    GET  /v2/health/live            {"live": true}
    GET  /v2/health/ready           {"ready": true}
    GET  /v2                        server metadata
    GET  /v2/models/{name}          model metadata (inputs, outputs, class names)
    GET  /v2/models/{name}/ready    {"name": ..., "ready": true}
    POST /v2/models/{name}/infer    `kubetrain.serving.oip` documents the bodies
    (each /v2/models/{name}/... also as /v2/models/{name}/versions/{version}/...)

A bad request (unreadable JSON, a schema violation) gets 400 and ``{"error": "<one
line naming the column>"}``; an unknown model 404. Neither stops the server. The model
runs on one thread by default (``--threads``): batch-1 latency is best and steadiest
that way, and several replicas scale better than threads in one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kubetrain import __version__ as kubetrain_version
from kubetrain.core.errors import KubetrainError
from kubetrain.serving import oip
from kubetrain.serving.predictor import RUNTIMES, Predictor

__all__ = ["RUNTIMES", "ServeConfig", "create_app", "serve"]

SERVER_NAME = "kubetrain"


@dataclass(frozen=True)
class ServeConfig:
    """`kubetrain serve`'s settings, parsed once from its flags."""

    bundle: str
    host: str = "0.0.0.0"
    port: int = 8080
    model_name: str = ""  # default: the bundle's model name (its parent folder)
    runtime: str = "pytorch"
    threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise KubetrainError(f"--port {self.port} is not a TCP port (1-65535)")
        if self.runtime not in RUNTIMES:
            raise KubetrainError(f"--runtime {self.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if self.threads < 1:
            raise KubetrainError(f"--threads {self.threads} must be at least 1")


def create_app(predictor: Predictor, name: str, version: str) -> FastAPI:
    """The ASGI app serving ``predictor`` as model ``name`` (``version``)."""
    app = FastAPI(title=f"kubetrain: {name}", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def unknown(model: str) -> JSONResponse:
        return error(404, f"model {model!r} is not served here; this server serves {name!r}")

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}  # the app exists only once the model is loaded

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": kubetrain_version, "extensions": []}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{model_version}")
    def model_metadata(model: str, model_version: str = version) -> Any:
        if model != name or model_version != version:
            return unknown(model if model != name else f"{model}/{model_version}")
        return oip.metadata(predictor, version)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{model_version}/ready")
    def model_ready(model: str, model_version: str = version) -> Any:
        if model != name or model_version != version:
            return unknown(model if model != name else f"{model}/{model_version}")
        return {"name": name, "ready": True}

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{model_version}/infer")
    async def infer(model: str, request: Request, model_version: str = version) -> Any:
        if model != name or model_version != version:
            return unknown(model if model != name else f"{model}/{model_version}")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not JSON: {str(exc).splitlines()[0]}")
        try:  # on a worker thread: a large batch does not hold up health probes
            return await run_in_threadpool(oip.infer, predictor, body, version)
        except KubetrainError as exc:  # RowError and every other one-line refusal
            return error(400, str(exc).splitlines()[0])

    return app


def serve(cfg: ServeConfig) -> None:
    """Load the bundle, then serve it until interrupted."""
    import torch

    from kubetrain.serving.bundle import open_bundle

    torch.set_num_threads(cfg.threads)
    bundle = open_bundle(cfg.bundle)
    predictor = Predictor(bundle, cfg.runtime)
    name = cfg.model_name or bundle.name
    app = create_app(predictor, name, bundle.version)
    shown = "localhost" if cfg.host in ("0.0.0.0", "::") else cfg.host
    print(
        f"kubetrain | serve | model {name!r} version {bundle.version!r} ({cfg.runtime}, "
        f"{predictor.schema.kind}) at http://{shown}:{cfg.port}/v2/models/{name}/infer",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
