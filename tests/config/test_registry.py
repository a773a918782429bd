"""The stage registry is the one list of stages, and each stage reads exactly its sections.

A stage's settings are the config sections its function takes. These tests
hold the KFP component, the per-stage CLI `--help`, the compiled pipeline and
the local runner's table to that, so no list of settings or stages can drift.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from kubetrain import registry
from kubetrain.cli import stage as stage_cli
from kubetrain.config.settings import SECTIONS, RunConfig, section_of_setting
from kubetrain.core.errors import KubetrainError

SETTINGS = set(section_of_setting())


def component_inputs(entry: registry.Stage) -> set[str]:
    spec = entry.component.component_spec
    return set(spec.inputs or {})


@pytest.mark.parametrize("entry", registry.STAGES, ids=lambda s: s.task)
def test_component_takes_exactly_its_sections_settings(entry: registry.Stage):
    expected = {f.name for f in entry.settings}
    assert component_inputs(entry) & SETTINGS == expected


@pytest.mark.parametrize("entry", registry.CLI_STAGES, ids=lambda s: s.stage)
def test_stage_help_lists_exactly_its_sections_settings(entry: registry.Stage):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        stage_cli.main([entry.stage, "--help"])
    shown = set(re.findall(r"--([a-z0-9-]+)", out.getvalue()))
    settings = {name.replace("_", "-") for name in SETTINGS}
    expected = {f.name.replace("_", "-") for f in entry.settings}
    # boolean settings also offer --no-<flag>
    shown_settings = {s.removeprefix("no-") for s in shown} & settings
    assert shown_settings == expected


def test_the_drifted_flags_of_old_are_right_now():
    def helped(stage: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            stage_cli.main([stage, "--help"])
        return out.getvalue()

    assert "--seed" in helped("clean") and "--seed" in helped("augment")
    tune = helped("tune")
    assert "--epochs" not in tune and "--nproc" not in tune
    assert "--tune-epochs" in tune and "--batch-size" in tune  # the baseline trial's values


def test_every_section_is_read_by_some_stage():
    used = {s for entry in registry.STAGES for s in entry.sections}
    assert used == set(SECTIONS) | {"seed"}


def test_registry_feeds_pipeline_runner_and_placement(tmp_path):
    from kubetrain.cluster.compile import GPU_STAGES, compile_pipeline
    from kubetrain.local import runner

    assert {"train"} == GPU_STAGES
    assert runner.STAGES == ("ingest", "clean", "augment", "tune", "train", "evaluate", "compress")
    assert set(runner.TASK_STAGE) == {s.task for s in registry.STAGES}
    import yaml

    doc = yaml.safe_load(compile_pipeline("local", tmp_path / "p.yaml").read_text())
    tasks = {c for c in doc["components"] if not c.startswith("comp-condition")}
    assert tasks == {f"comp-{s.task}" for s in registry.STAGES}


def test_cli_values_reach_the_stage_typed(tmp_path, capsys):
    """Flags are parsed once into sections; a bad value fails before the stage runs."""
    code = stage_cli.main(
        [
            "clean",
            "--table-path",
            str(tmp_path / "none"),
            "--train-path",
            "a",
            "--val-path",
            "b",
            "--test-path",
            "c",
            "--report-path",
            "d",
            "--test-fraction",
            "0.9",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: test_fraction=0.9 is out of range") and "\n" not in err


def test_run_config_round_trips_through_flat_names():
    cfg = RunConfig.from_flat(
        {"epochs": "7", "learning_rate": 0.5, "seed": 3, "oversample": "true"}
    )
    assert cfg.final.epochs == 7 and cfg.hyper.learning_rate == 0.5 and cfg.seed == 3
    assert cfg.augment.oversample is True
    assert RunConfig.from_flat(cfg.flat()) == cfg


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"epoch": 3}, "unknown setting(s) epoch"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"seed": 2**40}, "out of range"),
        ({"tune_parallel": 4, "tune_trials": 2}, "exceeds tune_trials"),
        ({"batch_size": 1.5}, "batch_size must be a whole number"),
    ],
)
def test_bad_settings_fail_with_one_line(values, needle):
    from kubetrain.core.errors import KubetrainError

    with pytest.raises(KubetrainError, match=re.escape(needle)):
        RunConfig.from_flat(values)


def test_tuned_values_apply_with_one_replace():
    hyper = RunConfig().hyper.replace({"width": 64.0, "learning_rate": 0.01})
    assert hyper.width == 64 and isinstance(hyper.width, int) and hyper.learning_rate == 0.01


def test_label_column_of_a_built_in_dataset_is_refused_up_front():
    from kubetrain.core.errors import KubetrainError

    with pytest.raises(KubetrainError, match="does not apply to the built-in dataset 'wine'"):
        RunConfig.from_flat({"dataset": "wine", "label_column": "quality"})
    assert RunConfig.from_flat({"dataset": "x.csv", "label_column": "y"}).data.label_column


def test_epochs_left_at_auto_depend_on_the_data_and_a_given_count_is_kept():
    auto = RunConfig.from_flat({}).final
    assert auto.epochs == 0 and auto.epochs_for("table") < auto.epochs_for("image")
    given = RunConfig.from_flat({"epochs": "7"}).final
    assert given.epochs_for("table") == given.epochs_for("image") == 7


def test_learning_rate_and_batch_left_at_auto_depend_on_the_data_and_given_ones_are_kept():
    auto = RunConfig.from_flat({}).hyper
    assert (auto.learning_rate, auto.batch_size) == (0, 0)
    table, image = auto.for_kind("table"), auto.for_kind("image")
    assert table.batch_size > image.batch_size and table.learning_rate < image.learning_rate
    assert image.for_kind("table") == image  # resolving twice changes nothing
    assert table.dropout == image.dropout == auto.dropout  # only the two auto values move
    given = RunConfig.from_flat({"learning_rate": "0.01", "batch_size": "16"}).hyper
    assert given.for_kind("image") == given.for_kind("table") == given
    with pytest.raises(KubetrainError, match="learning_rate=-0.1 is out of range"):
        RunConfig.from_flat({"learning_rate": "-0.1"})
