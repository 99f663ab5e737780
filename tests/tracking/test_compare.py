"""`compare` on three finished tiny runs (a learning-rate sweep) and on recorded runs of a
categorical sweep with a crashed run: differing values, labels, plots, output folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vmatdose.compare import main
from vmatdose.tracking.compare import (
    comparison_table,
    comparison_tables,
    default_output,
    differing_columns,
    find_runs,
    per_case_figure,
    sweep_figure,
)
from vmatdose.workflow import run_training as run

from conftest import smoke_config


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for i, lr in enumerate((0.02, 0.002, 0.0002)):
        run(smoke_config(root / "data", root / "multirun" / str(i), f"model.optimizer.lr={lr}",
                         "evaluation=fast", "trainer.max_epochs=2"))
    return root


def _recorded_run(folder, loss, per_case_mae=None):
    """A run folder as train leaves it; ``per_case_mae=None``: it crashed before eval."""
    folder.mkdir(parents=True)
    record = {"config": {"loss": {"name": loss}, "seed": 1}, "overrides": [f"loss={loss}"]}
    (folder / "run_record.json").write_text(json.dumps(record))
    if per_case_mae is not None:
        (folder / "eval").mkdir()
        pd.DataFrame({"case_id": [f"c{i}" for i in range(len(per_case_mae))],
                      "mae_body_gy": per_case_mae,
                      "gamma_3pct_3mm_pass": [90.0 + v for v in per_case_mae]}).to_csv(
            folder / "eval" / "per_case.csv", index=False)
        mean = sum(per_case_mae) / len(per_case_mae)
        summary = {"metrics": {"mae_body_gy": {"mean": mean},
                               "gamma_3pct_3mm_pass": {"mean": 90.0 + mean}}}
        (folder / "eval" / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def categorical_sweep(tmp_path):
    sweep = tmp_path / "multirun" / "train" / "2026-12-01_08-00-00"
    _recorded_run(sweep / "0", "l1", [1.0, 2.0, 3.0])
    _recorded_run(sweep / "1", "mse", [4.0, 5.0, 6.0])
    _recorded_run(sweep / "2", "grad")  # crashed
    return sweep


@pytest.mark.slow
@pytest.mark.slow
def test_table_shows_only_what_differs_sorted_by_the_metric(three_runs):
    runs = find_runs([str(three_runs / "multirun")])
    assert len(runs) == 3
    table = comparison_table(runs, "test/mae_body_gy")
    assert "model.optimizer.lr" in table.columns
    assert "seed" not in table.columns and "data.structures" not in table.columns
    assert sorted(table["model.optimizer.lr"]) == [0.0002, 0.002, 0.02]
    assert set(table["label"]) == {"model.optimizer.lr=0.020", "model.optimizer.lr=0.002",
                                   "model.optimizer.lr=0.0002"}
    mae = list(table["test/mae_body_gy"])
    assert mae == sorted(mae) and all(0 < v < 100 for v in mae)
    gamma = comparison_table(runs, "test/gamma_3pct_3mm_pass")["test/gamma_3pct_3mm_pass"]
    assert list(gamma) == sorted(gamma, reverse=True), "gamma: higher is better"


@pytest.mark.slow
def test_command_writes_into_the_compared_folder_and_the_index(three_runs, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = tmp_path / "experiments" / "runs_index.md"
    main([str(three_runs / "multirun"), "--index", str(index)])
    out = three_runs / "multirun" / "comparison"
    assert not (tmp_path / "comparison").exists(), "never the current directory"
    saved = pd.read_csv(out / "comparison.csv")
    assert len(saved) == 3
    markdown = (out / "comparison.md").read_text()
    assert markdown.count("\n") == 2 + 3 and "model.optimizer.lr" in markdown
    assert "MAE in body (Gy)" in markdown and "test/mae_body_gy" not in markdown
    assert (out / "comparison_sweep.png").is_file()
    assert (out / "comparison_per_case.png").is_file()
    text = index.read_text()
    assert text.startswith("# Runs on disk") and "make experiments" in text


def test_categorical_sweep_gives_grouped_boxes_and_lists_the_crashed_run(categorical_sweep):
    runs = find_runs([str(categorical_sweep)])
    table, failed = comparison_tables(runs, "test/gamma_3pct_3mm_pass")
    assert list(table["label"]) == ["loss=mse", "loss=l1"], "gamma: higher first"
    assert list(failed["label"]) == ["loss=grad"]
    sweep = sweep_figure(table, "test/gamma_3pct_3mm_pass")
    boxes = sweep.axes[0]
    assert [t.get_text() for t in boxes.get_xticklabels()] == ["mse", "l1"]
    medians = [line.get_ydata()[0] for line in boxes.lines if line.get_linestyle() == "-"
               and len(line.get_ydata()) == 2 and line.get_xdata()[0] != line.get_xdata()[1]]
    assert {95.0, 92.0} <= set(medians), "boxes of the per-case values of each option"
    per_case = per_case_figure(table, "test/gamma_3pct_3mm_pass").axes[0]
    assert per_case.get_xlabel() == "gamma 3%/3 mm pass rate (%)", "follows --metric"
    assert [t.get_text() for t in per_case.get_yticklabels()] == ["loss=l1", "loss=mse"]  # the first on top
    assert default_output([str(categorical_sweep)], runs) == categorical_sweep / "comparison"


def test_outputs_need_a_folder_other_than_the_current_one(categorical_sweep, tmp_path,
                                                         monkeypatch):
    _recorded_run(tmp_path / "outputs" / "train" / "runs" / "x", "l1", [1.0])
    monkeypatch.chdir(tmp_path)
    locations = [str(categorical_sweep / "0"), "outputs"]
    with pytest.raises(ValueError, match="give --output"):
        default_output(locations, find_runs(locations))


def test_excluded_runs_are_not_found(categorical_sweep):
    assert len(find_runs([str(categorical_sweep)], exclude=["*/1"])) == 2


@pytest.mark.slow
@pytest.mark.slow
def test_unknown_metric_and_missing_folder_are_clear(three_runs, tmp_path):
    runs = find_runs([str(three_runs / "multirun")])
    with pytest.raises(ValueError, match="metric 'test/nope' not in the runs"):
        comparison_table(runs, "test/nope")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        find_runs([str(tmp_path / "absent")])


def test_a_changed_group_choice_hides_the_values_it_implies():
    table = pd.DataFrame({
        "run": ["a", "b"], "choice.model": ["unet", "ddpm"], "choice.loss": ["l1", "l1"],
        "config.model.net.channels": ["[16]", "[32]"], "config.model.sampling_steps": [None, 10],
        "config.seed": [1, 1], "config.paths.output_dir": ["x", "y"],
        "overrides": ["model=unet", "model=ddpm model.sampling_steps=10"]})
    assert differing_columns(table) == ["choice.model", "config.model.sampling_steps"]
