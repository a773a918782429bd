"""`kubetrain submit`: put the pipeline on a Kubeflow Pipelines v2 cluster and run it.

    kubetrain submit --host http://localhost:8080 --param epochs=50 --wait
    kubetrain submit --recurring "0 0 3 * * *" --param dataset=s3://data/train.csv

One command does what the KFP UI takes several pages for, through `kfp.Client`:

1. compile the pipeline (`--target cluster`, placement from the ClusterConfig
   flags) to a temporary YAML, or take an already compiled one (`--yaml`);
2. upload it as pipeline `--pipeline-name` the first time, as a new version
   (`--version`, default `<kubetrain version>-<UTC time>-<YAML hash>`) after
   that, so the UI keeps every version that ever ran;
3. get or create the experiment (`--experiment`);
4. start a run of that version with the `--param KEY=VALUE` overrides (checked
   by `RunConfig` before anything is sent), or a recurring run on a 6-field KFP
   cron (`--recurring`);
5. with `--wait`, poll the run, print each task's state changes and the final
   state; a FAILED or CANCELED run is an error (exit code 2).

Host, token and namespace come from flags or the environment kfp itself reads:
`KF_PIPELINES_ENDPOINT` (API host), `KF_PIPELINES_UI_ENDPOINT` (links),
`KF_PIPELINES_SA_TOKEN_PATH` (file holding a bearer token; the in-cluster
`/var/run/secrets/kubeflow/pipelines/token` when present). Every API failure
becomes one `KubetrainError` line naming the cause and the fix; the token
never appears in output.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import inspect
import io
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kubetrain import __version__
from kubetrain.config import cluster as cluster_config
from kubetrain.config.settings import BUILTIN_DATASETS, RunConfig, fields_of
from kubetrain.core.errors import KubetrainError

DEFAULT_PIPELINE_NAME = "kubetrain-training"
DEFAULT_EXPERIMENT = "kubetrain"
# What kfp.Client reads (kfp/client/client.py, kfp/client/__init__.py).
ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
IN_CLUSTER_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
FINAL_STATES = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")
FAILED_STATES = ("FAILED", "CANCELED")
POLL_RETRIES = 3  # consecutive failed polls --wait rides out before giving up
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,#\-]+$")
_LOG = "kubetrain | submit |"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 7x faster on 2k lines
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# ---------------------------------------------------------------- arguments


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `submit` on the subparsers of the `kubetrain` CLI."""
    parser = subparsers.add_parser(
        "submit",
        help="upload the pipeline to Kubeflow Pipelines and run it",
        description=__doc__.split("\n")[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=command)
    return parser


_EPILOG = f"""environment (what kfp.Client reads):
  {ENDPOINT_ENV}       API host when --host is not given
  {UI_ENDPOINT_ENV}    base of the printed UI links (default: the host)
  {TOKEN_PATH_ENV}     file holding the bearer token when --token is not given

examples:
  kubetrain submit --host http://localhost:8080 --param epochs=50 --wait
  kubetrain submit --recurring "0 0 3 * * *" --max-concurrency 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    api = parser.add_argument_group("Kubeflow Pipelines API")
    api.add_argument(
        "--host",
        default=None,
        help=f"KFP API endpoint, e.g. http://localhost:8080 after `kubectl -n "
        f"kubeflow port-forward svc/ml-pipeline-ui 8080:80` "
        f"(default: ${ENDPOINT_ENV})",
    )
    api.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default: the contents of ${TOKEN_PATH_ENV}, "
        f"else of {IN_CLUSTER_TOKEN_PATH} when present)",
    )
    what = parser.add_argument_group("what to submit")
    what.add_argument(
        "--target",
        choices=("local", "cluster"),
        default="cluster",
        help="compile target (default: cluster)",
    )
    what.add_argument(
        "--yaml",
        default=None,
        metavar="PATH",
        help="upload this compiled pipeline YAML instead of compiling (the "
        "placement flags below then only set --namespace and "
        "--service-account)",
    )
    what.add_argument(
        "--pipeline-name",
        default=DEFAULT_PIPELINE_NAME,
        help=f"pipeline name in the UI (default: {DEFAULT_PIPELINE_NAME})",
    )
    what.add_argument(
        "--version",
        default=None,
        help="name of the uploaded pipeline version (default: "
        "<kubetrain version>-<UTC time>-<YAML sha256 prefix>)",
    )
    what.add_argument(
        "--description",
        default=None,
        help="pipeline/version description (default: the pipeline's own)",
    )
    run = parser.add_argument_group("the run")
    run.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"experiment, created when missing (default: {DEFAULT_EXPERIMENT})",
    )
    run.add_argument(
        "--run-name",
        default=None,
        help="run (or recurring run) name (default: <pipeline>-<UTC time>)",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pipeline parameter (a RunConfig setting such as "
        "epochs=50, dashes or underscores); repeatable",
    )
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="re-run every task instead of reusing cached results",
    )
    run.add_argument(
        "--recurring",
        default=None,
        metavar="CRON",
        help="create a recurring run on this 6-field KFP cron (seconds first), "
        "e.g. '0 0 3 * * *' for 03:00 every day",
    )
    run.add_argument(
        "--max-concurrency", type=int, default=1, help="recurring runs allowed at once (default: 1)"
    )
    run.add_argument(
        "--catchup",
        action="store_true",
        help="recurring: backfill intervals missed while paused (default: off)",
    )
    wait = parser.add_argument_group("waiting")
    wait.add_argument(
        "--wait",
        action="store_true",
        help="poll the run, print task progress and the final state; exit "
        "non-zero if it FAILED or was CANCELED",
    )
    wait.add_argument(
        "--timeout",
        type=float,
        default=6 * 3600,
        help="seconds --wait waits before giving up (default: 21600)",
    )
    wait.add_argument(
        "--poll-interval",
        type=float,
        default=15.0,
        help="seconds between polls of --wait (default: 15)",
    )
    cluster_config.add_arguments(
        parser.add_argument_group(
            "cluster placement (compiled into the pipeline; --namespace is also the KFP "
            "namespace/profile of the experiment and run)"
        )
    )


def command(args: argparse.Namespace) -> int:
    """The `func` of the subcommand: `kubetrain.cli.main.main` maps KubetrainError to exit 2."""
    submit(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m kubetrain.cluster.submit ...`: the subcommand on its own."""
    parser = argparse.ArgumentParser(
        prog="kubetrain submit",
        description=__doc__.split("\n")[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except KubetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted (a run already created keeps running on the cluster)",
            file=sys.stderr,
        )
        return 130


# ---------------------------------------------------------------- checks (no network)


def parse_params(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings to a dict; keys take dashes or underscores."""
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise KubetrainError(f"--param {pair!r} must be KEY=VALUE, e.g. --param epochs=50")
        raw[key] = value
    return raw


def check_params(raw: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Typed pipeline parameters from `--param` strings, validated like a local run.

    RunConfig settings go through `RunConfig.from_flat` (type, range, choices and
    the cross-field rules, with the defaults for the rest). `extra` names further
    pipeline parameters (name -> KFP parameterType) that are not RunConfig
    settings, e.g. `publish_uri`; those are only type-checked.
    """
    extra = extra or {}
    known = {f.name for f in fields_of()}
    unknown = sorted(set(raw) - known - set(extra))
    if unknown:
        names = sorted(known | set(extra))
        hints = [difflib.get_close_matches(k, names, n=1) for k in unknown]
        hint = "; ".join(f"did you mean {h[0]}?" for h in hints if h)
        raise KubetrainError(
            f"--param {', '.join(unknown)}: not a pipeline parameter"
            f"{' (' + hint + ')' if hint else ''}; known: {', '.join(names)}"
        )
    settings = {k: v for k, v in raw.items() if k in known}
    typed = RunConfig.from_flat(settings).flat()
    dataset = settings.get("dataset")
    if dataset is not None and dataset not in BUILTIN_DATASETS and "://" not in dataset:
        raise KubetrainError(
            f"--param dataset={dataset!r} is a local path, which pods on the "
            "cluster cannot read; upload it and pass its s3:// URI, or use "
            f"one of {', '.join(BUILTIN_DATASETS)}"
        )
    params: dict[str, Any] = {k: typed[k] for k in settings}
    for key, value in raw.items():
        if key not in known:
            params[key] = _coerce_kfp(key, value, extra[key])
    return params


def _coerce_kfp(key: str, value: str, kind: str) -> Any:
    try:
        if kind == "NUMBER_INTEGER":
            return int(value)
        if kind == "NUMBER_DOUBLE":
            return float(value)
    except ValueError:
        raise KubetrainError(f"--param {key} must be a number, got {value!r}") from None
    if kind == "BOOLEAN":
        if value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise KubetrainError(f"--param {key} must be true or false, got {value!r}")
    if kind in ("STRUCT", "LIST"):
        try:
            return yaml.load(value, Loader=_YAML_LOADER)
        except yaml.YAMLError:
            raise KubetrainError(f"--param {key} must be JSON, got {value!r}") from None
    return value


def check_cron(expression: str) -> str:
    """A KFP (robfig/cron) expression: 6 fields, seconds first."""
    fields = expression.split()
    if len(fields) == 5:
        raise KubetrainError(
            f"--recurring {expression!r} has 5 fields; KFP cron has 6 with "
            f"seconds first: did you mean '0 {expression.strip()}'?"
        )
    if len(fields) != 6 or not all(_CRON_FIELD.match(f) for f in fields):
        raise KubetrainError(
            f"--recurring {expression!r} is not a 6-field KFP cron "
            "(second minute hour day-of-month month day-of-week), "
            "e.g. '0 0 3 * * *' for 03:00 every day"
        )
    return " ".join(fields)


def pipeline_parameters(spec: dict) -> dict[str, str]:
    """Name -> parameterType of the compiled pipeline's inputs."""
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: p.get("parameterType", "STRING") for name, p in params.items()}


def load_pipeline_yaml(path: Path) -> tuple[dict, list[dict]]:
    """(PipelineSpec, other documents such as the PlatformSpec) of a compiled YAML."""
    try:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_YAML_LOADER) if d]
    except FileNotFoundError:
        raise KubetrainError(
            f"--yaml {path}: no such file; compile it with `kubetrain compile --target cluster`"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise KubetrainError(
            f"{path} is not a readable pipeline YAML: {str(exc).splitlines()[0]}"
        ) from None
    if (
        not docs
        or not isinstance(docs[0], dict)
        or "pipelineInfo" not in docs[0]
        or "root" not in docs[0]
    ):
        raise KubetrainError(
            f"{path} is not a compiled KFP v2 pipeline (no pipelineInfo/root); "
            "compile it with `kubetrain compile --target cluster`"
        )
    return docs[0], docs[1:]


def disable_caching(path: Path, output: Path) -> Path:
    """Copy of a compiled YAML with caching off in every task of every DAG.

    `kfp.Client(enable_caching=False)` only rewrites root-DAG tasks of an inline
    spec (tasks inside conditions keep caching) and is dropped altogether when
    the run references an uploaded version; so --no-cache rewrites them all.
    """
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_YAML_LOADER) if d]
    spec = docs[0]
    dags = [spec.get("root", {}).get("dag", {})]
    dags += [c.get("dag", {}) for c in spec.get("components", {}).values()]
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            task.setdefault("cachingOptions", {})["enableCache"] = False
    output.write_text(yaml.dump_all(docs, Dumper=_YAML_DUMPER, sort_keys=True))
    return output


