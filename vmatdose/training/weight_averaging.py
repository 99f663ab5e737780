"""An exponential moving average (EMA) of the weights, for validation, checkpoints and
inference: Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` with a
warm-up, so the average forgets the random initial weights within a short run.

With the callback on, validation (and so the best checkpoint's choice) sees the averaged
weights, every checkpoint's ``state_dict`` holds them (the training weights travel beside
them, for resuming), and the module ends training with them: the
:class:`~vmatdose.inference.predictor.Predictor` and ``vmatdose.evaluate`` read the average
without knowing it was one.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

# (1 + n) / (EMA_WARMUP + n): the average spans about the last ninth of the steps so far
EMA_WARMUP = 10.0


def ema_decay_at(decay: float, n_averaged: int, warmup: float = EMA_WARMUP) -> float:
    """The decay of the ``n_averaged``-th update (0 for the first): ``min(decay, (1 + n) /
    (warmup + n))``. Until ``decay`` caps it the average spans about the last n / (warmup
    - 1) steps (warmup 10: a ninth of the run so far; at 0.999 the cap comes at n = 9000,
    longer than the OpenKBP CPU recipe's runs); a smaller ``warmup`` averages more of the
    run, as stochastic weight averaging does."""
    return min(float(decay), (1.0 + n_averaged) / (float(warmup) + n_averaged))


def check_ema_decay(decay: float | None, key: str) -> float | None:
    """``decay`` as a float in (0, 1), or ``None`` (off); anything else is refused, naming
    the config ``key``."""
    if decay is None:
        return None
    if not 0.0 < float(decay) < 1.0:
        raise ValueError(f"{key}={decay}: an EMA decay must be in (0, 1), or null (off)")
    return float(decay)


class EMAWeightAveraging(WeightAveraging):
    """Keep an EMA of every parameter and buffer of the module, updated after each optimizer
    step with the decay of :func:`ema_decay_at`.

    Args:
        decay: the EMA's decay once warmed up (e.g. 0.999); ``None``: off (the callback
            does nothing, so the config can carry it switched off).
        warmup: the warm-up's constant (> 1; :func:`ema_decay_at`): the average spans about
            the last 1 / (warmup - 1) of the steps so far until ``decay`` caps it.
    """

    def __init__(self, decay: float | None = None, warmup: float = EMA_WARMUP) -> None:
        self.decay = check_ema_decay(decay, "callbacks.weight_averaging.decay")
        if not float(warmup) > 1.0:
            raise ValueError(f"callbacks.weight_averaging.warmup={warmup}: must be > 1 (the "
                             "average spans about n / (warmup - 1) of n steps)")
        self.warmup = float(warmup)
        super().__init__(multi_avg_fn=self._average)

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                 n_averaged: torch.Tensor) -> None:
        """One update of ``averaged`` in place: tensors of one device and dtype, updated in
        one foreach call (a per-tensor loop cost 6 ms per step for 4.8 M parameters)."""
        if not averaged[0].is_floating_point():  # step counters and the like: follow the model
            torch._foreach_copy_(averaged, current)
            return
        weight = 1.0 - ema_decay_at(self.decay, int(n_averaged), self.warmup)
        torch._foreach_lerp_(averaged, current, weight)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.decay is None:
            return
        if getattr(pl_module, "ema_net", None) is not None:
            raise ValueError("callbacks.weight_averaging.decay is set, but the model keeps its "
                             "own average (model.ema_decay): use one of the two")
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return self.decay is not None and step_idx is not None

    # Switched off, the callback stays out of training, checkpoints and their loading.
    def on_train_end(self, trainer, pl_module) -> None:
        if self._average_model is not None:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is not None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        elif "current_model_state" in checkpoint and trainer.state.fn == TrainerFn.FITTING:
            # A run with the average resumed without it: its state_dict is the average, but
            # the optimizer's state belongs to the training weights, so go on from those.
            log.warning("the checkpoint holds an EMA of the weights, this run keeps none "
                        "(callbacks.weight_averaging.decay=null): training resumes from its "
                        "training weights and the average is dropped")
            pl_module.load_state_dict(checkpoint["current_model_state"])
