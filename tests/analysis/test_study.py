"""Study statistics against scipy and by hand, on hand-made per-case values."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vmatdose.analysis.study import (
    holm_bonferroni,
    paired_tests,
    write_study_statistics,
)

CASES = [f"phantom_{i:03d}" for i in range(8)]
BASE = np.array([70.0, 72.0, 75.0, 68.0, 80.0, 77.0, 71.0, 74.0])


def make_run(root, name, overrides, seed, values, cases=CASES):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "run_record.json").write_text(json.dumps({"overrides": overrides, "seed": seed}))
    pd.DataFrame({"case_id": cases, "gamma_3pct_3mm_ptv_region_pass": values,
                  "mae_body_gy": np.asarray(values) / 10}).to_csv(run / "eval" / "per_case.csv",
                                                                  index=False)
    return run


@pytest.fixture
def study(tmp_path):
    """baseline, better (+3 on average, noisy) and same (baseline + tiny noise); 2 seeds."""
    rng = np.random.default_rng(1)
    runs, truth = [], {}
    for recipe, shift in (("baseline", 0.0), ("better", 3.0), ("same", 0.0)):
        per_seed = []
        for seed in (42, 123):
            values = BASE + shift + rng.normal(0, 1.0, len(BASE))
            per_seed.append(values)
            runs.append(make_run(tmp_path, f"{recipe}_{seed}",
                                 [f"seed={seed}", f"experiment={recipe}", "debug=short"],
                                 seed, values))
        truth[recipe] = np.stack(per_seed, axis=1)
    return runs, truth


def test_statistics_match_scipy_on_hand_made_values(study, tmp_path):
    runs, truth = study
    paths = write_study_statistics(runs, baseline="experiment=baseline",
                                   metrics=["gamma_3pct_3mm_ptv_region_pass"],
                                   output_dir=tmp_path / "out")
    table = pd.read_csv(paths[0]).set_index("recipe")
    base = truth["baseline"].mean(axis=1)
    raw = {}
    for recipe in ("better", "same"):
        values = truth[recipe].mean(axis=1)
        row = table.loc[f"experiment={recipe}"]
        assert row["mean"] == pytest.approx(values.mean())
        seed_means = truth[recipe].mean(axis=0)
        assert row["seed_mean"] == pytest.approx(seed_means.mean())
        assert row["seed_std"] == pytest.approx(np.std(seed_means, ddof=1))
        ci = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile",
                             random_state=np.random.default_rng(0)).confidence_interval
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))
        assert row["ci_low"] < row["mean"] < row["ci_high"]
        diff = values - base
        raw[recipe] = stats.wilcoxon(values, base).pvalue
        assert row["p_wilcoxon"] == pytest.approx(raw[recipe])
        assert row["cohens_d"] == pytest.approx(diff.mean() / diff.std(ddof=1))
        assert row["diff_vs_baseline"] == pytest.approx(diff.mean())
    small, large = sorted(raw, key=raw.get)
    assert table.loc[f"experiment={small}", "p_holm"] == pytest.approx(min(1, 2 * raw[small]))
    assert table.loc[f"experiment={large}", "p_holm"] == pytest.approx(
        max(min(1, 2 * raw[small]), raw[large]))
    assert table.loc["experiment=better", "p_holm"] < 0.05  # 8 cases, all improved
    assert bool(table.loc["experiment=baseline", "baseline"])
    per_case = pd.read_csv(paths[1])
    np.testing.assert_allclose(per_case["gamma_3pct_3mm_ptv_region_pass [experiment=better]"],
                               truth["better"].mean(axis=1))
    markdown = paths[3].read_text()
    assert "same 8 cases (shared split)" in markdown and "p (Holm)" in markdown
    assert all(p.is_file() for p in paths)


def test_holm_by_hand():
    adjusted = holm_bonferroni([0.01, 0.04, 0.03, float("nan")])
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adjusted[3])
    assert holm_bonferroni([0.6, 0.9]).tolist() == [1.0, 1.0]


def test_identical_values_give_p_one_and_d_zero():
    out = paired_tests(BASE.copy(), BASE.copy())
    assert out == {"diff_vs_baseline": 0.0, "p_wilcoxon": 1.0, "cohens_d": 0.0}


def test_a_study_with_different_test_cases_is_refused(tmp_path):
    runs = [make_run(tmp_path, "a", ["seed=1", "experiment=baseline"], 1, BASE),
            make_run(tmp_path, "b", ["seed=1", "experiment=x"], 1, BASE,
                     cases=CASES[:-1] + ["phantom_999"])]
    with pytest.raises(ValueError, match="must share the split"):
        write_study_statistics(runs, output_dir=tmp_path / "out")


def test_a_baseline_that_names_no_recipe_is_refused(study, tmp_path):
    runs, _ = study
    with pytest.raises(ValueError, match="matches 0"):
        write_study_statistics(runs, baseline="experiment=nothing", output_dir=tmp_path / "o")


def test_default_metrics_name_the_protocols_first_target(tmp_path):
    """The D95 errors are the runs' protocol's first target's, not a fixed name."""
    from vmatdose.analysis.study import available_metrics, load_study_run

    runs = []
    for seed in (1, 2):
        run = make_run(tmp_path, f"r{seed}", ["experiment=baseline"], seed, BASE)
        record = {"overrides": ["experiment=baseline"], "seed": seed,
                  "config": {"protocol": {"targets": ["PTV60", "PTV54"]}}}
        (run / "run_record.json").write_text(json.dumps(record))
        table = pd.read_csv(run / "eval" / "per_case.csv")
        table["d95_PTV60_error_gy"] = 0.5
        table["d95_PTV70_error_gy"] = 0.5
        table.to_csv(run / "eval" / "per_case.csv", index=False)
        runs.append(load_study_run(run))
    assert available_metrics(runs, None) == ["mae_body_gy", "gamma_3pct_3mm_ptv_region_pass",
                                             "d95_PTV60_error_gy"]


