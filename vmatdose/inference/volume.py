"""Whole-volume inference of one network: the one place that pads or slides a window,
pools to the network's resolution (on one pooling grid or several, averaged), crops to
the body's box, mirrors for test-time augmentation, upsamples (adding the full-resolution
prior back) and zeroes outside the body.

:class:`VolumeInference` is what :class:`~vmatdose.inference.predictor.Predictor` runs on
every case and what a :class:`~vmatdose.training.module.DoseModule` runs in validation
(its network pass) and in ``predict_with_uncertainty``, so training's validation numbers
and a prediction come from the same code. All doses here are normalised by the dose
scale (1 = the highest prescription).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch.nn import functional as F

from vmatdose.config_schema import BODY_CROP_RANGE, is_body_crop_margin, tta_pool_grids_problem
from vmatdose.data.input_spec import InputSpec
from vmatdose.data.transforms import pool_grid_offsets
from vmatdose.inference.body_crop import Box, body_box, place

TTA_MODES = (None, "none", "flips")
#: network-grid image (B, C, z, y, x) -> (mean, std or ``None``), both (B, 1, z, y, x)
PassFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


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


def pool_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, Z, Y, X) average-pooled by ``factor`` exactly as the data pipeline pools
    (MONAI ``Zoom``, ``mode="area"``)."""
    if factor == 1:
        return image
    return F.interpolate(image, scale_factor=[1.0 / factor] * 3, mode="area",
                         recompute_scale_factor=True)


def grid_padding(size: Sequence[int], factor: int, offset: Sequence[int]
                 ) -> tuple[list[int], tuple[slice, ...]]:
    """How to pad a volume of spatial ``size`` (Z, Y, X) so that pooling by ``factor``
    starts on the grid ``offset`` (z, y, x) case voxels along (the training grids of
    :func:`~vmatdose.data.transforms.pool_grid_offsets`): ``F.pad`` widths (x first) that
    put (f - o) % f voxels before each axis and round it up to a multiple of f after, and
    the slices (B, C, Z, Y, X) that crop the padded grid back."""
    front = [(factor - int(o)) % factor for o in offset]
    back = [(-(int(n) + p)) % factor for n, p in zip(size, front)]
    pads = [w for p, q in reversed(list(zip(front, back))) for w in (p, q)]
    crop = (slice(None), slice(None), *[slice(p, p + int(n)) for p, n in zip(front, size)])
    return pads, crop


def flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (-3 z, -2 y, -1 x): the flips of flip TTA,
    identity first."""
    axes = sorted({int(a) for a in axes})
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


@dataclass
class VolumeInference:
    """How a trained network is applied to a whole volume (the model config's inference
    settings; see :class:`~vmatdose.training.module.DoseModule` for each argument).

    Args:
        patch_size: sliding-window size; ``None`` pads the volume to ``divisible_by`` and
            predicts it in one pass.
        sw_overlap: sliding-window overlap (Gaussian blending).
        divisible_by: the network's size multiple (padding without a window).
        max_relative_dose: predictions clipped to ``[0, max_relative_dose]``.
        tta: ``"flips"`` (every combination of flips of ``tta_axes``) or ``None``.
        tta_axes: spatial axes flip TTA mirrors (-3 z, -2 y, -1 x = left/right).
        tta_pool_grids: with ``resolution_factor`` f > 1, the prediction is the mean of the
            whole inference run on this many of the f^3 grids pooling can start on (the
            input padded so pooling starts on each, the dose cropped back; grid 0 first):
            each grid places the coarse voxels differently against the anatomy, so their
            mean is finer than one grid's. G x the passes of one grid. 1: grid 0 only.
        lr_permutation: input channel order after a left/right mirror; ``None`` takes it
            from ``input_spec``.
        zero_outside_body: :meth:`predict` zeroes the dose outside the body it is given.
        resolution_factor: the network works at 1/f of the input grid.
        prior_residual: with f > 1, only the network's correction to the prior channel is
            upsampled and the full-resolution prior added back.
        input_spec: the input's channel layout (the prior channel, the left/right
            permutation); ``None`` for a module without a contract.
        body_crop_margin: the network sees the box of the body grown by this many
            network-grid voxels (:mod:`vmatdose.inference.body_crop`); ``None``: the
            whole volume.
    """

    patch_size: Sequence[int] | None = None
    sw_overlap: float = 0.25
    divisible_by: int = 16
    max_relative_dose: float | None = 1.5
    tta: str | None = None
    tta_axes: Sequence[int] = (-3, -2, -1)
    tta_pool_grids: int = 1
    lr_permutation: Sequence[int] | None = None
    zero_outside_body: bool = False
    resolution_factor: int = 1
    prior_residual: bool = False
    input_spec: InputSpec | None = None
    body_crop_margin: int | None = None

    def __post_init__(self):
        if self.tta not in TTA_MODES:
            raise ValueError(f"model.tta must be one of {TTA_MODES}, got {self.tta!r}")
        if int(self.resolution_factor) < 1:
            raise ValueError(f"resolution_factor must be >= 1, got {self.resolution_factor}")
        self.tta = None if self.tta == "none" else self.tta
        problem = tta_pool_grids_problem(self.tta_pool_grids, self.resolution_factor)
        if problem:
            raise ValueError(f"model.tta_pool_grids={self.tta_pool_grids!r}: {problem}")
        margin = self.body_crop_margin
        if not is_body_crop_margin(margin):
            raise ValueError(f"model.body_crop_margin={margin!r}: {BODY_CROP_RANGE}")

    @torch.no_grad()
    def network_pass(self, net: Callable[[torch.Tensor], torch.Tensor],
                     image: torch.Tensor) -> torch.Tensor:
        """One pass of ``net`` over a network-grid image (B, C, z, y, x) -> (B, 1, z, y,
        x) in ``[0, max_relative_dose]``: a Gaussian-blended sliding window, or the whole
        volume padded to ``divisible_by`` (validation in training runs exactly this)."""
        if self.patch_size:
            pred = sliding_window_inference(image, list(self.patch_size), 2, net,
                                            overlap=self.sw_overlap, mode="gaussian")
        else:
            padded, crop = pad_to_multiple(image, self.divisible_by)
            pred = net(padded)[crop]
        return pred.float().clamp(0.0, self.max_relative_dose)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, body: torch.Tensor | None, passes: PassFn
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std or ``None``), (B, 1, Z, Y, X), on the grid of ``image`` (B, C, Z, Y,
        X): :meth:`run`, then :meth:`zero_outside` ``body`` (B, 1, Z, Y, X) {0, 1}."""
        mean, std = self.run(image, body, passes)
        return self.zero_outside(mean, std, body)

    def run(self, image: torch.Tensor, body: torch.Tensor | None, passes: PassFn
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`run_grid` on each of ``tta_pool_grids`` pooling grids (the image and body
        padded so pooling starts on it, the dose cropped back), averaged; no zeroing."""
        if self.tta_pool_grids == 1:
            return self.run_grid(image, body, passes)
        factor, size = self.resolution_factor, image.shape[2:]
        means, stds = [], []
        for offset in pool_grid_offsets(factor, self.tta_pool_grids):
            pads, crop = grid_padding(size, factor, offset)
            if any(pads):  # a copy of the image: the CT and prior's border repeated, as the
                # training grids pool it; no body there
                grid_image = F.pad(image, pads, mode="replicate")
                grid_body = None if body is None else F.pad(body, pads)
            else:
                grid_image, grid_body = image, body
            mean, std = self.run_grid(grid_image, grid_body, passes)
            means.append(mean[crop])
            if std is not None:
                stds.append(std[crop])
        return torch.stack(means).mean(0), torch.stack(stds).mean(0) if stds else None

    def run_grid(self, image: torch.Tensor, body: torch.Tensor | None, passes: PassFn
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pool to the network grid, (crop to the body's box), run ``passes`` on every TTA
        flip (un-flipped back and averaged), (put back on the network grid, zero outside
        the box), upsample to the grid of ``image``; no zeroing (:meth:`predict` does it,
        or the caller after resampling to another grid)."""
        x = pool_image(image, self.resolution_factor)
        grid = x.shape[2:]
        box = self.body_box(body)
        if box is not None:
            x = x[(slice(None), slice(None), *box)]
        flips = flip_sets(self.tta_axes) if self.tta == "flips" else [()]
        means, stds = [], []
        for dims in flips:
            mean, std = passes(self.flip_input(x, dims) if dims else x)
            means.append(torch.flip(mean, dims) if dims else mean)
            if std is not None:
                stds.append(torch.flip(std, dims) if dims else std)
        mean = torch.stack(means).mean(0)
        std = torch.stack(stds).mean(0) if stds else None
        if box is not None:
            mean, std = place(mean, box, grid), None if std is None else place(std, box, grid)
        if self.resolution_factor > 1:
            mean = self.upsample(mean, image, body)
            if std is not None:
                std = F.interpolate(std, size=list(image.shape[2:]), mode="trilinear",
                                    align_corners=False)
        return mean, std

    def body_box(self, body: torch.Tensor | None) -> Box | None:
        """The box of the network grid the network sees for ``body`` (B, 1, Z, Y, X) on
        the input grid: ``None`` (the whole volume) without ``body_crop_margin`` or body."""
        if self.body_crop_margin is None or body is None:
            return None
        coarse = pool_image((body > 0).float(), self.resolution_factor)
        return body_box(coarse, self.body_crop_margin, self.divisible_by)

    def zero_outside(self, mean: torch.Tensor, std: torch.Tensor | None,
                     body: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mean`` and ``std`` zeroed outside ``body`` when ``zero_outside_body`` (the
        OpenKBP possible-dose mask: the challenge scores nothing outside it)."""
        if not self.zero_outside_body or body is None:
            return mean, std
        inside = (body > 0).to(mean.dtype)
        return mean * inside, (None if std is None else std * inside)

    def upsample(self, coarse: torch.Tensor, image: torch.Tensor,
                 body: torch.Tensor | None) -> torch.Tensor:
        """Coarse dose (B, 1, z, y, x) -> the grid of ``image`` (B, C, Z, Y, X).

        Without ``body``: trilinear. With it: mask-normalised trilinear inside the body
        (each coarse voxel's value spread only over the fine voxels inside the mask) plus,
        with ``prior_residual``, the full-resolution prior (the ``prior`` channel of the
        input specification) back; trilinear outside the body.
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
            start = self._spec("the prior residual").slice("prior").start
            prior = image[:, start:start + 1]  # the prior itself, not its beam sectors
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
        """Input channel order after a left/right mirror (see ``lr_permutation``)."""
        if self.lr_permutation is not None:
            if len(self.lr_permutation) != n_channels:
                raise ValueError(f"model.lr_channel_permutation has "
                                 f"{len(self.lr_permutation)} entries for an image of "
                                 f"{n_channels} channels")
            return list(self.lr_permutation)
        if self.input_spec is None:
            raise ValueError("left/right flip TTA needs the input's structure channels: set "
                             "model.lr_channel_permutation or use a module built by training "
                             "or loaded from a checkpoint (its contract names the channels)")
        permutation = self.input_spec.lr_permutation()
        if len(permutation) != n_channels:
            raise ValueError(f"the input specification has {len(permutation)} channels, the "
                             f"image {n_channels}")
        return permutation

    def _spec(self, what: str) -> InputSpec:
        if self.input_spec is None:
            raise ValueError(f"this module has no input specification ({what} needs it): use "
                             "a module built by training or loaded from a checkpoint (its "
                             "contract holds it)")
        return self.input_spec
