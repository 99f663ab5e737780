"""The OpenKBP sample imports, trains a few steps on patches, and evaluates (skips without
the sample)."""

from __future__ import annotations

import json

import pytest

from vmatdose.config import CONFIG_DIR
from vmatdose.training.fit import run_training as run

from conftest import OPENKBP_SAMPLE


@pytest.mark.skipif(not OPENKBP_SAMPLE.is_dir(),
                    reason=f"OpenKBP sample not found at {OPENKBP_SAMPLE}")
def test_openkbp_sample_trains_and_evaluates(tmp_path):
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=openkbp", f"paths.root_dir={tmp_path}", f"paths.output_dir={run_dir}",
            f"data.generator.source_dir={OPENKBP_SAMPLE}", "data.max_cases=6",
            "data.patch_size=[64,64,64]", "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2", "evaluation=fast", "model.val_gamma=null"])
    run(cfg)
    assert len(list((tmp_path / "data" / "openkbp").glob("openkbp_pt_*.npz"))) == 21
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 1
    assert summary["openkbp"]["dose_score_gy"] > 0
    assert summary["openkbp"]["dvh_score_gy"] > 0
    assert "gamma_3pct_3mm_pass" in summary["metrics"]
