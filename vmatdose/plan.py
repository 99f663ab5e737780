"""Make a deliverable plan per case from its predicted dose (dose mimicking).

    python -m vmatdose.plan predictions_dir=<dir> cases_dir=<dir> output_dir=<dir> protocol=head_neck
    python -m vmatdose.plan ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir>

Needs the planning engine, an optional extra: ``pip install -e ".[plan]"`` (pyRadPlan).
Writes the deliverable dose (``<case_id>.npz``, ``<case_id>_rtdose.dcm``), per-beam
fluence maps and a reference / prediction / deliverable evaluation per case (see
:mod:`vmatdose.planning.run`).
"""

from __future__ import annotations

import functools

import hydra
from omegaconf import DictConfig, OmegaConf

from vmatdose.config import CONFIG_DIR
from vmatdose.errors import exit_on_input_error
from vmatdose.planning.run import run_planning
from vmatdose.plot_style import use_file_backend
from vmatdose.tracking.console import setup_console


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    setup_console()
    use_file_backend()
    with exit_on_input_error():
        run_planning(OmegaConf.to_container(cfg, resolve=True),
                     report=functools.partial(print, flush=True))


if __name__ == "__main__":
    main()
