"""Run the pipeline on this machine with KFP's own local runner (kfp.local).

The pipeline is the same object that compiles to YAML for Kubeflow; only the
runner differs. Around it this module adds what a person at a terminal needs:
a quiet console (stage/epoch/trial lines only; KFP's full executor log goes to
``runs/<id>/pipeline.log``), per-stage timings, a one-line error instead of a
subprocess traceback, ``summary.json``, and one HTML run report with plots.

It also keeps runs apart and the machine clean: every run gets its own folder
(random run ids, created exclusively), a full or read-only ``--runs-dir`` is a
one-line error, ``--no-cache`` refreshes kfp.local's cache instead of merely
bypassing it, and the temporary folders kfp.local makes per task
(``mktemp -d`` + ``ephemeral_component.py``, and ``kfp-workspace-*``) are
removed when the run ends, whether it succeeded or not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetrain import registry
from kubetrain.cluster.backends import CHECKPOINT_ROOT_ENV
from kubetrain.config.settings import RunConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.report import plots
from kubetrain.report.html import Section, write_html

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION = re.compile(r"^\s*[\w.]*(Error|Exception|Interrupt)\b: ")
TASK_STAGE = registry.task_stage()
#: The run table's rows; publish is added when the run publishes (and deploy with --deploy).
STAGES = tuple(s for s in registry.STAGE_NAMES if s not in ("publish", "deploy"))
SKIPPED_TASKS = frozenset(s.task for s in registry.STAGES if s.alternative)
PUBLISHED = re.compile(r"model bundle published to (\S+)")
DEPLOYED = re.compile(r"\| deploy decision: (.+)$")
TRACEBACK = "Traceback (most recent call last):"
#: How often a run folder is drawn again when the name is taken (never, in practice).
RUN_DIR_ATTEMPTS = 8
#: A task that died of a full or read-only disk: its error line gets the fix appended.
STORAGE_IN_TASK = re.compile(rf"\[Errno ({errno.ENOSPC}|{errno.EDQUOT}|{errno.EROFS})\]")


@dataclass
class StageClock:
    """Stage status and wall time, read from kfp.local's own task log lines."""

    started: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def feed(self, line: str) -> str | None:
        """Update from one log line; return a console line worth showing, if any."""
        if m := re.search(r"Executing task '([\w-]+)'", line):
            self.started[m.group(1)] = time.perf_counter()
            stage = TASK_STAGE.get(m.group(1), m.group(1))
            return f"{progress.PREFIX} {stage} | started"
        if m := re.search(r"Task '?([\w-]+)'? cache hit", line):
            self._done(m.group(1), "cached")
            return f"{progress.PREFIX} {TASK_STAGE.get(m.group(1), m.group(1))} | cached"
        if m := re.search(r"Task '([\w-]+)' finished with status (\w+)", line):
            task, state = m.group(1), m.group(2)
            if task in self.stages and self.stages[task]["status"] == "cached":
                return None
            self._done(task, "succeeded" if state == "SUCCESS" else "failed")
            rec = self.stages[task]
            return f"{progress.PREFIX} {rec['name']} | {rec['status']} in {rec['seconds']:.1f}s"
        return None

    def _done(self, task: str, status: str) -> None:
        began = self.started.get(task)
        seconds = time.perf_counter() - began if began and status != "cached" else 0.0
        skipped = task in SKIPPED_TASKS
        self.stages[task] = {
            "name": TASK_STAGE.get(task, task),
            "status": "skipped" if skipped and status == "succeeded" else status,
            "seconds": round(seconds, 2),
            "task": task,
        }

    def table(self, publish: bool = False, deploy: bool = False) -> list[dict[str, Any]]:
        """One row per stage of a finished run; a stage kfp.local never logged was
        served from its cache as part of a cached sub-DAG."""
        by_stage = {rec["name"]: rec for rec in self.stages.values()}
        extra = (("publish",) if publish else ()) + (("deploy",) if publish and deploy else ())
        return [
            by_stage.get(s, {"name": s, "status": "cached", "seconds": 0.0, "task": ""})
            for s in STAGES + extra
        ]


