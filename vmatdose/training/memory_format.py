"""``callbacks.memory_format.format``: the network's weights and each batch's image in
channels-last 3D order (NDHWC) or the default (NCDHW) for training.

``auto`` picks by what was measured on the CPU recipe's network (``benchmarks/
bench_cpu_step.py``, a batch of two 64^3 volumes; experiments/openkbp.md):

- fp32 on the CPU: **channels-last**, which oneDNN's fp32 3D convolutions prefer: 1.19x the
  steps per second of the default layout on a 2-core Zen 4 (1.54x on a quieter evening),
  1.08-1.28x on an AVX2 EPYC.
- bf16 on the CPU: **contiguous**. oneDNN's bf16 kernels run the network as fast in either
  layout (0.341 against 0.343 s per step on the Zen 4), and the instance norms copy
  channels-last activations back and forth; without the per-batch copy the recipe trained
  1.05-1.09x the steps per second (three paired runs).
- CUDA: contiguous (nothing measured there).

The layout changes the order of floating-point sums, not the mathematics: the outputs agree
with the default layout's to rounding.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import lightning as L
import torch

log = logging.getLogger(__name__)

FORMATS = ("auto", "channels_last", "contiguous")


@dataclass(frozen=True)
class MemoryFormatChoice:
    """What the config asked for, the layout chosen, and why (for the run record)."""

    requested: str
    chosen: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def memory_format(self) -> torch.memory_format:
        return (torch.channels_last_3d if self.chosen == "channels_last"
                else torch.contiguous_format)


def choose_memory_format(requested: str, device_type: str, precision: str
                         ) -> MemoryFormatChoice:
    """The layout for ``requested`` (one of :data:`FORMATS`) on ``device_type`` (``cpu``,
    ``cuda``) at Lightning ``precision`` (``32-true``, ``bf16-mixed``, ...)."""
    if requested not in FORMATS:
        raise ValueError(f"callbacks.memory_format.format={requested!r}: use one of "
                         f"{', '.join(FORMATS)}")
    if requested != "auto":
        return MemoryFormatChoice(requested, requested, "as asked")
    if device_type != "cpu":
        return MemoryFormatChoice(requested, "contiguous", f"auto: the default on {device_type}")
    if str(precision).startswith("bf16"):
        return MemoryFormatChoice(requested, "contiguous",
                                  "auto: bf16 on the CPU, as fast as channels-last without "
                                  "the per-batch copy")
    return MemoryFormatChoice(requested, "channels_last",
                              "auto: fp32 on the CPU, whose oneDNN 3D convolutions prefer it")


class MemoryFormatCallback(L.Callback):
    """Put the module's 5D weights (at fit start) and every training batch's ``image``
    (B, C, Z, Y, X) into one memory format (:func:`choose_memory_format` for the module's
    device and the trainer's precision)."""

    def __init__(self, format: str = "auto") -> None:  # noqa: A002 (the config key)
        choose_memory_format(format, "cpu", "32-true")  # a bad value fails at instantiation
        self.format = format
        self.memory_format = torch.contiguous_format

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        choice = choose_memory_format(self.format, pl_module.device.type, trainer.precision)
        self.memory_format = choice.memory_format
        if self.memory_format is torch.channels_last_3d:
            pl_module.to(memory_format=torch.channels_last_3d)
        log.info("training in the %s memory format (%s)", choice.chosen, choice.reason)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: dict, batch_idx: int) -> None:
        image = batch.get("image") if isinstance(batch, dict) else None
        if image is not None and image.dim() == 5:
            batch["image"] = image.contiguous(memory_format=self.memory_format)
