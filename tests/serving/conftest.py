"""Real bundles for the serving tests, trained through the pipeline's stage functions.

Each bundle comes with the pipeline's own view of its test split: the raw rows that
landed there (found by clean's own encoding, see `raw_test_rows`) and the evaluate
stage's class probabilities for them, which the server must reproduce from raw rows.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain import stages
from kubetrain.config.settings import (
    CleanConfig,
    CompressConfig,
    DataConfig,
    FinalConfig,
    GateConfig,
    HyperConfig,
    PublishConfig,
    TrainConfig,
)
from kubetrain.data import batches
from kubetrain.data import raw_schema as input_schema
from kubetrain.data.datasets import LABEL, load_split, load_table
from kubetrain.training.models import load_model

PLANS = ["basic", "plus", "pro"]
GOOD = ["great", "fast", "helpful", "reliable", "friendly"]
BAD = ["slow", "broken", "rude", "late", "confusing"]
FILLER = ["the", "service", "was", "very", "support", "app", "today", "really"]


@dataclass(frozen=True)
class Trained:
    """A published bundle and what the pipeline predicted on its test split."""

    bundle: Path
    test_rows: list[dict]  # raw rows of the test split (table: by column; image: 8x8 lists)
    probabilities: np.ndarray  # the evaluate stage's scores of those rows (a regression's
    # predicted values, as one column)
    labels: list  # their true classes (a regression's true values)
    features: np.ndarray  # the test split's features (clean's encoding), in split order
    evaluation: dict


def churn_csv(path: Path, rows: int = 700, seed: int = 0, regression: bool = False) -> Path:
    """A table with a numeric, a categorical, a text, a date and an ID column whose
    label depends on the first four (so a small network learns it well); with
    ``regression`` the label is ``spend``, a number that depends on them too."""
    rng = np.random.default_rng(seed)
    amount = rng.gamma(2.0, 30.0, rows).round(2)
    plan = rng.choice(PLANS, rows)
    days = rng.integers(0, 3 * 365, rows)
    signup = (pd.Timestamp("2021-01-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d")
    mood = rng.random(rows)
    words = []
    for m in mood:
        pool = GOOD if m > 0.5 else BAD
        picked = [*rng.choice(FILLER, 3), rng.choice(pool), rng.choice(FILLER)]
        words.append(" ".join(picked))
    score = (amount > 60) + (plan == "basic") + (mood < 0.5) * 1.5 + (days < 365) * 0.8
    frame = pd.DataFrame(
        {
            "customer_id": [f"c{i:05d}" for i in range(rows)],
            "amount": amount,
            "plan": plan,
            "review": words,
            "signup": signup,
            "churned": np.where(score >= 2.0, "yes", "no"),
        }
    )
    frame.loc[rng.choice(rows, 15, replace=False), "amount"] = np.nan  # imputed
    if regression:
        spend = 2 * amount + 40 * (plan == "pro") + 30 * mood + rng.normal(0, 3, rows)
        frame = frame.drop(columns=["churned"]).assign(spend=spend.round(2))
    frame.to_csv(path, index=False)
    return path


def train_bundle(d: Path, data: DataConfig, name: str, epochs: int, width: int) -> Trained:
    """ingest -> clean -> train -> evaluate -> compress -> publish, with the stage
    functions the pipeline's components call."""
    table = str(d / "table")
    stages.ingest_stage(table, str(d / "profile.md"), data)
    split = [str(d / s) for s in ("train", "val", "test")]
    stages.clean_stage(table, *split, str(d / "clean.md"), CleanConfig(), seed=5)
    stages.train_stage(
        split[0],
        split[1],
        str(d / "model"),
        str(d / "metrics.json"),
        str(d / "train.html"),
        TrainConfig(),
        HyperConfig(width=width, learning_rate=0.005),
        FinalConfig(epochs=epochs, challenger=False),
        seed=5,
    )
    evaluation = stages.evaluate_stage(
        str(d / "model"), split[2], str(d / "eval.json"), str(d / "eval.html"), GateConfig(0.5)
    )
    stages.compress_stage(
        str(d / "model"), split[2], str(d / "small"), str(d / "small.html"), CompressConfig()
    )
    uri = stages.publish_stage(
        str(d / "model"),
        str(d / "small"),
        str(d / "eval.json"),
        table,
        PublishConfig(publish_uri=str(d / "published"), model_name=name),
        run_id="serving-test",
    )
    rows, labels, proba, X = raw_test_rows(Path(uri), table, split[2], str(d / "model"))
    return Trained(Path(uri), rows, proba, labels, X, evaluation)