class ConsoleFilter(io.TextIOBase):
    """A stdout stand-in: everything to the log file, progress lines to the console.

    It also remembers why a task failed, because kfp.local's own exception only
    says "Inner task failed: 'train'": the first `KubetrainError` message, else
    the last line of the last Python traceback (any exception class, e.g.
    ``zipfile.BadZipFile: File is not a zip file``), else the last line that
    looks like an exception.
    """

    def __init__(self, console, log_file, clock: StageClock):
        self.console, self.log, self.clock = console, log_file, clock
        self.buffer_ = ""
        self.error: str | None = None  # first KubetrainError message of a failed task
        self.traceback_exception: str | None = None  # last traceback's final line
        self.last_exception: str | None = None  # any other exception-looking line
        self.published: str | None = None
        self.deploy_decision: str | None = None  # the deploy stage's one-line verdict
        #: The first error writing the log (a full disk); later writes go to the console only.
        self.log_failure: OSError | None = None
        self._in_traceback = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.log_failure is None:
            try:
                self.log.write(text)
            except OSError as exc:  # raising here would kill kfp's log relay mid-task
                self.log_failure = exc
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self._line(ANSI.sub("", line))
        return len(text)

    @property
    def cause(self) -> str | None:
        """The most specific reason a failed run has logged, if any."""
        return self.error or self.traceback_exception or self.last_exception

    def _line(self, line: str) -> None:
        self._track_traceback(line)
        if KubetrainError.LOG_PREFIX in line and self.error is None:
            self.error = line.split(KubetrainError.LOG_PREFIX, 1)[1].strip()
        elif EXCEPTION.match(line):
            self.last_exception = line.strip()
        if m := PUBLISHED.search(line):
            self.published = m.group(1)
        if m := DEPLOYED.search(line):
            self.deploy_decision = m.group(1).strip()
        shown = self.clock.feed(line)
        if shown is None and progress.PREFIX in line:
            shown = line[line.index(progress.PREFIX) :]
        if shown:
            self.console.write(shown + "\n")
            self.console.flush()

    def _track_traceback(self, line: str) -> None:
        """A traceback's frames are indented; its first unindented line is the exception."""
        if line.startswith(TRACEBACK):
            self._in_traceback = True
        elif self._in_traceback and line.strip() and not line[0].isspace():
            self._in_traceback = False
            self.traceback_exception = line.strip()

    def flush(self) -> None:
        if self.log_failure is None:
            try:
                self.log.flush()
            except OSError as exc:
                self.log_failure = exc


def fingerprint(source: str) -> str:
    """Content hash of a local dataset file (cache key input), or of an image folder's
    listing (paths, sizes, modification times: hashing every image would cost as much
    as decoding it); empty for other sources."""
    from kubetrain.core.integrity import sha256_file

    path = Path(source)
    if path.is_dir():
        listing = sorted(
            f"{p.relative_to(path)}\t{st.st_size}\t{st.st_mtime_ns}"
            for p in path.rglob("*")
            if p.is_file() and (st := p.stat())
        )
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()
    return sha256_file(source) if path.is_file() else ""


def _absolute_source(cfg: RunConfig) -> RunConfig:
    """Tasks may run in another working directory: pass local files by absolute path."""
    import dataclasses

    path = Path(cfg.data.dataset)
    if path.exists():
        return dataclasses.replace(cfg, data=cfg.data.replace({"dataset": str(path.resolve())}))
    return cfg


