"""Data-parallel training (`kubetrain.training.distributed`, DDP in `kubetrain.training.loop.fit`,
`kubetrain.cli.train_entry`): real 2-process gloo runs on CPU under torchrun, on
breast_cancer splits made by the real ingest and clean stages.

Five torchrun launches (~10 s each on 2 cores): a probe script that runs `fit`
on every rank and reports what each rank holds, `train_distributed` (the
`--nproc 2` path of the train stage), two `train_entry` runs streaming a split
over the memory budget, and a failing run."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from kubetrain.config.settings import CleanConfig, DataConfig, RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import load_split
from kubetrain.stages import clean_stage, ingest_stage, train_stage
from kubetrain.training import distributed
from kubetrain.training.models import build, load_model, predict_proba, spec_for

SETTINGS = dict(
    dataset="breast_cancer", epochs=4, width=32, batch_size=32, learning_rate=1e-2, patience=100
)
CFG = RunConfig.from_flat(SETTINGS)
TOLERANCE = 0.03  # accuracy gap allowed between 2 processes and 1


# torchrun processes: the integration tier
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("splits")
    ingest_stage(str(root / "table"), str(root / "profile.md"), DataConfig(dataset="breast_cancer"))
    clean_stage(
        str(root / "table"),
        str(root / "train"),
        str(root / "val"),
        str(root / "test"),
        str(root / "quality.json"),
        CleanConfig(),
        CFG.seed,
    )
    return str(root / "train"), str(root / "val")


def _accuracy(model, X, y) -> float:
    return float((predict_proba(model, X).argmax(1).numpy() == y).mean())


# --- the rank's view, sharding, collectives outside a group ----------------------------


def test_world_reads_the_torchrun_environment():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert distributed.world(env) == (3, 1, 4)
    assert distributed.world({}) == (0, 0, 1)  # a plain `python -m ...` is one process
    with pytest.raises(KubetrainError, match="torchrun"):
        distributed.world({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(KubetrainError, match="not within WORLD_SIZE"):
        distributed.world({"RANK": "2", "WORLD_SIZE": "2"})


def test_init_outside_torchrun_is_a_single_process(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with distributed.init() as me:
        assert me == (0, 0, 1)
        assert not torch.distributed.is_initialized()
        assert not distributed.is_active()
        # collectives degrade to the identity
        assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
        assert distributed.any_rank(True) and not distributed.any_rank(False)
        obj = {"a": 1}
        assert distributed.broadcast_object(obj) is obj


@pytest.mark.parametrize("n", [12, 13, 3, 1])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_are_equal_sized_distinct_and_cover_the_data(n, world_size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [distributed.shard_order(order, r, world_size).tolist() for r in range(world_size)]
    sizes = {len(s) for s in shards}
    assert sizes == {-(-n // world_size)}  # equal: every rank runs the same number of batches
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))  # together they cover the data
    padding = len(flat) - n
    assert padding < world_size or n < world_size
    if n % world_size == 0:
        assert len(set(flat)) == len(flat)  # disjoint
    # deterministic
    assert shards == [
        distributed.shard_order(order, r, world_size).tolist() for r in range(world_size)
    ]


def test_failure_reason_names_the_root_cause_rank():
    lines = [
        "kubetrain | train | rank 0 failed: RuntimeError: Connection closed by peer",
        "kubetrain | train | rank 1 failed: KubetrainError: training diverged at epoch 2",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "Root Cause (first observed failure):",
        "[0]:",
        "  time      : 2026-01-01_00:00:00",
        "  host      : localhost",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 1 (pid: 7)",
    ]
    assert (
        distributed.failure_reason(lines) == "rank 1: KubetrainError: training diverged at epoch 2"
    )
    # without torchrun's summary the user-facing error wins over collateral ones
    assert distributed.failure_reason(lines[:2]).startswith("rank 1: KubetrainError")
    assert "MemoryError: x" in distributed.failure_reason(["noise", "MemoryError: x", ""])
    # an uncaught exception: torch prefixes the traceback with the rank
    crash = [
        "[rank0]: RuntimeError: Connection closed by peer",
        "[rank1]: Traceback:",
        "[rank1]: NameError: name 'fit' is not defined",
        *lines[3:],
    ]
    assert distributed.failure_reason(crash) == "rank 1: NameError: name 'fit' is not defined"


# --- a real 2-process run --------------------------------------------------------------

PROBE = textwrap.dedent('''
    """One rank: fit under DDP, then report what this rank holds."""
    import hashlib, json, os, sys

    import torch

    from kubetrain.training import distributed
    from kubetrain.config.settings import RunConfig
    from kubetrain.core.errors import KubetrainError
    from kubetrain.data.datasets import load_split
    from kubetrain.training.loop import fit

    train_path, val_path, out, settings = sys.argv[1:5]
    cfg = RunConfig.from_flat(json.loads(settings))


    class RunsACommand:
        def __reduce__(self):
            return os.system, ("touch " + os.path.join(out, "pwned"),)

    def digest(model):
        state = model.state_dict()
        blob = b"".join(state[k].numpy().tobytes() for k in sorted(state))
        return hashlib.sha256(blob).hexdigest()

    with distributed.init(backend="gloo") as me:
        X, y, schema = load_split(train_path)
        Xv, yv, _ = load_split(val_path)
        ckpt = os.path.join(out, f"ckpt-rank{me.rank}")  # own folder: shows who writes
        result = fit(cfg.train, cfg.hyper, cfg.seed, (X, y), (Xv, yv), schema,
                     epochs=cfg.final.epochs, checkpoint_dir=ckpt)
        # epoch 1's slice of this rank, drawn the way fit draws it
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(cfg.seed))
        shard = distributed.shard_order(perm, me.rank, me.world_size).tolist()
        again = fit(cfg.train, cfg.hyper, cfg.seed, (X, y), (Xv, yv), schema,
                    epochs=cfg.final.epochs, checkpoint_dir=ckpt)  # finished: resumes
        if me.rank == 0:
            torch.save(result.model.state_dict(), os.path.join(out, "rank0.pt"))
        crafted = os.path.join(out, "crafted")  # only rank 0 reads it
        if me.rank == 0:
            os.makedirs(crafted)
            torch.save({"model": RunsACommand()}, os.path.join(crafted, "last.pt"))
        try:
            fit(cfg.train, cfg.hyper, cfg.seed, (X, y), (Xv, yv), schema, epochs=1,
                checkpoint_dir=crafted)
            refused = None
        except KubetrainError as exc:
            refused = str(exc)
        with open(os.path.join(out, f"rank{me.rank}.json"), "w") as f:
            json.dump({"world": list(me), "digest": digest(result.model),
                       "resumed_digest": digest(again.model), "metrics": result.metrics,
                       "history": [{k: v for k, v in r.items() if k != "seconds"}
                                   for r in result.history],
                       "shard": shard, "refused": refused}, f)
''')


@pytest.fixture(scope="module")
def probe_run(splits, tmp_path_factory):
    """Run the probe on 2 ranks; returns (per-rank reports, output lines, output folder)."""
    root = tmp_path_factory.mktemp("probe")
    (root / "ddp_probe.py").write_text(PROBE)
    out = root / "out"
    out.mkdir()
    lines: list[str] = []
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    distributed.run_local_ddp(
        2, [*splits, str(out), json.dumps(SETTINGS)], module="ddp_probe", env=env, echo=lines.append
    )
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return reports, lines, out


def test_two_ranks_end_with_identical_weights(probe_run):
    reports, _, _ = probe_run
    assert [r["world"] for r in reports] == [[0, 0, 2], [1, 1, 2]]
    assert reports[0]["digest"] == reports[1]["digest"]
    # all-reduced numbers: the same history (hence the same early-stopping decisions)
    assert reports[0]["history"] == reports[1]["history"]
    assert {k: v for k, v in reports[0]["metrics"].items() if k != "seconds"} == {
        k: v for k, v in reports[1]["metrics"].items() if k != "seconds"
    }
    assert reports[0]["metrics"]["processes"] == 2
    assert len(reports[0]["history"]) == SETTINGS["epochs"]
    assert reports[0]["history"][-1]["train_loss"] < reports[0]["history"][0]["train_loss"]


def test_ranks_train_on_distinct_shards_that_cover_the_data(probe_run, splits):
    reports, _, _ = probe_run
    n = len(load_split(splits[0])[1])
    a, b = (r["shard"] for r in reports)
    assert len(a) == len(b) == -(-n // 2)
    assert set(a) | set(b) == set(range(n))
    assert len(set(a) & set(b)) == len(a) + len(b) - n  # only the padding repeats


def test_only_rank_zero_logs_and_writes_checkpoints(probe_run):
    reports, lines, out = probe_run
    epochs = [ln.split("|")[2].split()[1] for ln in lines if "kubetrain | train | epoch" in ln]
    assert epochs == [f"{e}/{SETTINGS['epochs']}" for e in range(1, SETTINGS["epochs"] + 1)]
    assert sum("resumed from checkpoint at epoch 4" in ln for ln in lines) == 1
    assert (out / "ckpt-rank0" / "last.pt").is_file()
    assert not (out / "ckpt-rank1").exists()
    # rank 1 has no checkpoint of its own, yet resumed from rank 0's (broadcast): same model
    assert reports[0]["resumed_digest"] == reports[1]["resumed_digest"] == reports[0]["digest"]


def test_a_crafted_checkpoint_fails_every_rank_alike_unexecuted(probe_run):
    """Rank 0 alone reads the checkpoint; its refusal reaches every rank (none hangs)."""
    reports, _, out = probe_run
    assert not (out / "pwned").exists()
    refused = [r["refused"] for r in reports]
    assert refused[0] and refused[0] == refused[1]
    assert str(out / "crafted" / "last.pt") in refused[0] and "delete it" in refused[0]


@pytest.fixture(scope="module")
def single(splits, tmp_path_factory) -> tuple[dict, Path]:
    """The 1-process train stage on the same splits and settings: (meta, output folder)."""
    one = tmp_path_factory.mktemp("one")
    meta = train_stage(
        *splits,
        str(one / "model"),
        str(one / "metrics.json"),
        str(one / "report.html"),
        CFG.train,
        CFG.hyper,
        CFG.final,
        CFG.seed,
    )
    return meta, one


def test_accuracy_matches_a_one_process_run(probe_run, splits, single):
    reports, _, out = probe_run
    _, _, schema = load_split(splits[0])
    Xv, yv, _ = load_split(splits[1])
    rows = len(load_split(splits[0])[1])  # model=auto picks by the training rows
    model = build(spec_for(schema, CFG.train.model, CFG.hyper.width, CFG.hyper.dropout, rows))
    model.load_state_dict(torch.load(out / "rank0.pt", weights_only=True))
    ddp_accuracy = _accuracy(model.eval(), Xv, yv)  # measured again from the outside
    assert ddp_accuracy == pytest.approx(reports[0]["metrics"]["val_accuracy"], abs=1e-6)
    assert ddp_accuracy > 0.9
    assert abs(ddp_accuracy - single[0]["val_accuracy"]) <= TOLERANCE
    assert reports[0]["metrics"]["val_loss"] == pytest.approx(single[0]["val_loss"], abs=0.05)


# --- the train stage over 2 local processes ---------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_train_distributed_writes_what_train_stage_writes(splits, single, tmp_path):
    meta1, one = single
    two = tmp_path / "two"
    lines: list[str] = []
    meta2 = distributed.train_distributed(
        *splits,
        {},
        str(two / "model"),
        str(two / "metrics.json"),
        str(two / "report.html"),
        SETTINGS,
        nproc=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        echo=lines.append,
    )
    assert (
        _files(two)
        == _files(one)
        == [
            "metrics.json",
            "model/challenger.joblib",  # the gradient-boosting challenger (tables)
            "model/info.json",
            "model/sha256.json",
            "model/spec.json",
            "model/weights.pt",
            "report.html",
        ]
    )
    assert (one / "model" / "spec.json").read_text() == (two / "model" / "spec.json").read_text()
    assert set(meta2) == set(meta1) | {"processes"} and meta2["processes"] == 2
    assert meta2["hyperparameters"] == meta1["hyperparameters"]
    metrics2 = json.loads((two / "metrics.json").read_text())
    assert set(metrics2) == set(json.loads((one / "metrics.json").read_text())) | {"processes"}
    assert "Training" in (two / "report.html").read_text()
    model, _, info = load_model(two / "model")
    X, y, _ = load_split(splits[1])
    assert _accuracy(model, X, y) == pytest.approx(meta2["val_accuracy"], abs=1e-6)
    assert abs(meta2["val_accuracy"] - meta1["val_accuracy"]) <= TOLERANCE
    assert info["metrics"]["processes"] == 2
    assert (tmp_path / "ckpt" / "last.pt").is_file()
    assert sum("data-parallel over 2 process(es)" in ln for ln in lines) == 1
    assert sum("kubetrain | train | epoch 1/" in ln for ln in lines) == 1  # rank 0 only


FAILING = textwrap.dedent("""
    import os, sys, time
    if os.environ["RANK"] == "1":
        print("kubetrain | train | rank 1 failed: KubetrainError: width must be a int", flush=True)
        sys.exit(1)
    time.sleep(30)  # rank 0 waits in a collective; torchrun stops it
