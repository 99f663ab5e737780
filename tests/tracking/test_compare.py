"""`compare` on three finished tiny runs: table of differing config values and metrics."""

from __future__ import annotations

import pandas as pd
import pytest

from vmatdose.compare import comparison_table, differing_columns, find_runs, main
from vmatdose.training.fit import run_training as run

from conftest import smoke_config


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for i, lr in enumerate((0.02, 0.002, 0.0002)):
        run(smoke_config(root / "data", root / "multirun" / str(i), f"model.optimizer.lr={lr}",
                         "evaluation=fast", "trainer.max_epochs=2"))
    return root


def test_table_shows_only_what_differs_sorted_by_the_metric(three_runs):
    runs = find_runs([str(three_runs / "multirun")])
    assert len(runs) == 3
    table = comparison_table(runs, "test/mae_body_gy")
    assert "model.optimizer.lr" in table.columns
    assert "seed" not in table.columns and "data.structures" not in table.columns
    assert sorted(table["model.optimizer.lr"]) == [0.0002, 0.002, 0.02]
    mae = list(table["test/mae_body_gy"])
    assert mae == sorted(mae) and all(0 < v < 100 for v in mae)
    gamma = comparison_table(runs, "test/gamma_3pct_3mm_pass")["test/gamma_3pct_3mm_pass"]
    assert list(gamma) == sorted(gamma, reverse=True), "gamma: higher is better"


def test_command_writes_csv_markdown_plots_and_the_index(three_runs, tmp_path):
    out = tmp_path / "experiments"
    main([str(three_runs / "multirun" / "*"), "--output", str(out),
          "--readme", str(out / "README.md")])
    saved = pd.read_csv(out / "comparison.csv")
    assert len(saved) == 3
    markdown = (out / "comparison.md").read_text()
    assert markdown.count("\n") == 2 + 3 and "model.optimizer.lr" in markdown
    assert (out / "comparison_sweep.png").is_file()
    assert (out / "comparison_per_case.png").is_file()
    index = (out / "README.md").read_text()
    assert index.startswith("# Experiments") and "make experiments" in index


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