def new_run_id(cfg: RunConfig) -> str:
    """``<UTC time>-<config hash>-<random>``: sortable, tells configs apart, and never
    the same for two runs started in the same second with the same config."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    tag = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
    return f"{stamp}-{tag}-{secrets.token_hex(3)}"


def create_run_dir(runs: Path, cfg: RunConfig) -> tuple[str, Path]:
    """Make ``runs/<new id>/``, exclusively: a run never writes into another's folder.

    The random part makes a collision all but impossible; `mkdir` without
    ``exist_ok`` makes it harmless (the loser draws again).
    """
    if runs.exists() and not runs.is_dir():
        raise KubetrainError(
            f"--runs-dir {runs} is a file, not a directory; "
            "pass a directory (for example --runs-dir runs)"
        )
    runs.mkdir(parents=True, exist_ok=True)
    for _ in range(RUN_DIR_ATTEMPTS):
        run_id = new_run_id(cfg)
        try:
            (runs / run_id).mkdir()
        except FileExistsError:
            continue
        return run_id, runs / run_id
    raise KubetrainError(
        f"could not create a new run folder under {runs} after "
        f"{RUN_DIR_ATTEMPTS} tries; remove stale runs there and retry"
    )


#: errno -> (what went wrong, the fix), for errors writing under --runs-dir
STORAGE_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free some space or pass --runs-dir on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or pass --runs-dir on another disk"),
    errno.EROFS: ("read-only file system", "pass --runs-dir pointing to a writable directory"),
    errno.EACCES: ("permission denied", "pass --runs-dir pointing to a writable directory"),
    errno.EPERM: ("operation not permitted", "pass --runs-dir pointing to a writable directory"),
    errno.ENOTDIR: ("a parent folder is a file", "pass --runs-dir naming a directory"),
    errno.EEXIST: ("a file is in the way", "pass --runs-dir naming a directory"),
}


def storage_error(exc: OSError, runs: Path) -> KubetrainError | None:
    """The one-line error for a failed write under `runs`, or None if `exc` is not one.

    A full or read-only disk is one wherever it shows; a permission or
    file-in-the-way error is only blamed on ``--runs-dir`` if it happened there
    (an unreadable dataset file is another problem, with another fix).
    """
    if exc.errno not in STORAGE_ERRORS:
        return None
    what, fix = STORAGE_ERRORS[exc.errno]
    where = Path(exc.filename) if exc.filename else runs
    if (
        exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
        and where != runs
        and runs not in where.parents
    ):
        return None
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(where)):
        return KubetrainError(f"--runs-dir {runs}: {blocker} is a file, not a directory; {fix}")
    return KubetrainError(f"cannot write {where} (--runs-dir {runs}): {what}; {fix}")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of `path` and its parents that exists as something other than a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


@contextlib.contextmanager
def task_tempdir() -> Iterator[Path]:
    """Point the tasks' TMPDIR at a folder of this run's own, and remove it at the end.

    kfp.local runs each lightweight component as ``sh -ec 'program_path=$(mktemp -d)
    ...'`` (kfp/dsl/component_factory.py) and never removes that folder, and
    ``local.init`` makes a ``kfp-workspace-*`` folder per call: hundreds of
    ``/tmp/tmp.*`` folders after a few runs. A private TMPDIR catches all of
    them, including those of tasks that failed, and, unlike a before/after
    listing of /tmp, never touches the folders of another run going on at the
    same time.
    """
    tempfile.gettempdir()  # fix this process's own tempdir before TMPDIR changes
    private = Path(tempfile.mkdtemp(prefix="kubetrain-tasks-"))
    try:
        with environ("TMPDIR", str(private)):  # subprocesses inherit os.environ
            yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """Set one variable for the run's task processes (they inherit os.environ), then restore it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


