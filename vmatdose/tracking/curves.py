"""``training_curves.png`` in every run folder: loss and validation metrics per epoch,
whatever logger the run uses (also with ``logger=none``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L

from vmatdose.metrics import registry
from vmatdose.plot_style import FONT, OKABE_ITO, plt

LOSS_KEYS = ("train/loss_epoch", "val/loss")


def training_curves_figure(history: Sequence[Mapping[str, float]]) -> plt.Figure:
    """One panel for the training and validation loss, one per other validation metric
    (``val/mae_gy``, ``val/gamma_pass``...); ``history[i]`` holds epoch ``i``'s values."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    others = [k for k in keys if k.startswith("val/") and k not in LOSS_KEYS
              and "/loss/" not in k]
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(1, 1 + len(others), figsize=(4.2 * (1 + len(others)), 3.6),
                                 constrained_layout=True, squeeze=False)
        panels = [[k for k in LOSS_KEYS if k in keys], *[[k] for k in others]]
        for ax, panel in zip(axes[0], panels):
            for colour, key in zip(OKABE_ITO, panel):
                epochs = [i + 1 for i, row in enumerate(history) if _finite(row.get(key))]
                ax.plot(epochs, [history[e - 1][key] for e in epochs], "o-", color=colour,
                        label=registry.label(key), ms=3)
            ax.set(xlabel="epoch", ylabel=registry.heading(panel[0]) if len(panel) == 1
                   else "loss")
            ax.grid(alpha=0.3)
            if len(panel) > 1:
                ax.legend()
        fig.suptitle("training curves")
    return fig


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


class TrainingCurvesCallback(L.Callback):
    """Records the epoch metrics (after validation) and writes
    ``<output_dir>/training_curves.png`` when fitting ends.

    Args:
        output_dir: the run folder.
        dpi: PNG resolution.
    """

    def __init__(self, output_dir: str, dpi: int = 120):
        self.output_dir = Path(output_dir)
        self.dpi = dpi
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook: both are in the metrics
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items()
                             if k.startswith(("train/", "val/")) and v.numel() == 1})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig = training_curves_figure(self.history)
        fig.savefig(self.output_dir / "training_curves.png", dpi=self.dpi)
        plt.close(fig)