# ---------------------------------------------------------------- connection


def resolve_host(host: str | None) -> str:
    host = (host or os.environ.get(ENDPOINT_ENV) or "").strip()
    if not host:
        raise KubetrainError(
            f"no KFP API host: pass --host or set {ENDPOINT_ENV}, e.g. "
            "http://localhost:8080 after `kubectl -n kubeflow port-forward "
            "svc/ml-pipeline-ui 8080:80`, or http://ml-pipeline.kubeflow:8888 "
            "inside the cluster"
        )
    if not host.startswith(("http://", "https://")):
        host = "https://" + host  # what kfp.Client does, without its warning
    return host.rstrip("/")


def resolve_token(token: str | None) -> str | None:
    if token:
        return token.strip()
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise KubetrainError(
                f"{TOKEN_PATH_ENV}={path} cannot be read "
                f"({exc.strerror or exc}); point it at a token file "
                "or pass --token"
            ) from None
    if Path(IN_CLUSTER_TOKEN_PATH).is_file():
        return Path(IN_CLUSTER_TOKEN_PATH).read_text().strip() or None
    return None


def connect(host: str, token: str | None, namespace: str) -> Any:
    """A `kfp.Client` after a health check that fails fast with a clean message.

    The health check comes first because the client's own (in its constructor
    in some setups) retries five times, five seconds apart, and logs
    tracebacks.
    """
    import kfp
    import kfp_server_api

    config = kfp_server_api.Configuration(host=host)
    if token:
        config.api_key["authorization"] = token
        config.api_key_prefix["authorization"] = "Bearer"
    with api_call(host, "checking the KFP API health", token):
        health = kfp_server_api.HealthzServiceApi(
            kfp_server_api.ApiClient(config)
        ).healthz_service_get_healthz()
    if health is None:
        raise KubetrainError(
            f"{host} answered the health check with no body; check that "
            "--host points at the Kubeflow Pipelines API"
        )
    with warnings.catch_warnings(), api_call(host, "connecting", token):
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
        return kfp.Client(host=host, existing_token=token, namespace=namespace)


