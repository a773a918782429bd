"""Run the pipeline on this machine with KFP's own local runner (kfp.local).

The pipeline is the same object that compiles to YAML for Kubeflow; only the
runner differs. Around it this module adds what a person at a terminal needs:
a quiet console (stage/epoch/trial lines only; KFP's full executor log goes to
``runs/<id>/pipeline.log``), per-stage timings, a one-line error instead of a
subprocess traceback, ``summary.json``, and one HTML run report with plots.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetrain import registry
from kubetrain.config.settings import RunConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.report import plots
from kubetrain.report.html import Section, write_html

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION = re.compile(r"^\s*[\w.]*(Error|Exception|Interrupt)\b: ")
TASK_STAGE = registry.task_stage()
#: The run table's rows; publish is added when the run publishes.
STAGES = tuple(s for s in registry.STAGE_NAMES if s != "publish")
SKIPPED_TASKS = frozenset(s.task for s in registry.STAGES if s.alternative)
PUBLISHED = re.compile(r"model bundle published to (\S+)")


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
        self.stages[task] = {"name": TASK_STAGE.get(task, task),
                             "status": "skipped" if skipped and status == "succeeded" else status,
                             "seconds": round(seconds, 2), "task": task}

    def table(self, publish: bool = False) -> list[dict[str, Any]]:
        """One row per stage of a finished run; a stage kfp.local never logged was
        served from its cache as part of a cached sub-DAG."""
        by_stage = {rec["name"]: rec for rec in self.stages.values()}
        return [by_stage.get(s, {"name": s, "status": "cached", "seconds": 0.0, "task": ""})
                for s in STAGES + (("publish",) if publish else ())]


class ConsoleFilter(io.TextIOBase):
    """A stdout stand-in: everything to the log file, progress lines to the console."""

    def __init__(self, console, log_file, clock: StageClock):
        self.console, self.log, self.clock = console, log_file, clock
        self.buffer_ = ""
        self.error: str | None = None  # first KubetrainError message of a failed task
        self.last_exception: str | None = None  # any other exception's last line
        self.published: str | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self._line(ANSI.sub("", line))
        return len(text)

    def _line(self, line: str) -> None:
        if KubetrainError.LOG_PREFIX in line and self.error is None:
            self.error = line.split(KubetrainError.LOG_PREFIX, 1)[1].strip()
        elif EXCEPTION.match(line):
            self.last_exception = line.strip()
        if m := PUBLISHED.search(line):
            self.published = m.group(1)
        shown = self.clock.feed(line)
        if shown is None and progress.PREFIX in line:
            shown = line[line.index(progress.PREFIX):]
        if shown:
            self.console.write(shown + "\n")
            self.console.flush()

    def flush(self) -> None:
        self.log.flush()


def fingerprint(source: str) -> str:
    """Content hash of a local dataset file (cache key input); empty for other sources."""
    from kubetrain.data.datasets import sha256_file

    return sha256_file(source) if Path(source).is_file() else ""


def _absolute_source(cfg: RunConfig) -> RunConfig:
    """Tasks may run in another working directory: pass local files by absolute path."""
    import dataclasses

    path = Path(cfg.data.dataset)
    if path.exists():
        return dataclasses.replace(cfg, data=cfg.data.replace({"dataset": str(path.resolve())}))
    return cfg


def new_run_id(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    tag = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
    return f"{stamp}-{tag}"


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


def run_local(cfg: RunConfig, runs_dir: str | os.PathLike = "runs", cache: bool = True,
              console=None) -> dict[str, Any]:
    """Run the whole pipeline locally; returns the summary (also written to disk)."""
    unshadow_docker()
    from kfp import local

    from kubetrain.pipelines.training import training_pipeline

    console = console or sys.stdout
    runs = Path(runs_dir).resolve()
    run_id = new_run_id(cfg)
    run_dir = runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    console.write(f"{progress.PREFIX} run {run_id} | dataset {cfg.data.dataset} | "
                  f"{cfg.tune.tune_trials} tuning trials | up to {cfg.final.epochs} epochs | "
                  f"cache {'on' if cache else 'off'}\n")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs / ".kfp"),
               enable_caching=cache, raise_on_error=True)
    started = time.perf_counter()
    with open(run_dir / "pipeline.log", "w") as log:
        out = ConsoleFilter(console, log, clock)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                task = training_pipeline(**_absolute_source(cfg).flat(),
                                         fingerprint=fingerprint(cfg.data.dataset))
        except Exception as exc:  # kfp.local raises RuntimeError for a failed task
            cause = out.error or out.last_exception or ANSI.sub("", str(exc)).splitlines()[0]
            raise KubetrainError(f"{cause} (full log: {run_dir / 'pipeline.log'})") from None
    seconds = time.perf_counter() - started
    summary = summarize(cfg, run_id, run_dir, task.outputs,
                        clock.table(publish=bool(cfg.publish.publish_uri)), seconds)
    summary["published"] = out.published
    _write_run(runs, run_dir, summary, task.outputs)
    return summary


def _meta(artifact) -> dict[str, Any]:
    return dict(artifact.metadata or {})


def summarize(cfg: RunConfig, run_id: str, run_dir: Path, outputs: dict[str, Any],
              stages: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    evaluation = json.loads(Path(outputs["evaluation"].path).read_text())
    compression = outputs["compression"]
    best = cfg.hyper.replace(outputs["best_hyperparameters"]).to_dict()
    if compression.get("skipped"):
        compressed: dict[str, Any] = {"skipped": True, "reason": compression["reason"]}
    else:
        chosen = next(v for v in compression["variants"] if v["name"] == compression["chosen"])
        compressed = {"format": "onnx", "variant": chosen["name"], "bytes": int(chosen["bytes"]),
                      "gzip_bytes": int(chosen["gzip_bytes"]), "accuracy": chosen["accuracy"],
                      "cpu_latency_ms": chosen["cpu_latency_ms"],
                      "baseline_accuracy": compression["baseline_accuracy"]}
    return {
        "run_id": run_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline_seconds": round(seconds, 2), "config": cfg.to_dict(), "stages": stages,
        "dataset": _meta(outputs["dataset"]),
        "best_hyperparameters": best,
        "validation_metrics": {k: _meta(outputs["trained_model"]).get(k)
                               for k in ("val_accuracy", "val_loss", "best_epoch", "epochs_run")},
        "test_metrics": {k: evaluation[k] for k in ("accuracy", "macro_f1", "roc_auc",
                                                    "precision_macro", "recall_macro")},
        "quality_gate": {"passed": evaluation["gate"] == "pass",
                         "reason": evaluation["gate_reason"],
                         "min_accuracy": evaluation["min_accuracy"]},
        "compressed": compressed,
        "artifacts": {
            "trained_model": outputs["trained_model"].path,
            "compressed_model": (str(Path(compression["uri"]) / "model.onnx")
                                 if not compression.get("skipped") else None),
            "report": str(run_dir / "report.html"),
            "log": str(run_dir / "pipeline.log"),
        },
    }


def _write_run(runs: Path, run_dir: Path, summary: dict[str, Any], outputs: dict[str, Any]) -> None:
    from kubetrain.data.datasets import write_json

    write_report(run_dir / "report.html", summary, outputs)
    write_json(run_dir / "summary.json", summary)
    latest = runs / "latest"
    tmp = runs / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, latest)


def write_report(path: Path, summary: dict[str, Any], outputs: dict[str, Any]) -> None:
    """The run report: every stage's picture in one self-contained HTML file."""
    from kubetrain.stages import compression_sections, evaluation_sections

    ingest_meta = summary["dataset"]
    clean_meta = _meta(outputs["train_split"])
    aug_meta = _meta(outputs["augmented"])
    trials_doc = outputs["tuning"]
    model_info = json.loads((Path(outputs["trained_model"].path) / "info.json").read_text())
    evaluation = json.loads(Path(outputs["evaluation"].path).read_text())
    compression = outputs["compression"]
    classes = [str(c) for c in ingest_meta.get("classes", [])]

    def ordered(counts: dict) -> dict:  # KFP metadata maps come back unordered
        return {c: counts[c] for c in classes if c in counts} or counts

    sections = [
        Section("Run", facts={"run": summary["run_id"], "dataset": ingest_meta.get("source"),
                              "pipeline seconds": summary["pipeline_seconds"],
                              "test accuracy": summary["test_metrics"]["accuracy"]},
                tables=[summary["stages"]]),
        Section("Data: class balance", facts={
            "rows": ingest_meta.get("rows"), "features": ingest_meta.get("features"),
            "content sha256": str(ingest_meta.get("content_hash", ""))[:16]},
            images=[plots.class_balance(ordered(ingest_meta.get("class_counts", {})))]),
        Section("Cleaning", tables=[[{k: clean_meta.get(k) for k in (
            "rows_in", "duplicates_removed", "missing_values", "features_out", "scaling",
            "impute", "outliers") if k in clean_meta}]]),
        Section("Augmentation (training split)", images=[plots.class_balance_compare(
            ordered(aug_meta.get("class_counts_before", {})),
            ordered(aug_meta.get("class_counts_after", {})))]),
        Section("Tuning trials", facts={"algorithm": trials_doc["meta"]["algorithm"],
                                        "trials": trials_doc["meta"]["trials"]},
                images=[plots.tuning_trials(trials_doc["trials"], trials_doc["meta"]["objective"],
                                            trials_doc["meta"]["goal"])]
                if trials_doc["trials"] else [],
                tables=[[summary["best_hyperparameters"]]]),
        Section("Learning curves (final training)",
                images=[plots.learning_curves(model_info.get("history", []))]),
        *evaluation_sections(evaluation),
    ]
    if compression.get("skipped"):
        sections.append(Section("Compression", text=compression["reason"]))
    else:
        sections += compression_sections(compression, summary["config"]["accuracy_budget"])
    write_html(path, f"kubetrain run {summary['run_id']}", sections,
               subtitle="ingest -> clean -> augment -> tune -> train -> evaluate -> compress")


