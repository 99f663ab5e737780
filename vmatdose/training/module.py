"""The LightningModule every regression model trains with (U-Nets and friends): the
network, its losses and its optimisation. How it is applied to a whole volume (window,
pooling, TTA, upsampling, zeroing) is :class:`~vmatdose.inference.volume.VolumeInference`,
built from the model config's inference arguments (:attr:`DoseModule.inference`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from torch import nn

from vmatdose.config_schema import body_crop_problem, check_dose_bound
from vmatdose.data.input_spec import InputSpec
from vmatdose.inference.body_crop import body_box, crop_batch
from vmatdose.inference.checkpoint import CHECKPOINT_KEY, contract_input_spec
from vmatdose.inference.volume import PassFn, VolumeInference
from vmatdose.losses import CompositeLoss
from vmatdose.losses.composite import SIGMA_PARAMETER
from vmatdose.models.film import conditioned_network

log = logging.getLogger(__name__)


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


def fused_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` updates in one fused kernel (``torch.optim.AdamW(fused=True)``),
    which also unscales fp16 gradients inside its step: Lightning's own test, the one its
    mixed-precision plugin refuses clipping by."""
    return _optimizer_handles_unscaling(optimizer)


class DoseModule(L.LightningModule):
    """Image -> dose regression.

    Args:
        net: maps (B, C, Z, Y, X) inputs to (B, 1, Z, Y, X) normalised dose.
        loss: a :class:`CompositeLoss` (``None`` for inference only).
        optimizer: partial optimizer factory (``params -> Optimizer``).
        scheduler: partial LR scheduler factory (``optimizer -> scheduler``) or ``None``.
        inference_patch_size: sliding-window size for whole-volume inference; ``None`` pads
            the whole volume to ``divisible_by`` and predicts it in one pass.
        val_gamma: gamma criteria of the two-way gamma (``val/gamma_pass``, with
            ``val/gamma_points`` evaluated voxels) computed on validation cases each epoch,
            e.g. ``{"dose_percent": 3, "distance_mm": 3}``; ``None`` skips it.
        max_relative_dose: predictions are clipped to ``[0, max_relative_dose]`` in units
            of the highest prescription: no plan delivers 150 % of it, and an undertrained
            network's hot spots would otherwise dominate Dmax-type metrics. ``None``: no cap.
        tta: ``"flips"``: :meth:`predict_with_uncertainty` averages the predictions of
            every combination of flips of ``tta_axes`` (un-flipped back); a left/right
            (x) flip also swaps the paired structure channels of the input (see
            ``lr_channel_permutation``). ``None``: one pass.
        tta_axes: spatial axes flip TTA mirrors (-3 z, -2 y, -1 x = left/right).
        tta_pool_grids: with ``resolution_factor`` f > 1, inference averages the whole
            prediction over this many of the f^3 grids pooling by f can start on (see
            :class:`~vmatdose.inference.volume.VolumeInference`); 1: one grid. Training's
            validation runs one grid.
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
        target_dose_floor: the predicted dose inside each target of the protocol is raised
            to at least this fraction of its prescription, on the grid the model predicts
            on, by the :class:`~vmatdose.inference.predictor.Predictor` (plans are normalised to cover
            their targets; a network's target edges come out low). Training's validation
            (the network-grid MAE that picks the best checkpoint) does not apply it.
            ``None``: off.
        oar_dose_ceiling: the predicted dose inside each organ at risk with a maximum-dose
            constraint in the protocol (``Dmax <`` limit) is lowered to at most this
            fraction of the limit, outside the targets, by the Predictor as the floor
            (plans meet their organs' hard limits; a network's smooth dose spills over
            them). ``None``: off.
        oar_dose_scale: the predicted dose inside each organ at risk of the protocol,
            outside the targets, multiplied by this factor (or a mapping organ -> factor:
            each named organ its own, the others kept) by the Predictor, after the
            floor and before the ceiling (a plan's optimiser spares an organ more sharply
            than a network's smooth dose follows: the organs' mean dose comes out high).
            ``None``: off.
        target_dose_stretch: inside the targets, the predicted dose above the
            prescription (of the highest target holding the voxel) moved away from it by
            this factor, ``Rx + f (d - Rx)``, by the Predictor before the floor (a plan's
            dose spreads wider inside its targets than a network's smooth dose: the boost's
            spill into a lower-level target comes out low). ``None``: off.
        body_crop_margin: the network sees only the box holding the body, grown by this
            many network-grid voxels on each side and rounded up to ``divisible_by``, in
            training (the batch's box), validation and inference (each case's box)
            (:mod:`vmatdose.inference.body_crop`): the same loss for a fraction of the
            arithmetic. Needs ``loss_in_body`` and ``zero_outside_body`` (nothing outside
            the body is learned or kept). ``None``: whole volumes.

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
        tta_pool_grids: int = 1,
        lr_channel_permutation: Sequence[int] | None = None,
        zero_outside_body: bool = False,
        resolution_factor: int = 1,
        loss_in_body: bool = False,
        prior_residual: bool = False,
        conditioning: str = "none",
        film: Mapping | None = None,
        target_dose_floor: float | None = None,
        body_crop_margin: int | None = None,
        oar_dose_ceiling: float | None = None,
        oar_dose_scale: float | Mapping[str, float] | None = None,
        target_dose_stretch: float | None = None,
    ):
        super().__init__()
        problem = body_crop_problem(body_crop_margin, loss_in_body, zero_outside_body)
        if problem:
            raise ValueError(f"model.body_crop_margin={body_crop_margin!r}: {problem}")
        self.body_crop_margin = body_crop_margin
        self.target_dose_floor = check_dose_bound("target_dose_floor", target_dose_floor)
        self.oar_dose_ceiling = check_dose_bound("oar_dose_ceiling", oar_dose_ceiling)
        self.oar_dose_scale = check_dose_bound("oar_dose_scale", oar_dose_scale)
        self.target_dose_stretch = check_dose_bound("target_dose_stretch", target_dose_stretch)
        self.max_relative_dose = max_relative_dose
        self.tta = None if tta == "none" else tta
        self.tta_axes = [int(a) for a in tta_axes]
        self.tta_pool_grids = tta_pool_grids
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
        self._inference_settings()  # bad tta / resolution_factor fail here, not at inference
        self.val_gamma = dict(val_gamma) if val_gamma else None
        # The checkpoint contract (vmatdose.inference.checkpoint): set before fitting,
        # stored in every checkpoint, restored on resume.
        self.contract: dict | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def _inference_settings(self, input_spec: InputSpec | None = None) -> VolumeInference:
        return VolumeInference(
            patch_size=self.inference_patch_size, sw_overlap=self.sw_overlap,
            divisible_by=self.divisible_by, max_relative_dose=self.max_relative_dose,
            tta=self.tta, tta_axes=self.tta_axes, tta_pool_grids=self.tta_pool_grids,
            lr_permutation=self.lr_channel_permutation,
            zero_outside_body=self.zero_outside_body, resolution_factor=self.resolution_factor,
            prior_residual=self.prior_residual, input_spec=input_spec,
            body_crop_margin=self.body_crop_margin)

    @property
    def inference(self) -> VolumeInference:
        """How this model is applied to a whole volume (the model config's inference
        arguments and the input specification of its contract)."""
        return self._inference_settings(self.input_spec if self.contract else None)

    @torch.no_grad()
    def predict_dose(self, image: torch.Tensor) -> torch.Tensor:
        """One network pass over a network-grid image (B, C, Z, Y, X) -> (B, 1, Z, Y, X)
        normalised dose in ``[0, max_relative_dose]`` (validation runs this)."""
        return self.inference.network_pass(self, image)

    def passes(self) -> PassFn:
        """What one TTA view of the image gives: (dose, no spread); generative models
        return their ensemble's (mean, std)."""
        return lambda x: (self.predict_dose(x), None)

    @torch.no_grad()
    def predict_with_uncertainty(self, image: torch.Tensor, body: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean dose, per-voxel std or ``None``), both (B, 1, Z, Y, X) normalised, on the
        grid of ``image`` (B, C, Z, Y, X); ``body`` (B, 1, Z, Y, X) {0, 1} or ``None``:
        the whole inference of :attr:`inference` (pooling, flip TTA, upsampling, zeroing
        outside ``body``)."""
        return self.inference.predict(image, body, self.passes())

    @property
    def input_spec(self) -> InputSpec:
        """The channel layout of the input (:mod:`vmatdose.data.input_spec`), from the
        contract this module was trained with or loaded from."""
        if not self.contract:
            raise ValueError("this module has no input specification: use a module built by "
                             "training or loaded from a checkpoint (its contract holds it)")
        return contract_input_spec(self.contract)

    def crop_to_body(self, batch: dict) -> dict:
        """``batch`` with its volumes cut to the box of its ``body`` (see
        ``body_crop_margin``); as is without a margin."""
        if self.body_crop_margin is None:
            return batch
        if "body" not in batch:
            raise ValueError("model.body_crop_margin needs a body in every batch")
        box = body_box(batch["body"], self.body_crop_margin, self.divisible_by)
        return batch if box is None else crop_batch(batch, box)

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
        batch = self.crop_to_body(batch)
        pred = self.masked_for_loss(self(batch["image"]), batch)
        total, terms = self.compute_loss(pred, batch)
        self._log_loss("train", total, terms, batch["image"].shape[0])
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch = self.crop_to_body(batch)
        pred = self.masked_for_loss(self.predict_dose(batch["image"]), batch)
        total, terms = self.compute_loss(pred, batch)
        n = batch["image"].shape[0]
        self._log_loss("val", total, terms, n)
        mae = mae_in_body_gy(pred, batch["dose"], batch["body"], batch["dose_scale_gy"])
        self.log("val/mae_gy", mae.mean(), prog_bar=True, batch_size=n, sync_dist=True)
        if self.val_gamma:
            rate, points = self._gamma_pass(pred, batch)
            self.log("val/gamma_pass", rate, prog_bar=True, batch_size=n, sync_dist=True)
            self.log("val/gamma_points", points, batch_size=n, sync_dist=True)

    def _gamma_pass(self, pred: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean two-way gamma pass rate %, mean evaluated voxels) over the batch's cases.

        Two-way (:func:`vmatdose.metrics.gamma.two_way_gamma`): the interpolated one-way
        gamma passes an untrained network's voxel-to-voxel noise, and this number is an
        objective (``hparams_search=loss_weights``)."""
        from vmatdose.metrics.gamma import two_way_gamma

        rates, points = [], []
        for i in range(pred.shape[0]):
            scale = float(batch["dose_scale_gy"][i])
            result = two_way_gamma(batch["dose"][i, 0].float() * scale,
                                   pred[i, 0].float() * scale,
                                   batch["spacing_mm"][i].tolist(), **self.val_gamma)
            rates.append(result.pass_percent)
            points.append(float(result.points))
        return (torch.tensor(rates, dtype=torch.float32).nanmean(),
                torch.tensor(points, dtype=torch.float32).mean())

    def configure_optimizers(self) -> Any:
        groups = weight_decay_groups(list(self.named_parameters()))
        optimizer = self.optimizer_factory(params=groups)
        if fused_step(optimizer) and self._grad_scaler() is not None:
            # an fp16 grad scaler: a fused step unscales the gradients itself, so Lightning
            # could not clip them before it (it refuses); the unfused step can
            log.info("model.optimizer.fused: off under %s precision (the gradient scaler "
                     "unscales before clipping)", self.trainer.precision)
            optimizer = self.optimizer_factory(params=groups, fused=False)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except for a fused optimizer without a gradient scaler
        (fp32, bf16): there the gradients are already unscaled, and the same clipping is
        done here (Lightning's mixed-precision plugin refuses any fused optimizer)."""
        if not gradient_clip_val or not fused_step(optimizer):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def _grad_scaler(self) -> Any:
        """The trainer's fp16 gradient scaler, ``None`` without one (fp32, bf16) or without
        a trainer."""
        trainer = self._trainer
        return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.contract is not None:
            checkpoint[CHECKPOINT_KEY] = self.contract

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.contract = checkpoint.get(CHECKPOINT_KEY, self.contract)