@contextlib.contextmanager
def api_call(host: str, step: str, token: str | None = None) -> Iterator[None]:
    """Map what `kfp.Client` raises to one-line KubetrainErrors; hide its prints."""
    import kfp_server_api
    import urllib3

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # kfp prints its own links
            yield
    except kfp_server_api.ApiException as exc:
        raise _api_error(
            _redact(api_error_message(host, step, exc), token), transient=(exc.status or 0) >= 500
        ) from None
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
        raise _api_error(
            _redact(
                f"cannot reach the KFP API at {host} ({_network_reason(exc)}) while {step}: "
                f"check --host/{ENDPOINT_ENV} and that the API is reachable, e.g. `kubectl -n "
                "kubeflow port-forward svc/ml-pipeline-ui 8080:80` and --host "
                "http://localhost:8080",
                token,
            ),
            transient=True,
        ) from None
    except ValueError as exc:  # kfp's own checks, e.g. two pipelines with one name
        if isinstance(exc, KubetrainError):
            raise
        raise KubetrainError(_redact(f"{step} failed: {exc}", token)) from None


def _api_error(message: str, transient: bool) -> KubetrainError:
    error = KubetrainError(message)
    error.transient = transient  # a server error or a dropped connection: worth a retry
    return error


def api_error_message(host: str, step: str, exc: Any) -> str:
    status = exc.status or 0
    detail = _body_message(exc.body) or (exc.reason or "").strip()
    detail = f": {detail}" if detail else ""
    if status in (401, 403):
        return (
            f"the KFP API at {host} rejected the credentials ({status}) while {step}"
            f"{detail}; pass --token or set {TOKEN_PATH_ENV} to a file holding a valid "
            "token" + (" with access to the --namespace profile" if status == 403 else "")
        )
    if status == 404:
        return (
            f"the KFP API at {host} answered not found (404) while {step}{detail}; "
            "check --host and that Kubeflow Pipelines v2 is installed "
            "(it serves /apis/v2beta1)"
        )
    if status == 409:
        return (
            f"the KFP API at {host} says it already exists (409) while {step}{detail}; "
            "pass another --version or --run-name"
        )
    if status >= 500:
        return f"the KFP API at {host} had a server error ({status}) while {step}{detail}"
    if status == 0:  # TLS failures and requests the client could not build
        return f"talking to the KFP API at {host} failed while {step}{detail}"
    return f"the KFP API at {host} refused {step} ({status}){detail}"


