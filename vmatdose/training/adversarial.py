"""Adversarial training: the dose network against a conditional 3D PatchGAN (pix2pix,
Isola et al. 2017, made 3D).

The critic is MONAI's :class:`~monai.networks.nets.PatchDiscriminator` on the channels
``[inputs, dose]``; it scores overlapping patches, so it judges local texture such as
fall-off sharpness. The objective is MONAI's :class:`~monai.losses.PatchAdversarialLoss`.
Training uses Lightning's manual optimisation: per batch one discriminator step (once
``warmup_epochs`` are over) and one generator step on the composite loss plus
``adversarial_weight`` times the generator's adversarial loss. Selected by
``experiment=adversarial`` (``model._target_``), never by looking inside the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn

from vmatdose.training.module import DoseModule, weight_decay_groups


def least_squares_gan() -> PatchAdversarialLoss:
    """LSGAN (real -> 1, fake -> 0) on raw logits: MONAI's least-squares criterion without
    its default leaky-ReLU on the critic's output."""
    return PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


class AdversarialDoseModule(DoseModule):
    """:class:`DoseModule` trained against a conditional patch discriminator.

    Args:
        *args: :class:`DoseModule`'s ``net, loss, optimizer, scheduler``; ``optimizer``
            and ``scheduler`` drive the dose network (the generator).
        discriminator: builds the critic (a partial, ``_partial_: true`` in the config),
            a network mapping (B, C + 1, Z, Y, X) ``[image, dose]`` to a list of features
            whose last entry is the (B, 1, z, y, x) patch logits (MONAI
            ``PatchDiscriminator``). It is built on a forked RNG stream, so one seed gives
            the same dose network, data order and warm-up epochs as without a critic.
            Inputs need at
            least ``2 ** (num_layers_d + 1)`` voxels a side (instance norm needs more than
            one voxel per channel).
        adversarial_loss: ``loss(logits, target_is_real, for_discriminator)``; default
            :func:`least_squares_gan`.
        adversarial_weight: weight of the generator's adversarial loss in its total.
        warmup_epochs: epochs trained on ``loss`` alone before the critic is trained and
            its term switches on.
        discriminator_optimizer: partial optimizer factory of the critic; default
            Adam(lr 2e-4, betas (0.5, 0.999)), pix2pix's choice.
        gradient_clip_val: gradient-norm clip of both networks (Lightning refuses
            ``trainer.gradient_clip_val`` under manual optimisation: set it to null);
            ``None`` disables it.
        **kwargs: further :class:`DoseModule` arguments (by name, as Hydra passes them).
    """

    def __init__(
        self,
        *args: Any,
        discriminator: Callable[[], nn.Module],
        adversarial_loss: nn.Module | None = None,
        adversarial_weight: float = 0.01,
        warmup_epochs: int = 0,
        discriminator_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        gradient_clip_val: float | None = 1.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.automatic_optimization = False
        with torch.random.fork_rng(devices=[]):
            self.discriminator = discriminator()
        self.adversarial_loss = adversarial_loss or least_squares_gan()
        self.adversarial_weight = float(adversarial_weight)
        self.warmup_epochs = int(warmup_epochs)
        self.discriminator_optimizer = discriminator_optimizer or partial(
            torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))
        self.gradient_clip_val = gradient_clip_val

    @property
    def adversarial_active(self) -> bool:
        """Whether the warm-up is over (the critic trains and its term counts)."""
        return self.current_epoch >= self.warmup_epochs

    def critic(self, image: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, z, y, x) of a (B, 1, Z, Y, X) dose given the inputs."""
        features = self.discriminator(torch.cat([image, dose.to(image.dtype)], dim=1))
        return features[-1].float()

    def compute_loss(self, pred: torch.Tensor, batch: dict
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The composite loss plus the weighted generator loss, logged as ``adversarial``
        (0 during the warm-up)."""
        total, terms = self.loss(pred, batch)
        adversarial = pred.new_zeros(())
        if self.adversarial_active:
            adversarial = self.adversarial_loss(self.critic(batch["image"], pred),
                                                target_is_real=True, for_discriminator=False)
        terms["adversarial"] = adversarial
        return total + self.adversarial_weight * adversarial, terms

    def discriminator_loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean of the critic's losses on the reference (real) and ``pred`` (fake)."""
        real = self.adversarial_loss(self.critic(batch["image"], batch["dose"]),
                                     target_is_real=True, for_discriminator=True)
        fake = self.adversarial_loss(self.critic(batch["image"], pred.detach()),
                                     target_is_real=False, for_discriminator=True)
        return 0.5 * (real + fake)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One critic step (after the warm-up), then one generator step."""
        generator_opt, discriminator_opt = self.optimizers()
        batch = self.crop_to_body(batch)
        n = batch["image"].shape[0]
        pred = self(batch["image"])
        if self.adversarial_active:
            with self.toggled_optimizer(discriminator_opt):
                critic_loss = self.discriminator_loss(pred, batch)
                self._manual_step(discriminator_opt, critic_loss)
            self.log("train/discriminator_loss", critic_loss, on_step=True, on_epoch=True,
                     batch_size=n)
        with self.toggled_optimizer(generator_opt):
            total, terms = self.compute_loss(pred, batch)
            self._manual_step(generator_opt, total)
        self._log_loss("train", total, terms, n)
        return total.detach()

    def _manual_step(self, optimizer: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        optimizer.step()

    def on_train_epoch_end(self) -> None:
        # Manual optimisation leaves the (epoch-interval) LR scheduler to the module.
        if self.lr_schedulers() is not None:
            self.lr_schedulers().step()

    def configure_optimizers(self) -> Any:
        """[generator optimizer (every parameter but the critic's), critic optimizer], and
        the generator's LR scheduler."""
        critic_params = {id(p) for p in self.discriminator.parameters()}
        generator = self.optimizer_factory(params=weight_decay_groups(
            [(n, p) for n, p in self.named_parameters() if id(p) not in critic_params]))
        optimizers = [generator, self.discriminator_optimizer(
            params=self.discriminator.parameters())]
        if self.scheduler_factory is None:
            return optimizers
        scheduler = self.scheduler_factory(optimizer=generator)
        return optimizers, [{"scheduler": scheduler, "interval": "epoch"}]
