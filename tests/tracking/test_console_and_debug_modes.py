"""The console of a smoke run (no third-party INFO lines, labelled progress bars) and the
debug modes: smoke refuses other data, fdr/limit/overfit work on any data, debug runs go
to outputs/debug/. ``python -m vmatdose.train data=openkbp debug=fdr`` itself (one batch,
the OpenKBP import bar) is the README's command, run in tests/test_readme.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vmatdose.config import CONFIG_DIR

from conftest import REPO_ROOT, run_main

LOG_LINE = re.compile(r"^\[[^\]]+\]\[(?P<logger>[\w.]+)\]\[(?P<level>[A-Z]+)\]")


def _train(tmp_path, *overrides, timeout=600):
    env = {**os.environ, "VMATDOSE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "vmatdose.train", *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.cli
def test_smoke_run_prints_no_third_party_info_line(tmp_path):
    done = _train(tmp_path, "debug=smoke", "evaluation=fast")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    lines = output.replace("\r", "\n").splitlines()
    info = [m["logger"] for m in map(LOG_LINE.match, lines) if m and m["level"] == "INFO"]
    assert info and all(name.startswith(("vmatdose", "__main__")) for name in info), info
    for noise in ("litlogger", "LeafSpec", "TPU available"):
        assert noise not in output, noise
    assert output.count("M parameters") == 1
    assert "generating phantom cases:" in done.stderr, "the data generation bar is labelled"
    runs = list((tmp_path / "outputs" / "debug" / "train" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "training_curves.png").is_file()
    assert not (tmp_path / "outputs" / "train").exists(), "debug runs stay in outputs/debug"


def test_smoke_refuses_another_data_set(tmp_path):
    done = run_main("vmatdose.train", "data=openkbp", "debug=smoke", cwd=tmp_path,
                    env={"VMATDOSE_ROOT": str(tmp_path)})
    assert done.returncode == 1
    assert "debug=smoke trains on its own tiny phantom cases and cannot be combined with " \
           "data=openkbp" in done.stdout
    assert not (tmp_path / "data").exists(), "refused before any data work"


@pytest.mark.parametrize("mode, expected", [
    ("limit", {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 2}),
    ("overfit", {"overfit_batches": 1}),
    ("fdr", {"fast_dev_run": 1})])
def test_debug_modes_keep_the_configured_data(mode, expected):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data=openkbp", f"debug={mode}"],
                      return_hydra_config=True)
    assert cfg.data._target_.endswith("OpenKBPDataModule")
    assert cfg.protocol.name == "head_neck"
    assert {k: cfg.trainer[k] for k in expected} == expected
    assert OmegaConf.to_container(cfg.hydra.run)["dir"].startswith("${paths.log_dir}/debug/")
