"""The LightningModule every regression model trains with (U-Nets and friends)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.nn import functional as F

from vmatdose.losses import CompositeLoss
from vmatdose.losses.composite import SIGMA_PARAMETER
from vmatdose.models.film import conditioned_network


def pad_to_multiple(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the last three dims of ``x`` (B, C, Z, Y, X) up to multiples of ``k``.

    Returns the padded tensor and the slices that crop it back.
    """
    pads, crop = [], []
    for size in x.shape[-3:]:
        total = (-size) % k
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat), (slice(None), slice(None), *crop)


def mae_in_body_gy(pred: torch.Tensor, dose: torch.Tensor, body: torch.Tensor,
                   scale_gy: torch.Tensor) -> torch.Tensor:
    """Per-case mean absolute error in Gy inside the body.

    Args:
        pred, dose, body: (B, 1, Z, Y, X); doses normalised by ``scale_gy``.
        scale_gy: (B,) highest prescription in Gy.
    Returns:
        (B,) MAE in Gy.
    """
    err = (pred - dose).abs() * body
    per_case = err.flatten(1).sum(1) / body.flatten(1).sum(1).clamp_min(1)
    return per_case * scale_gy.to(per_case)


def weight_decay_groups(named: Sequence[tuple[str, nn.Parameter]]) -> list[dict]:
    """Optimizer parameter groups: the learned loss sigmas (``loss.log_sigmas.*``) without
    weight decay (decay would pull every sigma to 1, undoing the learned weighting), the
    rest with the optimizer's."""
    sigmas = [p for n, p in named if n.startswith(f"loss.{SIGMA_PARAMETER}.")]
    rest = [p for n, p in named if not n.startswith(f"loss.{SIGMA_PARAMETER}.")]
    return [{"params": rest}] + ([{"params": sigmas, "weight_decay": 0.0}] if sigmas else [])


def adversarial_term_name(loss: CompositeLoss | None) -> str | None:
    """Name of the loss term that owns a ``discriminator`` (and a non-zero weight), if any."""
    if loss is None:
        return None
    names = [name for name, term in loss.terms.items()
             if isinstance(getattr(term, "discriminator", None), nn.Module)
             and loss.weights[name] != 0]
    if len(names) > 1:
        raise ValueError(f"at most one adversarial loss term is supported, got {names}")
    return names[0] if names else None


