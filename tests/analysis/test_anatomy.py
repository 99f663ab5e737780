"""Anatomy features in mm and cc, and their rank correlation with per-case errors."""

import json

import numpy as np
import pandas as pd
import pytest

from vmatdose.analysis.anatomy import anatomy_features
from vmatdose.analyze import main as analyze
from vmatdose.data.case import save_case

from conftest import make_box_case


def test_features_of_the_box_case_by_hand(box_case):
    # spacing (2, 2.5, 3) mm: a voxel is 15 mm^3; PTV56 spans 10 slices, the rectum bar
    # starts 2 voxels (5 mm) behind the targets and covers 14 slices x 2 x 2 voxels
    features = anatomy_features(box_case, ["PTV70", "PTV56"])
    assert features["ptv_z_extent_mm"] == pytest.approx(20.0)
    assert features["volume_PTV70_cc"] == pytest.approx(6 ** 3 * 0.015)
    assert features["volume_Rectum_cc"] == pytest.approx(14 * 2 * 2 * 0.015)
    assert features["min_distance_Rectum_mm"] == pytest.approx(5.0)
    assert features["overlap_Rectum_cc"] == 0.0

    inside = make_box_case()
    inside.masks[2, 8, 9:11, 11:13] = 1  # 4 rectum voxels inside the targets
    moved = anatomy_features(inside, ["PTV70", "PTV56"])
    assert moved["min_distance_Rectum_mm"] == 0.0
    assert moved["overlap_Rectum_cc"] == pytest.approx(4 * 0.015)


def test_analyze_anatomy_correlates_features_with_errors(tmp_path, capsys):
    cases_dir, run = tmp_path / "cases", tmp_path / "run"
    distances = []
    for k in range(5):  # the rectum moved back k voxels: 5, 7.5, ... mm from the targets
        case = make_box_case(shape=(16, 28, 24), case_id=f"box_{k}")
        case.masks[2] = np.roll(case.masks[2], k, axis=1) * case.body
        save_case(case, cases_dir / f"box_{k}.npz")
        distances.append(5.0 + 2.5 * k)
    (run / "eval").mkdir(parents=True)
    (run / "run_record.json").write_text(json.dumps({"config": {"data": {
        "cases_dir": str(cases_dir), "targets": ["PTV70", "PTV56"]}}}))
    errors = [3.0, 2.5, 2.6, 1.0, 0.5]  # falls with distance, one swap: rho = -0.9
    pd.DataFrame({"case_id": [f"box_{k}" for k in range(5)], "mae_body_gy": errors}
                 ).to_csv(run / "eval" / "per_case.csv", index=False)
    analyze(["anatomy", str(run / "eval")])
    assert "wrote" in capsys.readouterr().out
    table = pd.read_csv(run / "eval" / "anatomy" / "anatomy_correlations.csv")
    row = table[(table.feature == "min_distance_Rectum_mm") & (table.error == "mae_body_gy")]
    assert row["spearman_rho"].item() == pytest.approx(-0.9)
    features = pd.read_csv(run / "eval" / "anatomy" / "anatomy_features.csv")
    np.testing.assert_allclose(features["min_distance_Rectum_mm"], distances)
    assert (run / "eval" / "anatomy" / "anatomy_correlations.png").is_file()
