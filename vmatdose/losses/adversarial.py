"""Adversarial loss term: a conditional discriminator trained against the dose network.

The term owns its ``discriminator``; :class:`vmatdose.training.module.DoseModule` notices
it and trains with two optimizers, alternating a discriminator step
(:meth:`AdversarialLoss.discriminator_loss` on the detached prediction) with the generator
step (this term's ``forward`` inside the composite loss). Before ``warmup_epochs`` the
term is off: it returns 0 and the discriminator is not trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

_OBJECTIVES = ("lsgan", "hinge")


class AdversarialLoss(nn.Module):
    """Generator side of a least-squares or hinge GAN on (inputs, dose) pairs.

    Args:
        discriminator: ``discriminator(image, dose) -> logits`` (e.g.
            :class:`~vmatdose.losses.patch_discriminator.PatchDiscriminator3D`).
        objective: ``lsgan`` (least squares, real -> 1, fake -> 0) or ``hinge``.
        warmup_epochs: epochs trained on the other terms only before this one switches on.
        optimizer: partial optimizer factory for the discriminator (``params ->
            Optimizer``); default Adam(lr 2e-4, betas (0.5, 0.999)), pix2pix's choice.
        gradient_clip_val: gradient-norm clip of both networks in adversarial training
            (Lightning refuses ``trainer.gradient_clip_val`` under manual optimisation,
            so set that to null); ``None`` disables it.
    """

    def __init__(self, discriminator: nn.Module, objective: str = "lsgan",
                 warmup_epochs: int = 0,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 gradient_clip_val: float | None = 1.0):
        super().__init__()
        if objective not in _OBJECTIVES:
            raise ValueError(f"unknown GAN objective {objective!r}; choose one of {_OBJECTIVES}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.discriminator = discriminator
        self.objective, self.warmup_epochs = objective, int(warmup_epochs)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=2e-4,
                                                      betas=(0.5, 0.999))
        self.gradient_clip_val = gradient_clip_val
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training module at the start of every training epoch."""
        self.epoch = int(epoch)

    @property
    def active(self) -> bool:
        """Whether the warm-up is over."""
        return self.epoch >= self.warmup_epochs

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.discriminator.parameters())

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """Generator loss of ``pred`` (B, 1, Z, Y, X) given ``batch["image"]``; 0 in warm-up."""
        if not self.active:
            return pred.new_zeros(())
        fake = self.discriminator(batch["image"], pred).float()
        if self.objective == "lsgan":
            return (fake - 1.0).square().mean()
        return -fake.mean()

    def discriminator_loss(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """Discriminator loss: reference ``batch["dose"]`` is real, ``pred`` (detached) fake."""
        real = self.discriminator(batch["image"], batch["dose"]).float()
        fake = self.discriminator(batch["image"], pred.detach()).float()
        if self.objective == "lsgan":
            return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