class DoseModule(L.LightningModule):
    """Image -> dose regression.

    Args:
        net: maps (B, C, Z, Y, X) inputs to (B, 1, Z, Y, X) normalised dose.
        loss: a :class:`CompositeLoss` (``None`` for inference only).
        optimizer: partial optimizer factory (``params -> Optimizer``).
        scheduler: partial LR scheduler factory (``optimizer -> scheduler``) or ``None``.
        inference_patch_size: sliding-window size for whole-volume inference; ``None`` pads
            the whole volume to ``divisible_by`` and predicts it in one pass.
        val_gamma: gamma criteria computed on validation cases each epoch, e.g.
            ``{"dose_percent": 3, "distance_mm": 3}``; ``None`` skips it.
        max_relative_dose: predictions are clipped to ``[0, max_relative_dose]`` in units
            of the highest prescription: no plan delivers 150 % of it, and an undertrained
            network's hot spots would otherwise dominate Dmax-type metrics. ``None``: no cap.
        conditioning: ``none`` or ``film`` (:mod:`vmatdose.models.film`: the plan's
            conditioning vector scales and shifts every block; ``film`` sets it up).

    A loss term with a ``discriminator`` (:class:`vmatdose.losses.AdversarialLoss`) switches
    training to Lightning's manual optimisation with a generator and a discriminator
    optimizer (see :meth:`adversarial_training_step`). Loss terms with a ``set_epoch``
    method are told the epoch at the start of every training epoch (warm-ups).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: CompositeLoss | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        inference_patch_size: Sequence[int] | None = None,
        sw_overlap: float = 0.25,
        divisible_by: int = 16,
        val_gamma: Mapping | None = None,
        max_relative_dose: float | None = 1.5,
        conditioning: str = "none",
        film: Mapping | None = None,
    ):
        super().__init__()
        self.max_relative_dose = max_relative_dose
        self.net = conditioned_network(net, conditioning, film)
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.inference_patch_size = list(inference_patch_size) if inference_patch_size else None
        self.sw_overlap = sw_overlap
        self.divisible_by = divisible_by
        self.val_gamma = dict(val_gamma) if val_gamma else None
        self.run_config: dict | None = None  # set by train.py, stored in every checkpoint
        self.adversarial_term = adversarial_term_name(loss)
        if self.adversarial_term is not None:
            self.automatic_optimization = False

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    @torch.no_grad()
    def predict_dose(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-volume inference: (B, C, Z, Y, X) -> (B, 1, Z, Y, X) normalised dose in
        ``[0, max_relative_dose]``."""
        if self.inference_patch_size:
            pred = sliding_window_inference(image, self.inference_patch_size, 2, self,
                                            overlap=self.sw_overlap, mode="gaussian")
        else:
            padded, crop = pad_to_multiple(image, self.divisible_by)
            pred = self(padded)[crop]
        return pred.float().clamp(0.0, self.max_relative_dose)

    @torch.no_grad()
    def predict_with_uncertainty(self, image: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean dose, per-voxel std or ``None``), both (B, 1, Z, Y, X) normalised.

        Deterministic models have no spread; generative models override this with an
        ensemble of samples.
        """
        return self.predict_dose(image), None

    def _log_loss(self, stage: str, total: torch.Tensor, terms: dict[str, torch.Tensor],
                  batch_size: int) -> None:
        # sync_dist: under DDP epoch values average over every rank (a no-op on one device)
        on_step = stage == "train"
        self.log(f"{stage}/loss", total, prog_bar=True, on_step=on_step, on_epoch=True,
                 batch_size=batch_size, sync_dist=True)
        for name, value in terms.items():
            self.log(f"{stage}/loss/{name}", value, on_step=on_step, on_epoch=True,
                     batch_size=batch_size, sync_dist=True)
        for name, sigma in (self.loss.sigmas().items() if on_step else ()):
            self.log(f"train/sigma/{name}", sigma, on_step=True, on_epoch=True,
                     batch_size=batch_size)

    def on_train_epoch_start(self) -> None:
        for term in self.loss.terms.values() if self.loss is not None else ():
            if callable(getattr(term, "set_epoch", None)):
                term.set_epoch(self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.adversarial_term is not None:
            return self.adversarial_training_step(batch, batch_idx)
        pred = self(batch["image"])
        total, terms = self.loss(pred, batch)
        self._log_loss("train", total, terms, batch["image"].shape[0])
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self.predict_dose(batch["image"])
        total, terms = self.loss(pred, batch)
        n = batch["image"].shape[0]
        self._log_loss("val", total, terms, n)
        mae = mae_in_body_gy(pred, batch["dose"], batch["body"], batch["dose_scale_gy"])
        self.log("val/mae_gy", mae.mean(), prog_bar=True, batch_size=n, sync_dist=True)
        if self.val_gamma:
            self.log("val/gamma_pass", self._gamma_pass(pred, batch), prog_bar=True,
                     batch_size=n, sync_dist=True)

    def _gamma_pass(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        from vmatdose.metrics.gamma import gamma_pass_rate

        rates = []
        for i in range(pred.shape[0]):
            scale = float(batch["dose_scale_gy"][i])
            rates.append(gamma_pass_rate(batch["dose"][i, 0].float() * scale,
                                         pred[i, 0].float() * scale,
                                         batch["spacing_mm"][i].tolist(), **self.val_gamma))
        return torch.tensor(rates, dtype=torch.float32).nanmean()

    def adversarial_training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One discriminator step (once the term's warm-up is over), then one generator
        step on the full composite loss; each network's gradients are clipped to the
        term's ``gradient_clip_val``."""
        term = self.loss.terms[self.adversarial_term]
        generator_opt, discriminator_opt = self.optimizers()
        n = batch["image"].shape[0]
        pred = self(batch["image"])
        if term.active:
            with self.toggled_optimizer(discriminator_opt):
                critic = term.discriminator_loss(pred.detach(), batch)
                self._manual_step(discriminator_opt, critic, term.gradient_clip_val)
            self.log("train/discriminator_loss", critic, on_step=True, on_epoch=True,
                     batch_size=n)
        with self.toggled_optimizer(generator_opt):
            total, terms = self.loss(pred, batch)
            self._manual_step(generator_opt, total, term.gradient_clip_val)
        self._log_loss("train", total, terms, n)
        return total.detach()

    def _manual_step(self, optimizer: Any, loss: torch.Tensor, clip: float | None) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def on_train_epoch_end(self) -> None:
        # Manual optimisation leaves the (epoch-interval) LR scheduler to the module.
        if self.adversarial_term is not None and self.lr_schedulers() is not None:
            self.lr_schedulers().step()

    def configure_optimizers(self) -> Any:
        if self.adversarial_term is not None:
            return self.configure_adversarial_optimizers()
        optimizer = self.optimizer_factory(params=weight_decay_groups(
            list(self.named_parameters())))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "epoch"}}

    def configure_adversarial_optimizers(self) -> Any:
        """[generator optimizer (every parameter but the discriminator's), discriminator
        optimizer], and the LR scheduler of the generator's."""
        term = self.loss.terms[self.adversarial_term]
        critic_params = {id(p) for p in term.discriminator.parameters()}
        generator = self.optimizer_factory(params=weight_decay_groups(
            [(n, p) for n, p in self.named_parameters() if id(p) not in critic_params]))
        optimizers = [generator, term.configure_optimizer()]
        if self.scheduler_factory is None:
            return optimizers
        scheduler = self.scheduler_factory(optimizer=generator)
        return optimizers, [{"scheduler": scheduler, "interval": "epoch"}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["vmatdose_config"] = self.run_config
