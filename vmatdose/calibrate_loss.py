"""Set the initial sigmas of learned loss weights from each term's magnitude.

    python -m vmatdose.calibrate_loss experiment=combined_uncertainty
    python -m vmatdose.calibrate_loss loss=grad_dvh data=openkbp calibration.name=hn

Evaluates every term of the composed ``loss`` on the untrained ``model``'s predictions for
``calibration.n_batches`` training batches of ``data`` and writes
``conf/loss/initial_sigmas/<calibration.name>.yaml`` (sigma = sqrt(magnitude)); train
with it through ``+loss/initial_sigmas=<calibration.name> loss.weighting=uncertainty``.
"""

from __future__ import annotations

import itertools
import sys

import hydra
import lightning as L
from omegaconf import DictConfig

from vmatdose.config import CONFIG_DIR
from vmatdose.losses.calibration import (
    sigmas_from_magnitudes,
    term_magnitudes,
    write_sigmas_yaml,
)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="calibrate_loss")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loss = hydra.utils.instantiate(cfg.loss)
    model = hydra.utils.instantiate(cfg.model, loss=loss).eval()
    batches = itertools.islice(datamodule.train_dataloader(), cfg.calibration.n_batches)
    magnitudes = term_magnitudes(loss, model.net, batches, model.max_relative_dose)
    sigmas = sigmas_from_magnitudes(magnitudes)
    path = write_sigmas_yaml(sigmas, cfg.calibration.output_file,
                             "python -m vmatdose.calibrate_loss " + " ".join(sys.argv[1:]))
    for name, value in magnitudes.items():
        print(f"{name}: magnitude {value:.4g} -> sigma {sigmas[name]:.4g}")
    print(f"wrote {path}; train with +loss/initial_sigmas={cfg.calibration.name} "
          "loss.weighting=uncertainty")


if __name__ == "__main__":
    main()
