"""Predict doses for case files with a trained checkpoint.

    python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir> export_rtdose=true

Writes ``<case_id>.npz`` (``dose`` in Gy, plus ``dose_std`` for generative models, and
the case's geometry) per case and, with ``export_rtdose=true``, ``<case_id>_rtdose.dcm``
(see :mod:`vmatdose.inference.run`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vmatdose.cli_hints import with_quoting_hint
from vmatdose.config import CONFIG_DIR
from vmatdose.errors import exit_on_input_error
from vmatdose.inference.run import run_prediction
from vmatdose.tracking.console import setup_console


@with_quoting_hint
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    setup_console()
    with exit_on_input_error():
        for path in run_prediction(cfg):
            print(path)


if __name__ == "__main__":
    main()