""")


def test_a_failing_rank_fails_the_launch_with_its_own_error(tmp_path):
    (tmp_path / "failing_rank.py").write_text(FAILING)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    lines: list[str] = []
    with pytest.raises(KubetrainError) as info:
        distributed.run_local_ddp(2, [], module="failing_rank", env=env, echo=lines.append)
    assert str(info.value) == (
        "distributed training over 2 processes failed: rank 1: KubetrainError: width must be a int"
    )
    assert any("Root Cause" in line for line in lines)  # torchrun's summary was streamed


STREAMING_RANK = textwrap.dedent("""
    \"\"\"One rank of train_entry, recording what `stream.training_split` gave it.\"\"\"
    import json, os, sys

    from kubetrain.cli import train_entry
    from kubetrain.training import stream

    out, rank = os.environ["PROBE_OUT"], os.environ["RANK"]
    if rank in os.environ["PROBE_TINY_BUDGET_RANKS"].split(","):
        os.environ["KUBETRAIN_MEMORY_BUDGET"] = "1000"  # far below the split's bytes
    real = stream.training_split

    def observed(path, budget=None):  # the real function, its answer written down
        split, schema = real(path, budget)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"streamed": isinstance(split, stream.Streamed),
                       "budget": os.environ.get("KUBETRAIN_MEMORY_BUDGET")}, f)
        return split, schema

    stream.training_split = observed  # rank 0 reaches it through stages.train_here
    sys.exit(train_entry.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("tiny", ["0,1", "1"], ids=["every-rank-over-budget", "one-rank-over"])
def test_ranks_stream_a_training_split_over_the_memory_budget(splits, tmp_path, tiny):
    """train_entry under torchrun: a training split over the budget streams from its shards
    on every rank, also when only one rank's budget is too small (they agree; a rank
    streaming while another holds the split would break DDP's collectives). The
    breast_cancer split is one shard, fewer than the two ranks: both still get rows."""
    (tmp_path / "streaming_rank.py").write_text(STREAMING_RANK)
    probe, out = tmp_path / "probe", tmp_path / "out"
    probe.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        PROBE_OUT=str(probe),
        PROBE_TINY_BUDGET_RANKS=tiny,
    )
    env.pop("KUBETRAIN_MEMORY_BUDGET", None)
    lines: list[str] = []
    args = ["--train", splits[0], "--validation", splits[1], "--output", str(out)]
    args += ["--settings", json.dumps(SETTINGS), "--device", "cpu"]
    distributed.run_local_ddp(2, args, module="streaming_rank", env=env, echo=lines.append)
    seen = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["streamed"] for r in seen] == [True, True]
    rows = len(load_split(splits[0])[1])
    assert sum(f"{rows} rows (streamed from shards)" in ln for ln in lines) == 1  # rank 0 logs
    if tiny == "1":  # rank 0's own budget held the split; it lowered it to stream alike
        assert int(seen[0]["budget"]) < rows * len(load_split(splits[0])[2].feature_names) * 4
    meta = json.loads((out / distributed.OUTPUT_META).read_text())
    assert meta["processes"] == 2 and meta["epochs_run"] == SETTINGS["epochs"]
    assert meta["val_accuracy"] > 0.9
    model, _, _ = load_model(out / "model")
    X, y, _ = load_split(splits[1])
    assert _accuracy(model, X, y) == pytest.approx(meta["val_accuracy"], abs=1e-6)