def raw_test_rows(
    bundle: Path, table: str, test: str, model_path: str
) -> tuple[list[dict], list[str], np.ndarray, np.ndarray]:
    """The raw table rows of the test split, their classes, and evaluate's probabilities.

    Clean keeps no pointer from a split row back to its raw row, so each test row is
    matched to the raw row whose encoding (clean's own `Preprocessor.transform`, with
    the fitted params the bundle carries) is exactly the split's features; evaluate's
    scorer (`predict_split`) gives the probabilities."""
    from kubetrain.assessment.evaluation import predict_split
    from kubetrain.serving.predictor import preprocessor

    schema, params = input_schema.read(bundle)
    frame, _ = load_table(table)
    encoded = preprocessor(params, schema).transform(frame.drop(columns=[LABEL]))
    index = {row.tobytes(): i for i, row in enumerate(encoded)}
    model, spec, _ = load_model(model_path)
    X, y, split_schema = load_split(test)
    y, proba = predict_split(model, batches.of(X, y, split_schema), spec.num_classes)
    found = [index.get(np.ascontiguousarray(x, np.float32).tobytes()) for x in X]
    assert None not in found, "a test row matches no raw row: clean's encoding changed?"
    names = [c.name for c in schema.columns]
    raw = frame.iloc[found]
    if schema.kind == "image":
        shape = schema.image_shape[1:] if schema.image_shape[0] == 1 else schema.image_shape
        rows = [np.asarray(r, np.float64).reshape(shape).tolist() for r in raw[names].to_numpy()]
    else:
        rows = [_json_row(r) for r in raw[names].to_dict("records")]
    truth = y.tolist() if schema.regression else [spec.class_names[i] for i in y]
    return rows, truth, proba, X


def _json_row(row: dict) -> dict:
    """A raw row as a client sends it: JSON values, null for missing, dates as ISO text."""
    out = {}
    for k, v in row.items():
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT:
            out[k] = None
        elif isinstance(v, pd.Timestamp):
            out[k] = v.isoformat()
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


@pytest.fixture(scope="session")
def table_bundle(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    d = tmp_path_factory.mktemp("table-bundle")
    data = DataConfig(dataset=str(churn_csv(d / "churn.csv")), label_column="churned")
    return _one_thread(lambda: train_bundle(d, data, "churn", epochs=12, width=32))


@pytest.fixture(scope="session")
def regression_bundle(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The table above with a number to predict (``spend``) instead of classes."""
    d = tmp_path_factory.mktemp("regression-bundle")
    csv = churn_csv(d / "spend.csv", regression=True)
    data = DataConfig(dataset=str(csv), label_column="spend", task="regression")
    return _one_thread(lambda: train_bundle(d, data, "spend", epochs=12, width=32))


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    d = tmp_path_factory.mktemp("digits-bundle")
    data = DataConfig(dataset="digits")
    return _one_thread(lambda: train_bundle(d, data, "digits", epochs=3, width=32))


def _one_thread(build):
    """Small models train faster on one thread, and the test workers share 2 cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def served(bundle: str | Path, *flags: str, env: dict | None = None) -> Iterator[str]:
    """`kubetrain serve` as a real process on a free local port; yields its base URL
    once ``/v2/health/ready`` answers, and stops the process (by its pid) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrain.cli.main", "serve", "--bundle", str(bundle)]
        + ["--host", "127.0.0.1", "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"kubetrain serve exited {proc.returncode}: {log.read().decode()}")
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("kubetrain serve did not become ready in 90 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
