"""Train a dose model, then evaluate its best checkpoint on the test split.

    python -m vmatdose.train                       # phantom data, small U-Net, L1
    python -m vmatdose.train debug=smoke model=... loss=...
    python -m vmatdose.train -m loss.terms.voxel.weight=0.5,1.0

Everything is built from ``conf/`` (see :mod:`vmatdose.workflow`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from vmatdose.config import CONFIG_DIR
from vmatdose.errors import exit_on_input_error
from vmatdose.inference.checkpoint import check_resume_checkpoint
from vmatdose.plot_style import use_file_backend
from vmatdose.records.job_failure import run_sweep_job
from vmatdose.tracking.console import setup_console
from vmatdose.workflow import run_training


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    setup_console()
    use_file_backend()
    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.paths.output_dir = hydra_cfg.runtime.output_dir

    def train() -> float | None:
        if cfg.get("ckpt_path"):  # refused before anything of the run is written
            check_resume_checkpoint(cfg.ckpt_path, cfg)
        return run_training(cfg, list(hydra_cfg.overrides.task), report=print)

    with exit_on_input_error():  # a multirun's failed job is recorded, the sweep goes on
        return run_sweep_job(train, cfg.paths.output_dir, hydra_cfg.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
