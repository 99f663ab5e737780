"""The LightningModule every regression model trains with (U-Nets and friends)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.nn import functional as F

from vmatdose.data.input_spec import InputSpec
from vmatdose.inference.checkpoint import CHECKPOINT_KEY, contract_input_spec
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


TTA_MODES = (None, "none", "flips")
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def pool_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, Z, Y, X) average-pooled by ``factor`` exactly as the data pipeline pools
    (MONAI ``Zoom``, ``mode="area"``)."""
    if factor == 1:
        return image
    return F.interpolate(image, scale_factor=[1.0 / factor] * 3, mode="area",
                         recompute_scale_factor=True)


def flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (-3 z, -2 y, -1 x): the flips of flip TTA,
    identity first."""
    axes = sorted({int(a) for a in axes})
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def weight_decay_groups(named: Sequence[tuple[str, nn.Parameter]]) -> list[dict]:
    """Optimizer parameter groups: the learned loss sigmas (``loss.log_sigmas.*``) without
    weight decay (decay would pull every sigma to 1, undoing the learned weighting), the
    rest with the optimizer's."""
    sigmas = [p for n, p in named if n.startswith(f"loss.{SIGMA_PARAMETER}.")]
    rest = [p for n, p in named if not n.startswith(f"loss.{SIGMA_PARAMETER}.")]
    return [{"params": rest}] + ([{"params": sigmas, "weight_decay": 0.0}] if sigmas else [])


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
        tta: ``"flips"``: :meth:`predict_with_uncertainty` averages the predictions of
            every combination of flips of ``tta_axes`` (un-flipped back); a left/right
            (x) flip also swaps the paired structure channels of the input (see
            ``lr_channel_permutation``). ``None``: one pass.
        tta_axes: spatial axes flip TTA mirrors (-3 z, -2 y, -1 x = left/right).
        lr_channel_permutation: input channel order after a left/right flip; ``None``
            derives it from the checkpoint contract's structures and protocol ``lr_pairs``.
        zero_outside_body: :meth:`predict_with_uncertainty` zeroes the dose outside the
            ``body`` it is given (OpenKBP: the possible-dose mask, as the challenge does).
        resolution_factor: the network works at 1/f of the case grid: full-resolution
            inference average-pools the input by f and upsamples the dose trilinearly
            (train with ``data.resolution_factor`` = f).
            With a ``body``, the upsampling is mask-normalised (the coarse dose is the mean
            over the body part of each coarse voxel, see ``data.resolution_factor``), so
            the dose at the mask's edge is not diluted by the zeros outside it.
        prior_residual: with ``resolution_factor`` > 1, the network's coarse dose is
            taken as the prior-dose channel (the image's last) plus a correction: only
            the correction is upsampled and the full-resolution prior is added back, which
            keeps the target edges sharp.
        loss_in_body: the training loss sees the prediction zeroed outside ``body``, so
            no gradient asks for dose where it is never scored.
        conditioning: ``none`` or ``film`` (:mod:`vmatdose.models.film`: the plan's
            conditioning vector scales and shifts every block; ``film`` sets it up).

    Subclasses change what is optimised through :meth:`compute_loss` (adversarial
    training, :mod:`vmatdose.training.adversarial`) or :meth:`training_step` (deep
    supervision, generative models).
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
        tta: str | None = None,
        tta_axes: Sequence[int] = (-3, -2, -1),
        lr_channel_permutation: Sequence[int] | None = None,
        zero_outside_body: bool = False,
        resolution_factor: int = 1,
        loss_in_body: bool = False,
        prior_residual: bool = False,
        conditioning: str = "none",
        film: Mapping | None = None,
    ):
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"model.tta must be one of {TTA_MODES}, got {tta!r}")
        if int(resolution_factor) < 1:
            raise ValueError(f"resolution_factor must be >= 1, got {resolution_factor}")
        self.max_relative_dose = max_relative_dose
        self.tta = None if tta == "none" else tta
        self.tta_axes = [int(a) for a in tta_axes]
        self.lr_channel_permutation = (list(lr_channel_permutation)
                                       if lr_channel_permutation is not None else None)
        self.zero_outside_body = bool(zero_outside_body)
        self.resolution_factor = int(resolution_factor)
        self.loss_in_body = bool(loss_in_body)
        self.prior_residual = bool(prior_residual)
        self.net = conditioned_network(net, conditioning, film)
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.inference_patch_size = list(inference_patch_size) if inference_patch_size else None
        self.sw_overlap = sw_overlap
        self.divisible_by = divisible_by
        self.val_gamma = dict(val_gamma) if val_gamma else None
        # The checkpoint contract (vmatdose.inference.checkpoint): set before fitting,
        # stored in every checkpoint, restored on resume.
        self.contract: dict | None = None

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
    def predict_with_uncertainty(self, image: torch.Tensor, body: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean dose, per-voxel std or ``None``), both (B, 1, Z, Y, X) normalised, on the
        grid of ``image`` (B, C, Z, Y, X); ``body`` (B, 1, Z, Y, X) {0, 1} or ``None``.

        The full inference: resolution pooling, flip TTA and zeroing outside ``body`` as
        the model config says (see the class arguments). Deterministic models have no
        spread; generative models pass their ensemble here (:meth:`infer`).
        """
        return self.infer(image, body, lambda x: (self.predict_dose(x), None))

    def infer(self, image: torch.Tensor, body: torch.Tensor | None,
              predictor: Predictor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``predictor`` (network-grid image -> (mean, std|None)) under the module's
        resolution factor, flip TTA and body zeroing; see :meth:`predict_with_uncertainty`.
        """
        x = pool_image(image, self.resolution_factor)
        flips = flip_sets(self.tta_axes) if self.tta == "flips" else [()]
        means, stds = [], []
        for dims in flips:
            flipped = self.flip_input(x, dims) if dims else x
            mean, std = predictor(flipped)
            means.append(torch.flip(mean, dims) if dims else mean)
            if std is not None:
                stds.append(torch.flip(std, dims) if dims else std)
        mean = torch.stack(means).mean(0)
        std = torch.stack(stds).mean(0) if stds else None
        if self.resolution_factor > 1:
            size = list(image.shape[2:])
            mean = self.upsample(mean, image, body)
            if std is not None:
                std = F.interpolate(std, size=size, mode="trilinear", align_corners=False)
        if self.zero_outside_body and body is not None:
            inside = (body > 0).to(mean.dtype)
            mean = mean * inside
            std = None if std is None else std * inside
        return mean, std

    def upsample(self, coarse: torch.Tensor, image: torch.Tensor,
                 body: torch.Tensor | None) -> torch.Tensor:
        """Coarse dose (B, 1, z, y, x) -> the grid of ``image`` (B, C, Z, Y, X).

        Without ``body``: trilinear. With it: mask-normalised trilinear inside the body
        (each coarse voxel's value spread only over the fine voxels inside the mask) plus,
        with ``prior_residual``, the full-resolution prior (the image's ``prior`` channel,
        :attr:`input_spec`) back;
        trilinear outside the body.
        """
        size = list(image.shape[2:])
        plain = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)
        if body is None:
            return plain
        inside = (body > 0).to(coarse.dtype)
        fraction = pool_image(inside, self.resolution_factor)
        valid = (fraction > 0).to(coarse.dtype)
        correction = coarse
        if self.prior_residual:
            prior = image[:, self.input_spec.slice("prior")]
            coarse_prior = pool_image(prior * inside, self.resolution_factor)
            correction = coarse - coarse_prior / fraction.clamp_min(1e-6) * valid
        num = F.interpolate(correction * valid, size=size, mode="trilinear", align_corners=False)
        den = F.interpolate(valid, size=size, mode="trilinear", align_corners=False)
        fine = torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num))
        if self.prior_residual:
            fine = fine + prior
        top = self.max_relative_dose if self.max_relative_dose is not None else float("inf")
        return torch.where(inside > 0, fine.clamp(0.0, top), plain)

    def flip_input(self, image: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """Mirror ``image`` (B, C, Z, Y, X) along ``dims``; a left/right (x) mirror also
        reorders the channels so each paired structure stays on its side (the data
        module's left/right augmentation does the same)."""
        flipped = torch.flip(image, list(dims))
        if -1 in dims or 4 in dims:
            flipped = flipped[:, self.input_lr_permutation(image.shape[1])]
        return flipped

    def input_lr_permutation(self, n_channels: int) -> list[int]:
        """Input channel order after a left/right mirror (see ``lr_channel_permutation``)."""
        if self.lr_channel_permutation is not None:
            if len(self.lr_channel_permutation) != n_channels:
                raise ValueError(f"model.lr_channel_permutation has "
                                 f"{len(self.lr_channel_permutation)} entries for an image of "
                                 f"{n_channels} channels")
            return self.lr_channel_permutation
        if not (self.contract or {}).get("structures"):
            raise ValueError("left/right flip TTA needs the input's structure channels: set "
                             "model.lr_channel_permutation or use a module built by training "
                             "or loaded from a checkpoint (its contract names the channels)")
        permutation = self.input_spec.lr_permutation()
        if len(permutation) != n_channels:
            raise ValueError(f"the input specification has {len(permutation)} channels, the "
                             f"image {n_channels}")
        return permutation

    @property
    def input_spec(self) -> InputSpec:
        """The channel layout of the input (:mod:`vmatdose.data.input_spec`), from the
        contract this module was trained with or loaded from."""
        if not self.contract:
            raise ValueError("this module has no input specification: use a module built by "
                             "training or loaded from a checkpoint (its contract holds it)")
        return contract_input_spec(self.contract)

    def masked_for_loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """``pred`` zeroed outside ``batch["body"]`` when ``loss_in_body`` (else as is)."""
        if not self.loss_in_body or "body" not in batch:
            return pred
        return pred * (batch["body"] > 0).to(pred.dtype)

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

    def compute_loss(self, pred: torch.Tensor, batch: dict
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, {term name: unweighted value}) of a (B, 1, Z, Y, X) prediction: the
        composite ``loss``, in training and validation."""
        return self.loss(pred, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred = self.masked_for_loss(self(batch["image"]), batch)
        total, terms = self.compute_loss(pred, batch)
        self._log_loss("train", total, terms, batch["image"].shape[0])
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self.masked_for_loss(self.predict_dose(batch["image"]), batch)
        total, terms = self.compute_loss(pred, batch)
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

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=weight_decay_groups(
            list(self.named_parameters())))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.contract is not None:
            checkpoint[CHECKPOINT_KEY] = self.contract

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.contract = checkpoint.get(CHECKPOINT_KEY, self.contract)
