"""DDP for real: two CPU processes (gloo) on tiny volumes, rank zero writes the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest


@pytest.mark.cli
def test_two_process_ddp_run_on_cpu(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "vmatdose.train", "debug=smoke", "trainer=ddp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
               "evaluation=fast", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output, "two ranks joined"
    assert (run_dir / "train_ddp_process_1.log").is_file(), "rank 1 ran as its own process"
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["config"]["trainer"]["devices"] == 2
    history = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert history["val/mae_gy"].dropna().size == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "eval" / "summary.json").is_file()
    assert output.count("test MAE") == 1, "only rank zero evaluates"
