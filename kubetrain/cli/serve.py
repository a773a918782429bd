"""`kubetrain serve`: its flags, parsed once into `ServeConfig` (`kubetrain.serving.server`).

Apart from the server so that building the CLI's parser imports neither the model code
nor the web framework (``kubetrain run`` needs neither).
"""

from __future__ import annotations

import argparse

from kubetrain.core.errors import KubetrainError

RUNTIMES = ("pytorch", "onnx")  # kubetrain.serving.predictor.RUNTIMES, checked there


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a published bundle over the KServe Open Inference Protocol v2"
    )
    p.add_argument(
        "--bundle", required=True, help="bundle folder or s3://<bucket>/<prefix>/<model>/<version>/"
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--model-name", default="", help="name in the URLs (default: the bundle's)")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="pytorch",
        help="pytorch (default): the network the quality gate passed; onnx: the variant "
        "compress kept (model.onnx)",
    )
    p.add_argument("--threads", type=int, default=1, help="threads the model runs on (default 1)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from kubetrain.serving.server import ServeConfig, serve
    except ImportError as exc:  # fastapi / uvicorn: the serve extra, not in `make run`'s install
        raise KubetrainError(
            f"kubetrain serve needs the serve extra ({exc.name} is not installed): "
            "pip install -c constraints.txt -e '.[serve]'"
        ) from None

    serve(
        ServeConfig(
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            model_name=args.model_name,
            runtime=args.runtime,
            threads=args.threads,
        )
    )
    return 0
