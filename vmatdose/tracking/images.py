"""Per-validation-epoch pictures of a validation case, sent to every logger that takes
images (W&B, TensorBoard) and, with ``save_png``, written under ``<run>/images``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from vmatdose.evaluation import figures
from vmatdose.inference.checkpoint import CheckpointContract
from vmatdose.inference.predictor import Predictor


def figure_to_array(fig: plt.Figure) -> np.ndarray:
    """(H, W, 3) uint8 RGB rendering of a matplotlib figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class DoseImageCallback(L.Callback):
    """Every ``every_n_epochs`` validation epochs: axial/coronal/sagittal slices of the
    reference, predicted and difference dose, and the DVH overlay, of one validation case.

    Args:
        every_n_epochs: how often (epochs) to draw.
        case_index: which validation case (position in the split).
        save_png: also write ``<output_dir>/images/epoch_XXX_<kind>.png``.
        output_dir: the run folder (for ``save_png``).
        dpi: rendering resolution.
    """

    def __init__(self, every_n_epochs: int = 10, case_index: int = 0, save_png: bool = False,
                 output_dir: str | None = None, dpi: int = 80):
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.case_index = case_index
        self.save_png = save_png
        self.output_dir = Path(output_dir) if output_dir else None
        self.dpi = dpi

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (trainer.sanity_checking or not trainer.is_global_zero
                or ((epoch + 1) % self.every_n_epochs and epoch + 1 != trainer.max_epochs)):
            return
        datamodule = trainer.datamodule
        paths = datamodule.paths_of("val")
        if not paths:
            return
        path = paths[min(self.case_index, len(paths) - 1)]
        # The data module's own evaluation transforms: the inputs the model validates on.
        # The whole inference a prediction runs (full resolution, TTA, zeroing)
        prediction = Predictor(pl_module, CheckpointContract.from_dict(pl_module.contract)
                               ).predict(path)
        case, pred_gy = prediction.case, prediction.dose_gy
        targets = list(datamodule.targets)
        drawn = {"dose_slices": figures.dose_slices_figure(case, pred_gy, targets),
                 "dvh": figures.dvh_figure(case, pred_gy)}
        for kind, fig in drawn.items():
            fig.set_dpi(self.dpi)
            self._publish(trainer, f"val/{kind}", fig, case.case_id, epoch)
            if self.save_png and self.output_dir is not None:
                target = self.output_dir / "images" / f"epoch_{epoch:03d}_{kind}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(target, dpi=self.dpi)
            plt.close(fig)

    @staticmethod
    def _publish(trainer: L.Trainer, key: str, fig: plt.Figure, caption: str,
                 epoch: int) -> None:
        image = None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                image = figure_to_array(fig) if image is None else image
                logger.log_image(key=key, images=[image], caption=[caption],
                                 step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(key, fig, global_step=epoch, close=False)