class _RefreshingCache:
    """kfp.local's cache with every lookup a miss: tasks run, and their fresh outputs
    replace the cache entries (see `kfp_caching`)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def compute_key(self, *args: Any, **kwargs: Any) -> str:
        return self.inner.compute_key(*args, **kwargs)

    def get(self, key: str) -> None:
        return None

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        self.inner.put(key, outputs)


@contextlib.contextmanager
def kfp_caching(cache: bool) -> Iterator[bool]:
    """Yield the `enable_caching` for ``local.init``; with `cache` off, refresh the cache.

    kfp.local (2.17, kfp/local/cache.py and orchestrator/task_executor.py) keys
    a task by component, command and arguments (input artifacts by URI) and
    stores ``<pipeline_root>/.kfp_cache/<key>.json`` pointing at the output
    URIs; an entry is a hit as long as those files exist. With caching
    disabled it neither reads nor writes entries, so a plain ``--no-cache`` run
    would leave a damaged entry in place and the next cached run would be
    served it again. Instead, ``--no-cache`` keeps caching on with every lookup
    a miss: each task runs and its entry is rewritten to point at the new
    outputs. The first task's key does not depend on earlier outputs, so the
    next cached run follows the fresh chain; stale entries of later tasks are
    keyed by the old URIs and are never reached again.
    """
    if cache:
        yield True
        return
    from kfp.local import cache as kfp_cache

    original = getattr(kfp_cache, "get_local_cache", None)
    if original is None:  # another kfp: fall back to a plain uncached run
        yield False
        return

    def refreshing() -> _RefreshingCache | None:
        found = original()
        return None if found is None else _RefreshingCache(found)

    kfp_cache.get_local_cache = refreshing
    try:
        yield True
    finally:
        kfp_cache.get_local_cache = original


def unshadow_docker() -> None:
    """Keep the repo's docker/ folder from posing as the `docker` package.

    Run as `python -m ...` from the repo root, Python would import the folder
    of Dockerfiles as a namespace package named `docker`, and kfp.local's
    optional Docker runner would then crash on import instead of being skipped.
    """
    import importlib.util

    spec = importlib.util.find_spec("docker")
    if spec is not None and spec.origin in (None, "namespace"):
        sys.modules["docker"] = None  # type: ignore[assignment]  # import raises ImportError


def run_local(
    cfg: RunConfig, runs_dir: str | os.PathLike = "runs", cache: bool = True, console=None
) -> dict[str, Any]:
    """Run the whole pipeline locally; returns the summary (also written to disk).

    Every failure a user can fix (a failed task, a full or read-only
    ``runs_dir``) is raised as one `KubetrainError` line.
    """
    unshadow_docker()
    console = console or sys.stdout
    runs = Path(runs_dir).resolve()
    try:
        return _run_local(cfg, runs, cache, console)
    except OSError as exc:
        if (error := storage_error(exc, runs)) is None:
            raise
        raise error from None


def _run_local(cfg: RunConfig, runs: Path, cache: bool, console) -> dict[str, Any]:
    from kfp import local

    from kubetrain.pipelines.training import training_pipeline

    run_id, run_dir = create_run_dir(runs, cfg)
    clock = StageClock()
    console.write(
        f"{progress.PREFIX} run {run_id} | dataset {cfg.data.dataset} | "
        f"{cfg.tune.tune_trials} tuning trials | up to {cfg.final.epochs or 'auto'} epochs | "
        f"cache {'on' if cache else 'off'}\n"
    )
    log_path = run_dir / "pipeline.log"
    # checkpoints outlive a run's output folder: a killed run's retry resumes from them
    checkpoints = environ(CHECKPOINT_ROOT_ENV, str(runs / ".checkpoints"))
    with task_tempdir() as scratch, kfp_caching(cache) as enable_caching, checkpoints:
        (scratch / "workspace").mkdir()
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(runs / ".kfp"),
            workspace_root=str(scratch / "workspace"),
            enable_caching=enable_caching,
            raise_on_error=True,
        )
        started = time.perf_counter()
        log = open(log_path, "w")  # noqa: SIM115  (closed below; a failed close is reported)
        out = ConsoleFilter(console, log, clock)
        failure: Exception | None = None
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                task = training_pipeline(
                    **_absolute_source(cfg).flat(), fingerprint=fingerprint(cfg.data.dataset)
                )
        except Exception as exc:  # kfp.local raises RuntimeError for a failed task
            failure = exc
        finally:
            try:
                log.close()
            except OSError as exc:  # the last buffered lines did not fit either
                out.log_failure = out.log_failure or exc
    if out.log_failure is not None and storage_error(out.log_failure, runs) is not None:
        raise out.log_failure  # run_local names the path and the fix
    if failure is not None:
        if isinstance(failure, OSError) and storage_error(failure, runs) is not None:
            raise failure  # kfp.local itself could not write under runs/.kfp
        raise KubetrainError(f"{_failure_cause(out, failure)} (full log: {log_path})") from None
    seconds = time.perf_counter() - started
    summary = summarize(
        cfg,
        run_id,
        run_dir,
        task.outputs,
        clock.table(publish=bool(cfg.publish.publish_uri), deploy=cfg.deploy.deploy),
        seconds,
    )
    summary["published"] = out.published
    if cfg.deploy.deploy:
        summary["deploy_decision"] = out.deploy_decision
    _write_run(runs, run_dir, summary, task.outputs)
    return summary


def _failure_cause(out: ConsoleFilter, exc: Exception) -> str:
    """The task's own error, not kfp.local's generic "Inner task failed"."""
    lines = ANSI.sub("", str(exc)).strip().splitlines()
    cause = out.cause or (lines[0] if lines else type(exc).__name__)
    if out.error is None and (m := STORAGE_IN_TASK.search(cause)):
        cause += f"; {STORAGE_ERRORS[int(m.group(1))][1]}"
    return cause


def _meta(artifact) -> dict[str, Any]:
    return dict(artifact.metadata or {})


def summarize(
    cfg: RunConfig,
    run_id: str,
    run_dir: Path,
    outputs: dict[str, Any],
    stages: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    evaluation = json.loads(Path(outputs["evaluation"].path).read_text())
    compression = outputs["compression"]
    from kubetrain.training.loop import trained_hyperparameters

    trained = _meta(outputs["trained_model"])
    # the values the model trained with (auto ones resolved, no width a ResNet ignores)
    best = trained_hyperparameters(outputs["trained_model"].path)
    if compression.get("skipped"):
        compressed: dict[str, Any] = {"skipped": True, "reason": compression["reason"]}
    else:
        chosen = next(v for v in compression["variants"] if v["name"] == compression["chosen"])
        score = "rmse" if "rmse" in chosen else "accuracy"
        compressed = {
            "format": "onnx",
            "variant": chosen["name"],
            "bytes": int(chosen["bytes"]),
            "gzip_bytes": int(chosen["gzip_bytes"]),
            score: chosen[score],
            "cpu_latency_ms": chosen["cpu_latency_ms"],
            f"baseline_{score}": compression[f"baseline_{score}"],
        }
    regression = evaluation.get("task") == "regression"
    return {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "pipeline_seconds": round(seconds, 2),
        "config": cfg.to_dict(),
        "stages": stages,
        "dataset": _meta(outputs["dataset"]),
        "best_hyperparameters": best,
        # the best trial's K-fold mean and std per metric (absent without cross-validation)
        "cross_validation": {
            k: v for k, v in (outputs["tuning"]["meta"].get("cv") or {}).items() if k != "per_fold"
        },
        "task": "regression" if regression else "classification",
        "validation_metrics": {
            k: trained.get(k)
            for k in trained
            if k.startswith("val_") or k in ("best_epoch", "epochs_run")
        },
        "test_metrics": {
            k: evaluation[k]
            for k in (
                ("r2", "rmse", "mae")
                if regression
                else ("accuracy", "macro_f1", "roc_auc", "precision_macro", "recall_macro")
            )
        },
        "quality_gate": {
            "passed": evaluation["gate"] == "pass",
            "reason": evaluation["gate_reason"],
            **(
                {"min_r2": evaluation["min_r2"]}
                if regression
                else {"min_accuracy": evaluation["min_accuracy"]}
            ),
        },
        "compressed": compressed,
        "artifacts": {
            "trained_model": outputs["trained_model"].path,
            "compressed_model": (
                str(Path(compression["uri"]) / "model.onnx")
                if not compression.get("skipped")
                else None
            ),
            "report": str(run_dir / "report.html"),
            "log": str(run_dir / "pipeline.log"),
        },
    }


def _write_run(runs: Path, run_dir: Path, summary: dict[str, Any], outputs: dict[str, Any]) -> None:
    from kubetrain.data.datasets import write_json

    write_report(run_dir / "report.html", summary, outputs)
    write_json(run_dir / "summary.json", summary)
    # `latest` moves to each run as it finishes; one atomic rename, so concurrent
    # runs leave it pointing at a complete run, never at nothing
    latest = runs / "latest"
    tmp = runs / f".latest-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.symlink_to(run_dir.name)
    try:
        os.replace(tmp, latest)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(path: Path, summary: dict[str, Any], outputs: dict[str, Any]) -> None:
    """The run report: every stage's picture in one self-contained HTML file."""
    from kubetrain.stages import (
        compression_sections,
        evaluation_sections,
    )

    ingest_meta = summary["dataset"]
    clean_meta = _meta(outputs["train_split"])
    aug_meta = _meta(outputs["augmented"])
    trials_doc = outputs["tuning"]
    from kubetrain.training.models import read_info

    model_info = read_info(outputs["trained_model"].path)
    evaluation = json.loads(Path(outputs["evaluation"].path).read_text())
    compression = outputs["compression"]
    classes = [str(c) for c in ingest_meta.get("classes", [])]

    def ordered(counts: dict) -> dict:  # KFP metadata maps come back unordered
        return {c: counts[c] for c in classes if c in counts} or counts

    sections = [
        Section(
            "Run",
            facts={
                "run": summary["run_id"],
                "dataset": ingest_meta.get("source"),
                "pipeline seconds": summary["pipeline_seconds"],
                **(
                    {"test R^2": summary["test_metrics"]["r2"]}
                    if "r2" in summary["test_metrics"]
                    else {"test accuracy": summary["test_metrics"]["accuracy"]}
                ),
            },
            tables=[summary["stages"]],
        ),
        Section(
            "Data: class balance",
            facts={
                "rows": ingest_meta.get("rows"),
                "features": ingest_meta.get("features"),
                "content sha256": str(ingest_meta.get("content_hash", ""))[:16],
            },
            images=[plots.class_balance(ordered(ingest_meta.get("class_counts", {})))],
        ),
        Section(
            "Cleaning",
            tables=[
                [
                    {
                        k: clean_meta.get(k)
                        for k in (
                            "rows_in",
                            "duplicates_removed",
                            "missing_values",
                            "features_out",
                            "scaling",
                            "impute",
                            "outliers",
                        )
                        if k in clean_meta
                    }
                ]
            ],
        ),
        Section(
            "Augmentation (training split)",
            images=[
                plots.class_balance_compare(
                    ordered(aug_meta.get("class_counts_before", {})),
                    ordered(aug_meta.get("class_counts_after", {})),
                )
            ],
        ),
        Section(
            "Tuning trials",
            facts={
                "algorithm": trials_doc["meta"]["algorithm"],
                "trials": trials_doc["meta"]["trials"],
            },
            images=[
                plots.tuning_trials(
                    trials_doc["trials"],
                    trials_doc["meta"]["objective"],
                    trials_doc["meta"]["goal"],
                )
            ]
            if trials_doc["trials"]
            else [],
            tables=[[summary["best_hyperparameters"]]],
        ),
        Section(
            "Learning curves (final training)",
            images=[plots.learning_curves(model_info.get("history", []))],
        ),
        *evaluation_sections(evaluation),
    ]
    if compression.get("skipped"):
        sections.append(Section("Compression", text=compression["reason"]))
    else:
        sections += compression_sections(compression, summary["config"]["accuracy_budget"])
    write_html(
        path,
        f"kubetrain run {summary['run_id']}",
        sections,
        subtitle="ingest -> clean -> augment -> tune -> train -> evaluate -> compress",
    )


