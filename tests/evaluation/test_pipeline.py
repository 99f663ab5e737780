"""The evaluation run: a checkpoint evaluates the data it was trained on unless told
otherwise; cases that break the protocol are refused by name."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from vmatdose.config import CONFIG_DIR
from vmatdose.data.validation import CaseSetError
from vmatdose.evaluation.pipeline import data_source, evaluate_checkpoint, run_evaluation

from case_variants import first_case, without_structure, write
from conftest import last_line, run_main


def test_evaluate_with_only_a_checkpoint_reproduces_the_runs_own_test_mae(trained_run,
                                                                         tmp_path):
    _, run_dir, ckpt = trained_run
    # Run from another folder: the default phantom config would point somewhere else.
    result = run_main("vmatdose.evaluate", f"ckpt_path={ckpt}", "evaluation=fast",
                     "accelerator=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    own = json.loads((run_dir / "eval" / "summary.json").read_text())
    again = json.loads((tmp_path / "hydra" / "summary.json").read_text())
    assert again["n_cases"] == own["n_cases"] == 1
    assert again["metrics"]["mae_body_gy"]["mean"] == pytest.approx(
        own["metrics"]["mae_body_gy"]["mean"], rel=1e-6)
    assert not (tmp_path / "data").exists(), "no phantom was generated"


def test_data_overrides_switch_to_the_configured_cases():
    assert data_source(["ckpt_path=x.ckpt", "evaluation=fast"]) == "checkpoint"
    assert data_source(["ckpt_path=x.ckpt", "data.cases_dir=/d"]) == "config"
    assert data_source(["data=openkbp"]) == "config"
    assert data_source(["+data.max_cases=3", "dataset=1"]) == "config"
    assert data_source(["database=1"]) == "checkpoint"


def test_a_checkpoint_on_other_case_files_scores_them_all(trained_run, tmp_path,
                                                         monkeypatch):
    import torch

    root, _, ckpt = trained_run
    opened = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        opened.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    cases_dir = root / "data" / "phantom_smoke"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.root_dir={tmp_path}", f"ckpt_path={ckpt}",
                                         f"data.cases_dir={cases_dir}", "split=all",
                                         "evaluation=fast", "accelerator=cpu"])
    table, summary = run_evaluation(cfg, tmp_path / "eval", "config")
    assert summary["n_cases"] == len(table) == 4
    assert opened == [(str(ckpt), True)], "the checkpoint is read once, weights only"


def test_a_case_missing_a_required_target_stops_evaluation_by_name(trained_run, tmp_path):
    root, _, ckpt = trained_run
    case = without_structure(first_case(root / "data" / "phantom_smoke"), "PTV56")
    bad = write(case, tmp_path / "cases")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.root_dir={tmp_path}", f"ckpt_path={ckpt}",
                                         f"data.cases_dir={bad.parent}", "split=all",
                                         "evaluation=fast", "accelerator=cpu"])
    with pytest.raises(CaseSetError, match=f"{bad}: missing required target PTV56"):
        run_evaluation(cfg, tmp_path / "eval", "config")
    # A folder of predictions is checked against the protocol the same way.
    result = run_main("vmatdose.evaluate", f"predictions_dir={tmp_path}",
                     f"data.cases_dir={bad.parent}", "split=all", cwd=tmp_path)
    assert result.returncode == 1
    assert last_line(result.stdout) == (
        f"error: 1 case file not matching the protocol: {bad}: missing required target "
        "PTV56 (prostate_sib needs PTV70 and PTV56)")


def test_a_checkpoint_whose_cases_are_gone_names_the_missing_file(trained_run, tmp_path):
    _, _, ckpt = trained_run
    import torch

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["vmatdose"]["cases_dir"] = str(tmp_path / "moved")
    moved = tmp_path / "moved.ckpt"
    torch.save(raw, moved)
    test_id = raw["vmatdose"]["split"]["test"][0]
    with pytest.raises(CaseSetError, match=f"{tmp_path / 'moved' / test_id}.npz: no such case"):
        evaluate_checkpoint(moved, tmp_path / "eval", accelerator="cpu")


def test_the_debug_evaluation_scores_two_cases_without_gamma(trained_run, tmp_path):
    root, _, ckpt = trained_run
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"paths.root_dir={tmp_path}", f"ckpt_path={ckpt}", "split=all", "evaluation=debug",
            f"data.cases_dir={root / 'data' / 'phantom_smoke'}", "accelerator=cpu"])
        limit = compose("train", overrides=["data=openkbp", "debug=limit"])
    table, summary = run_evaluation(cfg, tmp_path / "eval", "config")
    assert summary["n_cases"] == len(table) == 2  # of the 4 phantom_smoke cases
    assert list(table.case_id) == ["phantom_000", "phantom_001"]
    assert table.mae_body_gy.notna().all()
    assert not [c for c in table.columns if c.startswith("gamma")]
    assert not list((tmp_path / "eval").rglob("*.png"))
    assert limit.evaluation.max_cases == 2 and list(limit.evaluation.gamma) == []


def test_evaluating_cases_the_checkpoint_was_trained_on_says_in_sample(trained_run, tmp_path,
                                                                       caplog):
    root, _, ckpt = trained_run
    import torch

    split = torch.load(ckpt, map_location="cpu", weights_only=True)["vmatdose"]["split"]
    # the split as `data.split.train_on=[train,test]` records it: the test cases trained on
    trained = {**split, "train": split["train"] + split["test"][:1]}
    (tmp_path / "split.json").write_text(json.dumps(trained))
    with caplog.at_level("WARNING"):
        table, _ = evaluate_checkpoint(ckpt, tmp_path / "eval", split_file=str(tmp_path / "split.json"),
                                       evaluation={"gamma": [], "figures": False}, accelerator="cpu")
    assert f"1 of the {len(table)} test cases were trained on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate_checkpoint(ckpt, tmp_path / "eval2", evaluation={"gamma": [], "figures": False},
                            accelerator="cpu")
    assert "trained on" not in caplog.text
