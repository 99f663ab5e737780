"""Learning-rate schedules on a wall-clock budget (speed-run recipes stop on
``trainer.max_time``, so an epoch-count schedule would be cut short or end early)."""

from __future__ import annotations

import math
import time

import torch
from torch.optim.lr_scheduler import LRScheduler


class TimeCosineLR(LRScheduler):
    """Cosine annealing over wall-clock time: at elapsed time t since construction,
    ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * min(1, t / budget_s))) / 2``.

    Args:
        optimizer: the wrapped optimizer.
        budget_minutes: minutes over which the rate decays to ``eta_min`` (the training
            budget, ``trainer.max_time``).
        eta_min: final learning rate.
        T_max: ignored; accepted so a recipe can swap this class in for the model
            configs' epoch-count ``CosineAnnealingLR`` (whose ``T_max`` a config merge
            keeps).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, budget_minutes: float | str,
                 eta_min: float = 1e-5, last_epoch: int = -1, T_max: int | None = None):
        if float(budget_minutes) <= 0:
            raise ValueError(f"budget_minutes must be positive, got {budget_minutes}")
        self.budget_s = 60.0 * float(budget_minutes)
        self.eta_min = float(eta_min)
        self.start = time.monotonic()
        super().__init__(optimizer, last_epoch)

    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1]."""
        return min(1.0, (time.monotonic() - self.start) / self.budget_s)

    def get_lr(self) -> list[float]:
        cosine = (1.0 + math.cos(math.pi * self.progress())) / 2.0
        return [self.eta_min + (base - self.eta_min) * cosine for base in self.base_lrs]