def _body_message(body: Any) -> str:
    """The error text of a grpc-gateway JSON body, or the first line of a plain one."""
    import json

    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("message") or data.get("error") or "")
    else:
        lines = [line.strip() for line in re.sub(r"<[^>]+>", " ", body).splitlines()]
        text = next((line for line in lines if line), "")
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _network_reason(exc: BaseException) -> str:
    text = str(exc)  # urllib3's MaxRetryError names its cause ("... Connection refused")
    if "Connection refused" in text:
        return "connection refused"
    if (
        "Name or service not known" in text
        or "nodename nor servname" in text
        or "Temporary failure in name resolution" in text
    ):
        return "unknown host name"
    if "timed out" in text.lower():
        return "timed out"
    return type(exc).__name__


def _redact(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


# ---------------------------------------------------------------- the flow


def default_version(yaml_text: str, now: datetime) -> str:
    digest = hashlib.sha256(yaml_text.encode()).hexdigest()[:8]
    return f"{__version__}-{now:%Y%m%d-%H%M%S}-{digest}"


def compile_for_submit(target: str, output: Path, cluster: cluster_config.ClusterConfig) -> Path:
    from kubetrain.cluster.compile import compile_pipeline

    accepted = inspect.signature(compile_pipeline).parameters
    kwargs = {name: cluster for name in ("cluster", "cluster_config") if name in accepted}
    return Path(compile_pipeline(target, output, **kwargs))


def submit(
    args: argparse.Namespace,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Compile, upload, run; returns what was created (ids, url, final state)."""
    # 1. everything that can be checked without the network
    raw = parse_params(args.param)
    cron = check_cron(args.recurring) if args.recurring else None
    if cron and args.wait:
        raise KubetrainError(
            "--wait follows one run; a recurring run (--recurring) starts "
            "runs on its schedule, so drop one of them"
        )
    if args.max_concurrency < 1:
        raise KubetrainError("--max-concurrency must be >= 1")
    if args.wait and (args.timeout <= 0 or args.poll_interval < 0):
        raise KubetrainError("--timeout must be > 0 and --poll-interval >= 0")
    if not args.pipeline_name.strip():
        raise KubetrainError("--pipeline-name must not be empty")
    if raw:  # RunConfig settings fail here, before compiling; other names after
        check_params({k: v for k, v in raw.items() if k in {f.name for f in fields_of()}})
    cluster = cluster_config.from_arguments(args)
    host = resolve_host(args.host)
    token = resolve_token(args.token)
    ui = (os.environ.get(UI_ENDPOINT_ENV) or host).rstrip("/")
    now = datetime.now(UTC)

    with tempfile.TemporaryDirectory(prefix="kubetrain-submit-") as tmp:
        # 2. the pipeline YAML
        if args.yaml:
            package = Path(args.yaml)
            if package.suffix not in (".yaml", ".yml"):
                raise KubetrainError(f"--yaml {package} must be a .yaml/.yml file")
        else:
            package = compile_for_submit(
                args.target, Path(tmp) / "kubetrain-training.yaml", cluster
            )
            print(f"{_LOG} compiled the pipeline (target {args.target})")
            if args.target == "local":
                print(
                    f"{_LOG} note: the local target has no GPU placement, retries or "
                    "registry images; use --target cluster for real runs"
                )
        spec, _ = load_pipeline_yaml(package)
        params = check_params(
            raw,
            {
                k: t
                for k, t in pipeline_parameters(spec).items()
                if k not in {f.name for f in fields_of()}
            },
        )
        missing = sorted(set(params) - set(pipeline_parameters(spec)))
        if missing:
            raise KubetrainError(
                f"the pipeline in {package} has no parameter(s) {', '.join(missing)}; recompile it"
            )
        yaml_text = package.read_text()
        version = args.version or default_version(yaml_text, now)
        description = args.description or spec["pipelineInfo"].get("description") or None
        run_name = args.run_name or f"{args.pipeline_name}-{now:%Y%m%d-%H%M%S}"
        run_package = (
            disable_caching(package, Path(tmp) / "no-cache.yaml") if args.no_cache else None
        )

        # 3. the API
        client = connect(host, token, cluster.namespace)
        result: dict[str, Any] = {
            "host": host,
            "pipeline_name": args.pipeline_name,
            "version_name": version,
        }
        with api_call(host, f"looking up pipeline {args.pipeline_name!r}", token):
            pipeline_id = client.get_pipeline_id(args.pipeline_name)
        if pipeline_id is None:
            with api_call(host, f"uploading pipeline {args.pipeline_name!r}", token):
                pipeline = client.upload_pipeline(
                    str(package), pipeline_name=args.pipeline_name, description=description
                )
                pipeline_id = pipeline.pipeline_id
            with api_call(host, "looking up the first pipeline version", token):
                versions = client.list_pipeline_versions(
                    pipeline_id, page_size=1, sort_by="created_at desc"
                )
            if not versions.pipeline_versions:
                raise KubetrainError(
                    f"the KFP API at {host} created pipeline {pipeline_id} "
                    "but lists no version of it; retry the submit"
                )
            found = versions.pipeline_versions[0]
            version_id = found.pipeline_version_id
            result["version_name"] = found.display_name or args.pipeline_name
            print(
                f"{_LOG} uploaded pipeline {args.pipeline_name} ({pipeline_id}): "
                f"{ui}/#/pipelines/details/{pipeline_id}"
            )
        else:
            with api_call(host, f"uploading version {version!r} of {args.pipeline_name!r}", token):
                uploaded = client.upload_pipeline_version(
                    str(package),
                    pipeline_version_name=version,
                    pipeline_id=pipeline_id,
                    description=description,
                )
            version_id = uploaded.pipeline_version_id
            print(
                f"{_LOG} uploaded version {version} of {args.pipeline_name}: "
                f"{ui}/#/pipelines/details/{pipeline_id}/version/{version_id}"
            )
        result.update(pipeline_id=pipeline_id, version_id=version_id)

        with api_call(host, f"getting or creating experiment {args.experiment!r}", token):
            experiment = client.create_experiment(args.experiment, namespace=cluster.namespace)
        result["experiment_id"] = experiment.experiment_id
        print(f"{_LOG} experiment {args.experiment} ({experiment.experiment_id})")

        # A version reference cannot carry caching options: --no-cache sends the
        # spec inline (the uploaded version is the same pipeline, cached).
        source: dict[str, Any] = (
            {"pipeline_package_path": str(run_package), "enable_caching": False}
            if run_package
            else {"pipeline_id": pipeline_id, "version_id": version_id}
        )
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        shown += ", caching off" if run_package else ""
        if cron:
            with api_call(host, f"creating recurring run {run_name!r}", token):
                job = client.create_recurring_run(
                    experiment_id=experiment.experiment_id,
                    job_name=run_name,
                    description=description,
                    cron_expression=cron,
                    max_concurrency=args.max_concurrency,
                    no_catchup=not args.catchup,
                    params=params,
                    service_account=cluster.service_account,
                    **source,
                )
            url = f"{ui}/#/recurringrun/details/{job.recurring_run_id}"
            result.update(
                recurring_run_id=job.recurring_run_id, url=url, state=str(job.status or "ENABLED")
            )
            print(f"{_LOG} recurring run {run_name} on '{cron}' ({shown}): {url}")
            return result

        with api_call(host, f"creating run {run_name!r}", token):
            run = client.run_pipeline(
                experiment_id=experiment.experiment_id,
                job_name=run_name,
                params=params,
                service_account=cluster.service_account,
                **source,
            )
        url = f"{ui}/#/runs/details/{run.run_id}"
        result.update(run_id=run.run_id, url=url, state=str(run.state or "PENDING"))
        print(f"{_LOG} run {run_name} ({shown}): {url}")
        if args.wait:
            result["state"] = wait_for_run(
                client,
                host,
                token,
                run.run_id,
                run_name,
                url,
                timeout=args.timeout,
                interval=args.poll_interval,
                sleep=sleep,
                clock=clock,
            )
        return result


def wait_for_run(
    client: Any,
    host: str,
    token: str | None,
    run_id: str,
    name: str,
    url: str,
    *,
    timeout: float,
    interval: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> str:
    """Poll until a final state; print run and task state changes as they happen."""
    start = clock()
    last_state = None
    tasks_seen: dict[str, str] = {}
    failures = 0
    while True:
        try:
            with api_call(host, f"polling run {run_id}", token):
                run = client.get_run(run_id)
            failures = 0
        except KubetrainError as exc:  # ride out a restarting API server or port-forward
            failures += 1
            if (
                not getattr(exc, "transient", False)
                or failures > POLL_RETRIES
                or clock() - start >= timeout
            ):
                raise
            print(f"{_LOG} poll {failures}/{POLL_RETRIES} failed, retrying: {exc}")
            sleep(max(interval, 1.0))
            continue
        elapsed = clock() - start
        state = str(run.state or "PENDING")
        stamp = f"[{int(elapsed) // 60:3d}m{int(elapsed) % 60:02d}s]"
        if state != last_state and state not in FINAL_STATES:
            print(f"{_LOG} {stamp} run {name}: {state}")
            last_state = state
        details = getattr(run, "run_details", None)
        for task in getattr(details, "task_details", None) or []:
            task_name = task.display_name or task.task_id or "?"
            task_state = str(task.state or "PENDING")
            if task_name == "root" or tasks_seen.get(task.task_id or task_name) == task_state:
                continue
            tasks_seen[task.task_id or task_name] = task_state
            error = getattr(getattr(task, "error", None), "message", None)
            print(
                f"{_LOG} {stamp} task {task_name}: {task_state}"
                f"{' (' + error + ')' if error and task_state in FAILED_STATES else ''}"
            )
        if state in FINAL_STATES:
            break
        if elapsed >= timeout:
            raise KubetrainError(
                f"run {name} is still {state} after {timeout:g}s; it keeps "
                f"running on the cluster: {url} (raise --timeout to wait longer)"
            )
        sleep(interval)
    if state in FAILED_STATES:
        error = getattr(getattr(run, "error", None), "message", None)
        raise KubetrainError(
            f"run {name} ended {state} after {stamp.strip('[]')}"
            f"{': ' + error if error else ''}; logs and details: {url}"
        )
    print(f"{_LOG} {stamp} run {name} {state}: {url}")
    return state


if __name__ == "__main__":
    sys.exit(main())