def summary_table(summary: dict[str, Any]) -> str:
    """The plain-text table `make run` ends with."""
    lines = ["", "stage      status      seconds", "---------  ----------  -------"]
    for s in summary["stages"]:
        lines.append(f"{s['name']:<9}  {s['status']:<10}  {s['seconds']:>7.1f}")
    m, c = summary["test_metrics"], summary["compressed"]
    lines += ["", f"pipeline wall time     {summary['pipeline_seconds']:.1f}s",
              "best hyperparameters   " + ", ".join(
                  f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in summary["best_hyperparameters"].items()),
              f"test metrics           accuracy {m['accuracy']:.4f} | macro_f1 "
              f"{m['macro_f1']:.4f} | roc_auc {m['roc_auc']:.4f}",
              f"quality gate           {summary['quality_gate']['reason']}"]
    if c.get("skipped"):
        lines.append(f"compressed model       skipped ({c['reason']})")
    else:
        lines.append(f"compressed model       {c['variant']} ONNX, {c['bytes'] / 1024:.1f} KiB "
                     f"({c['gzip_bytes'] / 1024:.1f} KiB gzip), accuracy {c['accuracy']:.4f}, "
                     f"{c['cpu_latency_ms']:.3f} ms/row on CPU")
    lines += [f"report                 {summary['artifacts']['report']}",
              f"summary                {Path(summary['artifacts']['report']).parent / 'summary.json'}"]
    return "\n".join(lines)