def test_a_rank_reports_its_error_in_one_line(splits, tmp_path, capsys, monkeypatch):
    from kubetrain.cli import train_entry

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = train_entry.main(
        [
            "--train",
            str(tmp_path / "missing"),
            "--validation",
            splits[1],
            "--output",
            str(tmp_path / "out"),
            "--epochs",
            "2",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and distributed.FAILED.search(err[0])
    assert err[0].startswith("kubetrain | train | rank 0 failed: KubetrainError: ")
    assert "no arrays.npz" in err[0]
    assert not (tmp_path / "out").exists()
    assert (
        train_entry.main(
            ["--train", "x", "--validation", "y", "--output", "z", "--settings", "[1]"]
        )
        == 1
    )
    assert "--settings must be a JSON object" in capsys.readouterr().err


def test_train_entry_runs_as_one_process_without_torchrun(splits, tmp_path, monkeypatch):
    from kubetrain.cli import train_entry

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert (
        train_entry.main(
            [
                "--train",
                splits[0],
                "--validation",
                splits[1],
                "--output",
                str(out),
                "--settings",
                json.dumps(SETTINGS),
                "--epochs",
                "1",
                "--hyperparameters",
                json.dumps({"width": 8}),
            ]
        )
        == 0
    )
    assert _files(out) == [
        "meta.json",
        "metrics.json",
        "model/challenger.joblib",
        "model/info.json",
        "model/sha256.json",
        "model/spec.json",
        "model/weights.pt",
        "report.html",
    ]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["processes"] == 1 and meta["epochs_run"] == 1  # the flag beat --settings
    assert meta["hyperparameters"]["width"] == 8


def test_no_nested_launch_inside_a_worker(splits, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.should_launch(2) and not distributed.should_launch(1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun gives each rank
    assert not distributed.should_launch(2)
    with pytest.raises(KubetrainError, match="inside a torchrun worker"):
        distributed.train_distributed(
            *splits,
            {},
            str(tmp_path / "m"),
            str(tmp_path / "x"),
            str(tmp_path / "r"),
            SETTINGS,
            nproc=2,
        )


def test_bad_nproc_is_a_user_error(splits, tmp_path):
    with pytest.raises(KubetrainError, match="at least 1"):
        distributed.run_local_ddp(0, [])
    with pytest.raises(KubetrainError, match="at least 1"):
        distributed.train_distributed(
            *splits,
            {},
            str(tmp_path / "m"),
            str(tmp_path / "x"),
            str(tmp_path / "r"),
            SETTINGS,
            nproc=0,
        )
