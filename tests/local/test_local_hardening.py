"""The local runner under stress: concurrent runs, full or read-only disks, damaged
cached artifacts, and the temporary folders kfp.local leaves behind.

Most tests swap the training pipeline for a stand-in (`fake_pipeline`) so the
runner's own machinery runs in well under a second; `test_no_cache_refreshes_*`
runs a two-task pipeline through the real kfp.local (about 10 s).

No ``from __future__ import annotations`` here: kfp reads the components'
annotations as types.
"""

import errno
import io
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetrain.cli.main import main
from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import MANIFEST, verify_checksums, write_checksums
from kubetrain.data.datasets import Schema, load_split, save_split_npz
from kubetrain.local import runner
from kubetrain.local.runner import ConsoleFilter, StageClock

SCHEMA = Schema(kind="table", feature_names=["a", "b"], class_names=["no", "yes"])


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_kfp_local():
    """run_local calls local.init; give later tests the kfp.local session they had."""
    from kfp.local import cache as kfp_cache
    from kfp.local import config as local_config

    previous = local_config.LocalExecutionConfig.instance
    get_local_cache = kfp_cache.get_local_cache
    yield
    local_config.LocalExecutionConfig.instance = previous
    kfp_cache.reset_local_cache_singleton()
    assert kfp_cache.get_local_cache is get_local_cache  # the --no-cache patch never leaks


class FakeTask:
    """What run_local reads of a pipeline task: its outputs."""

    def __init__(self, outputs: dict[str, Any]):
        self.outputs = outputs


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Install `body(**params)` as the training pipeline; summary and report become stubs."""

    def install(body: Callable[..., Any]) -> None:
        def pipeline(**params: Any) -> FakeTask:
            return FakeTask({"value": body(**params)})

        monkeypatch.setattr("kubetrain.pipelines.training.training_pipeline", pipeline)

    def summarize(cfg, run_id, run_dir, outputs, stages, seconds):
        return {
            "run_id": run_id,
            "value": outputs["value"],
            "artifacts": {
                "report": str(run_dir / "report.html"),
                "log": str(run_dir / "pipeline.log"),
            },
        }

    monkeypatch.setattr(runner, "summarize", summarize)
    monkeypatch.setattr(
        runner, "write_report", lambda path, summary, outputs: Path(path).write_text("report")
    )
    return install


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """`kubetrain run ...` in process: the exit code and stderr's lines."""
    code = main(["run", "--tune-trials", "0", *args])
    return code, capsys.readouterr().err.strip().splitlines()


# --- 1. run ids and run folders ------------------------------------------------------------


def test_same_config_same_second_gets_different_run_ids(monkeypatch):
    frozen = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(runner, "datetime", Clock)
    ids = {runner.new_run_id(RunConfig()) for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"20250102-030405-[0-9a-f]{6}-[0-9a-f]{6}", i) for i in ids)


def test_run_folder_is_created_exclusively_and_redrawn_on_collision(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "pipeline.log").write_text("another run's log")
    drawn = iter(["taken", "taken", "fresh"])
    monkeypatch.setattr(runner, "new_run_id", lambda cfg: next(drawn))
    run_id, run_dir = runner.create_run_dir(tmp_path, RunConfig())
    assert (run_id, run_dir) == ("fresh", tmp_path / "fresh") and run_dir.is_dir()
    assert (tmp_path / "taken" / "pipeline.log").read_text() == "another run's log"


def test_run_folders_made_at_once_from_threads_are_all_distinct(tmp_path):
    made: list[str] = []

    def make() -> None:
        for _ in range(40):
            made.append(runner.create_run_dir(tmp_path, RunConfig())[0])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == len(set(made)) == 160 == len(list(tmp_path.iterdir()))


