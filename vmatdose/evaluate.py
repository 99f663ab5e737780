"""Evaluate a checkpoint, or a folder of predicted doses, on a split of case files.

    python -m vmatdose.evaluate ckpt_path=<run>/checkpoints/last.ckpt     # its own test split
    python -m vmatdose.evaluate ckpt_path=<ckpt> data.cases_dir=<dir> split=all
    python -m vmatdose.evaluate predictions_dir=<dir> data.cases_dir=<dir> split=all

Writes ``per_case.csv``, ``dvh.csv``, ``constraints.csv``, ``summary.json``, ``figures/``
and ``report.html`` into the run folder (see :mod:`vmatdose.evaluation.pipeline`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vmatdose.cli_hints import with_quoting_hint
from vmatdose.config import CONFIG_DIR
from vmatdose.errors import exit_on_input_error
from vmatdose.evaluation.pipeline import data_source, run_evaluation
from vmatdose.plot_style import use_file_backend
from vmatdose.tracking.console import setup_console


@with_quoting_hint
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    setup_console()
    use_file_backend()
    hydra_cfg = HydraConfig.get()
    with exit_on_input_error():
        _, summary = run_evaluation(cfg, hydra_cfg.runtime.output_dir,
                                    data_source(hydra_cfg.overrides.task))
    metrics = summary["metrics"]
    print(OmegaConf.to_yaml({k: round(v["mean"], 3) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