def test_unevaluated_runs_are_left_out_and_run_level_scores_and_steps_reported(
        study, tmp_path, caplog):
    runs, _ = study
    for run, (dose, dvh, steps) in zip(runs[:2], [(3.0, 2.0, 300), (4.0, 3.0, 340)]):
        (run / "eval" / "summary.json").write_text(json.dumps(
            {"openkbp": {"dose_score_gy": dose, "dvh_score_gy": dvh}}))
        (run / "throughput.json").write_text(json.dumps({"steps": steps, "steps_per_s": 0.5}))
    (runs[2] / "train.log").write_text(  # a run from before throughput.json
        "[2026-12-04 02:53:05,263][vmatdose.training.throughput][INFO] - trained 280 steps in "
        "4 epochs, 8.6 min: 0.54 steps/s\n")
    stopped = tmp_path / "stopped"  # a run that failed mid-sweep: record, no evaluation
    stopped.mkdir()
    (stopped / "run_record.json").write_text(json.dumps({"overrides": ["seed=9"], "seed": 9}))
    paths = write_study_statistics([*runs, stopped], "experiment=baseline",
                                   output_dir=tmp_path / "out")
    assert f"left out of the study: {stopped}" in caplog.text
    levels = pd.read_csv(tmp_path / "out" / "study_runs.csv").set_index("recipe")
    base = levels.loc["experiment=baseline"]
    assert base.n_seeds == 2 and base.openkbp_dose_score_gy_mean == 3.5
    assert base.openkbp_dvh_score_gy_std == pytest.approx(np.std([2.0, 3.0], ddof=1))
    assert (base.steps_mean, base.steps_min, base.steps_max) == (320, 300, 340)
    assert np.isnan(levels.loc["experiment=same"].steps_mean)  # neither file
    assert levels.loc["experiment=better"].steps_mean == 280  # from train.log
    markdown = (tmp_path / "out" / "study_stats.md").read_text()
    assert "| experiment=baseline | 2 | 3.5 +- 0.707 | 2.5 +- 0.707 | 320 (300-340) | 0.5 |" \
        in markdown
    assert tmp_path / "out" / "study_stats.png" in paths


def test_a_study_of_fewer_than_two_evaluated_runs_is_one_error(study, tmp_path):
    from vmatdose.errors import InputError

    runs, _ = study
    with pytest.raises(InputError, match="at least two evaluated runs; found 1 among 1"):
        write_study_statistics(runs[:1], "experiment=baseline", output_dir=tmp_path / "out")