def test_identical_runs_in_one_second_keep_their_own_files(tmp_path, monkeypatch, fake_pipeline):
    frozen = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(runner, "datetime", Clock)
    calls = iter(["first", "second"])

    def body(**params: Any) -> str:
        name = next(calls)
        print(f"log line of the {name} run")
        return name

    fake_pipeline(body)
    runs = tmp_path / "runs"
    cfg = RunConfig()
    first = runner.run_local(cfg, runs, console=io.StringIO())
    second = runner.run_local(cfg, runs, console=io.StringIO())
    assert first["run_id"] != second["run_id"]
    for summary in (first, second):
        run_dir = runs / summary["run_id"]
        assert json.loads((run_dir / "summary.json").read_text())["value"] == summary["value"]
        assert f"of the {summary['value']} run" in (run_dir / "pipeline.log").read_text()
        assert (run_dir / "report.html").is_file()
    assert os.readlink(runs / "latest") == second["run_id"]
    assert not [p for p in runs.iterdir() if p.name.startswith(".latest")]


# --- 2. unusable --runs-dir: one line, exit 2 ------------------------------------------------


def test_runs_dir_that_is_a_file(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    code, err = cli(capsys, "--runs-dir", str(runs))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and str(runs) in err[0] and "directory" in err[0]


def test_runs_dir_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = cli(capsys, "--runs-dir", str(blocker / "runs"))
    assert code == 2 and len(err) == 1, err
    assert f"{blocker} is a file" in err[0] and "--runs-dir" in err[0]


@pytest.mark.parametrize(
    "code_, words",
    [
        (errno.EROFS, "read-only file system"),
        (errno.ENOSPC, "no space left on device"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_runs_dir_that_cannot_be_created(tmp_path, capsys, monkeypatch, code_, words):
    runs = tmp_path / "runs"

    def mkdir(self, *args, **kwargs):
        raise OSError(code_, os.strerror(code_), str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = cli(capsys, "--runs-dir", str(runs))
    assert code == 2 and len(err) == 1, err
    assert words in err[0] and str(runs) in err[0] and "--runs-dir" in err[0]


def test_disk_full_while_logging_is_one_line(tmp_path, capsys, monkeypatch, fake_pipeline):
    """The old runner raised from the log's close while handling the task failure: two
    tracebacks. Now the failed write is remembered and reported once, with the fix."""
    real_open = open

    class FullDisk:
        def __init__(self, path):
            self.path, self.written = path, 0
            self.inner = real_open(path, "w")  # noqa: SIM115  (closed in close())

        def write(self, text):
            self.written += len(text)
            if self.written > 40:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
            return self.inner.write(text)

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

        def close(self):
            self.inner.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    monkeypatch.setattr(runner, "open", lambda path, mode="r": FullDisk(str(path)), raising=False)

    def body(**params: Any) -> None:
        for i in range(20):
            print(f"kfp says line {i}")
        raise RuntimeError(
            "Pipeline 'training' finished with status FAILURE. Inner task failed: 'train'."
        )

    fake_pipeline(body)
    code, err = cli(capsys, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and len(err) == 1, err
    assert "no space left on device" in err[0] and "pipeline.log" in err[0]
    assert "free some space" in err[0]


def test_disk_full_in_kfp_itself_is_one_line(tmp_path, capsys, fake_pipeline):
    def body(**params: Any) -> None:
        target = tmp_path / "runs" / ".kfp" / "x" / "executor_input.json"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    fake_pipeline(body)
    code, err = cli(capsys, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and len(err) == 1, err
    assert "executor_input.json" in err[0] and "no space left on device" in err[0]


def test_task_that_died_of_a_full_disk_gets_the_fix(tmp_path, fake_pipeline):
    def body(**params: Any) -> None:
        print(
            'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
            "OSError: [Errno 28] No space left on device: '/r/.kfp/t/model'"
        )
        raise RuntimeError("Inner task failed: 'train'.")

    fake_pipeline(body)
    with pytest.raises(KubetrainError) as caught:
        runner.run_local(RunConfig(), tmp_path / "runs", console=io.StringIO())
    assert str(caught.value).startswith("OSError: [Errno 28] No space left on device")
    assert "free some space or pass --runs-dir on another disk" in str(caught.value)


# --- 3. damaged artifacts ------------------------------------------------------------------


def split(tmp_path: Path, name: str = "split") -> Path:
    """A split in the previous format (arrays.npz), which load_split still reads and checks;
    the sharded format's own damage tests are in tests/data/test_shards.py."""
    path = tmp_path / name
    save_split_npz(
        path, np.arange(12, dtype=np.float32).reshape(6, 2), np.array([0, 1] * 3), SCHEMA
    )
    return path


def test_save_split_writes_checksums_last_and_load_split_checks_them(tmp_path):
    path = split(tmp_path)
    listed = json.loads((path / MANIFEST).read_text())["files"]
    assert set(listed) == {"arrays.npz", "meta.json"}
    assert listed["arrays.npz"]["size"] == (path / "arrays.npz").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no temporaries
    assert verify_checksums(path) is True
    X, y, schema = load_split(path)
    assert X.shape == (6, 2) and list(y) == [0, 1] * 3 and schema == SCHEMA


def test_truncated_cached_split_names_the_file_and_the_fix(tmp_path):
    path = split(tmp_path)
    data = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(KubetrainError) as caught:
        load_split(path)
    message = str(caught.value)
    assert str(path / "arrays.npz") in message and "truncated" in message
    assert "re-run with --no-cache" in message and "\n" not in message


def test_altered_file_of_the_same_size_is_caught(tmp_path):
    path = split(tmp_path)
    meta = path / "meta.json"
    meta.write_text(meta.read_text().replace("yes", "YES"))
    with pytest.raises(KubetrainError, match=r"meta\.json is damaged: its sha256"):
        load_split(path)


def test_missing_or_unreadable_manifest(tmp_path):
    path = split(tmp_path)
    (path / "arrays.npz").unlink()
    (path / "arrays.npz").mkdir()  # exists, but is no file
    with pytest.raises(KubetrainError, match="no arrays.npz"):
        load_split(path)
    other = split(tmp_path, "other")
    (other / MANIFEST).write_text("{not json")
    with pytest.raises(KubetrainError, match=f"{MANIFEST} is damaged.*--no-cache"):
        load_split(other)


def test_old_artifacts_without_checksums_are_accepted(tmp_path):
    path = split(tmp_path)
    (path / MANIFEST).unlink()
    assert verify_checksums(path) is False
    assert load_split(path)[0].shape == (6, 2)
    data = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(data[:100])  # damaged, and nothing to check against
    with pytest.raises(KubetrainError, match=r"cannot be read \(BadZipFile.*--no-cache"):
        load_split(path)


def test_write_checksums_covers_nested_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.txt").write_text("b")
    (tmp_path / "c.txt").write_text("c")
    write_checksums(tmp_path)
    assert set(json.loads((tmp_path / MANIFEST).read_text())["files"]) == {"a/b.txt", "c.txt"}
    (tmp_path / "a" / "b.txt").unlink()
    with pytest.raises(KubetrainError, match=r"b\.txt is missing"):
        verify_checksums(tmp_path)


def test_model_bundle_has_checksums_and_a_damaged_one_is_named(tmp_path):
    import torch

    from kubetrain.training.models import ModelSpec, build, load_model, save_model

    spec = ModelSpec(arch="mlp", num_features=2, num_classes=2, width=4, dropout=0.0)
    save_model(tmp_path / "model", build(spec), spec, {"note": "x"})
    assert set(json.loads((tmp_path / "model" / MANIFEST).read_text())["files"]) == {
        "weights.pt",
        "spec.json",
        "info.json",
    }
    model, loaded, info = load_model(tmp_path / "model")
    assert loaded == spec and info == {"note": "x"} and isinstance(model, torch.nn.Module)
    weights = tmp_path / "model" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(KubetrainError, match=r"weights\.pt is damaged.*re-run with --no-cache"):
        load_model(tmp_path / "model")


TASK_LOG = """\
12:00:00.000 - INFO - Executing task 'train'
    [KFP Executor 2025-01-02 12:00:01,000 INFO]: Looking for component `train`
kubetrain | train | 455 rows, 30 features
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/numpy/lib/npyio.py", line 440, in load
    return NpzFile(fid, own_fid=own_fid, allow_pickle=allow_pickle,
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/zipfile.py", line 1368, in _RealGetContents
    raise BadZipFile("File is not a zip file")
zipfile.BadZipFile: File is not a zip file

12:00:02.000 - ERROR - Task 'train' finished with status FAILURE
12:00:02.001 - ERROR - Pipeline 'training' finished with status FAILURE. Inner task failed: 'train'.
"""


def filtered(text: str) -> ConsoleFilter:
    out = ConsoleFilter(io.StringIO(), io.StringIO(), StageClock())
    out.write(text)
    return out


def test_console_surfaces_any_exception_class_from_a_traceback():
    out = filtered(TASK_LOG)
    assert out.cause == "zipfile.BadZipFile: File is not a zip file"


def test_console_takes_the_last_traceback_of_a_chain_and_prefers_kubetrain_errors():
    chained = (
        'Traceback (most recent call last):\n  File "a.py", line 1, in f\n'
        "KeyError: 'X'\n\nDuring handling of the above exception, another exception "
        'occurred:\n\nTraceback (most recent call last):\n  File "a.py", line 3, in f\n'
        "mylib.Broken: the real story\n"
    )
    assert filtered(chained).cause == "mylib.Broken: the real story"
    ours = chained + (
        'Traceback (most recent call last):\n  File "s.py", line 9, in g\n'
        "kubetrain.core.errors.KubetrainError: artifact file /x is damaged\n"
    )
    assert filtered(ours).cause == "artifact file /x is damaged"


def test_failed_run_reports_the_task_exception_not_inner_task_failed(tmp_path, fake_pipeline):
    def body(**params: Any) -> None:
        print(TASK_LOG, end="")
        raise RuntimeError(
            "Pipeline 'training' finished with status FAILURE. Inner task failed: 'train'."
        )

    fake_pipeline(body)
    with pytest.raises(KubetrainError) as caught:
        runner.run_local(RunConfig(), tmp_path / "runs", console=io.StringIO())
    assert str(caught.value).startswith("zipfile.BadZipFile: File is not a zip file (full log: ")


def test_kfp_local_still_has_the_cache_hook_no_cache_relies_on():
    """`kfp_caching` wraps kfp.local.cache.get_local_cache; a kfp that drops it would
    silently turn --no-cache back into "bypass" (stale entries kept)."""
    from kfp.local import cache as kfp_cache
    from kfp.local.orchestrator import task_executor

    assert callable(kfp_cache.get_local_cache)
    assert "cache_module.get_local_cache()" in Path(task_executor.__file__).read_text()
    with runner.kfp_caching(False) as enabled:
        assert enabled is True and kfp_cache.get_local_cache is not None


# a two-task pipeline of real kfp.local components: a split, then a reader of it
from kfp import dsl  # noqa: E402  (after the runner import, which unshadows docker/)


@dsl.component
def make_split(out: dsl.Output[dsl.Dataset]):
    import time

    import numpy as np

    from kubetrain.data.datasets import Schema, save_split

    save_split(
        out.path,
        np.zeros((4, 2), np.float32),
        np.array([0, 1, 0, 1]),
        Schema("table", ["a", "b"], ["no", "yes"], extra={"stamp": time.time_ns()}),
    )


@dsl.component
def read_split(data: dsl.Input[dsl.Dataset], salt: int) -> str:
    from kubetrain.data.datasets import load_split

    return str(load_split(data.path)[2].extra["stamp"])


@dsl.pipeline(name="hardening")
def two_tasks(salt: int) -> str:
    made = make_split()
    return read_split(data=made.outputs["out"], salt=salt).output


@pytest.mark.integration
def test_no_cache_refreshes_a_damaged_cache_entry(tmp_path, fake_pipeline):
    """Cached run; the cached split gets truncated; a cached run that reads it fails with
    the fix; the --no-cache run succeeds; the next cached run uses its fresh split."""
    salt = iter([1, 2, 3, 4])
    fake_pipeline(lambda **params: two_tasks(salt=next(salt)).outputs["Output"])
    runs = tmp_path / "runs"
    quiet = io.StringIO()

    first = runner.run_local(RunConfig(), runs, cache=True, console=quiet)["value"]
    (npz,) = (runs / ".kfp").rglob("part-00000.parquet")  # the split's (only) shard
    npz.write_bytes(npz.read_bytes()[:50])
    with pytest.raises(KubetrainError) as caught:  # make_split cached, read_split runs
        runner.run_local(RunConfig(), runs, cache=True, console=quiet)
    assert str(npz) in str(caught.value) and "re-run with --no-cache" in str(caught.value)
    fresh = runner.run_local(RunConfig(), runs, cache=False, console=quiet)["value"]
    assert int(fresh) > int(first)
    assert runner.run_local(RunConfig(), runs, cache=True, console=quiet)["value"] == fresh

    # 4. kfp.local's per-task program folders are gone, failed run's included
    logs = "".join(p.read_text() for p in runs.glob("*/pipeline.log"))
    programs = set(re.findall(r"(/\S+)/ephemeral_component\.py", logs))
    assert len(programs) >= 5 and not [p for p in programs if Path(p).exists()]


# --- 4. kfp.local's temporary folders --------------------------------------------------------

MKTEMP_LIKE_KFP = (
    'program_path=$(mktemp -d); printf x > "$program_path/ephemeral_component.py"; '
    'echo "$program_path"'
)


@pytest.mark.parametrize("fails", [False, True])
def test_task_program_folders_are_removed_after_the_run(tmp_path, fake_pipeline, fails):
    made: list[Path] = []

    def body(**params: Any) -> str:
        for _ in range(3):  # what kfp.local's lightweight component command does per task
            made.append(
                Path(
                    subprocess.run(
                        ["sh", "-ec", MKTEMP_LIKE_KFP], check=True, capture_output=True, text=True
                    ).stdout.strip()
                )
            )
        from kfp.local import config as local_config

        made.append(Path(local_config.LocalExecutionConfig.instance.workspace_root))
        assert all(p.is_dir() for p in made)
        if fails:
            raise RuntimeError("Inner task failed: 'train'.")
        return "ok"

    fake_pipeline(body)
    before = os.environ.get("TMPDIR")
    if fails:
        with pytest.raises(KubetrainError):
            runner.run_local(RunConfig(), tmp_path / "runs", console=io.StringIO())
    else:
        runner.run_local(RunConfig(), tmp_path / "runs", console=io.StringIO())
    assert len(made) == 4 and not [p for p in made if p.exists()]
    assert not made[0].parent.exists()  # the run's private TMPDIR
    assert os.environ.get("TMPDIR") == before


def test_permission_errors_elsewhere_are_not_blamed_on_the_runs_dir(tmp_path):
    runs = tmp_path / "runs"
    elsewhere = OSError(errno.EACCES, "Permission denied", str(tmp_path / "data.csv"))
    inside = OSError(errno.EACCES, "Permission denied", str(runs / ".kfp" / "x"))
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/kubetrain-tasks-x")
    assert runner.storage_error(elsewhere, runs) is None
    assert "--runs-dir pointing to a writable directory" in str(runner.storage_error(inside, runs))
    assert "free some space" in str(runner.storage_error(full, runs))