def summary_table(summary: dict[str, Any]) -> str:
    """The plain-text table `make run` ends with."""
    lines = ["", "stage      status      seconds", "---------  ----------  -------"]
    for s in summary["stages"]:
        lines.append(f"{s['name']:<9}  {s['status']:<10}  {s['seconds']:>7.1f}")
    m, c = summary["test_metrics"], summary["compressed"]
    lines += [
        "",
        f"pipeline wall time     {summary['pipeline_seconds']:.1f}s",
        "best hyperparameters   "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in summary["best_hyperparameters"].items()
        ),
        (
            f"test metrics           R^2 {m['r2']:.4f} | RMSE {m['rmse']:.4g} | MAE {m['mae']:.4g}"
            if "r2" in m
            else f"test metrics           accuracy {m['accuracy']:.4f} | macro_f1 "
            f"{m['macro_f1']:.4f} | roc_auc "
            + ("n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}")
        ),
        f"quality gate           {summary['quality_gate']['reason']}",
    ]
    if c.get("skipped"):
        lines.append(f"compressed model       skipped ({c['reason']})")
    else:
        lines.append(
            f"compressed model       {c['variant']} ONNX, {c['bytes'] / 1024:.1f} KiB "
            f"({c['gzip_bytes'] / 1024:.1f} KiB gzip), "
            + (f"RMSE {c['rmse']:.4g}, " if "rmse" in c else f"accuracy {c['accuracy']:.4f}, ")
            + f"{c['cpu_latency_ms']:.3f} ms/row on CPU"
        )
    lines += [
        f"report                 {summary['artifacts']['report']}",
        f"summary                {Path(summary['artifacts']['report']).parent / 'summary.json'}",
    ]
    return "\n".join(lines)
