"""The case -> sample steps: MONAI dictionary transforms of this package.

Each class is one step of the pipeline that :mod:`vmatdose.data.pipeline` assembles
(sample keys and shapes are documented there): reading a case file (:class:`LoadCased`),
signed distances (:class:`SignedDistanced`), the left/right mirror with paired channels
swapped (:class:`RandFlipLeftRightd`), the cache dtypes of ``compact`` samples
(:class:`Compactd`, :class:`UnpackMasks`), resolution pooling (:class:`PoolGridsd`,
:class:`MaskMeand`, :class:`PoolSpacingd`) and dose-centred patches (:class:`RandDoseCropd`).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    RandCropByPosNegLabeld,
    Randomizable,
    RandomizableTransform,
    RandSpatialCropd,
    Zoom,
)
from torch.nn import functional as F

from vmatdose.data.case import load_case
from vmatdose.data.geometry import signed_distance_mm
from vmatdose.data.input_spec import lr_permutation

#: Sample keys held in 16 bits by ``compact`` (the rest of the volumes in 8 bits).
HALF_KEYS = ("ct", "dose", "sdf", "prior")


class LoadCased(MapTransform):
    """Read the case file at ``data["path"]`` (or take the already read
    :class:`~vmatdose.data.case.Case` at ``data["case"]``, which is not passed on) into
    channel-first numpy arrays.

    Structures are reordered to ``structures``; a structure the case lacks becomes an
    all-zero channel (OpenKBP patients miss some OARs). ``with_geometry`` adds
    ``origin_mm`` (3,) and ``beams`` (the case's ``meta["beams"]`` or ``None``) for the
    beam prior, which consumes them.
    """

    def __init__(self, structures: Sequence[str], dose_scale_gy: float, path_key: str = "path",
                 with_geometry: bool = False):
        super().__init__(keys=[path_key])
        self.structures = list(structures)
        self.dose_scale_gy = float(dose_scale_gy)
        self.path_key = path_key
        self.with_geometry = bool(with_geometry)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        case = data.get("case") or load_case(data[self.path_key])
        masks = np.zeros((len(self.structures), *case.shape), dtype=np.float32)
        for i, name in enumerate(self.structures):
            if case.has_structure(name):
                masks[i] = case.mask(name)
        out = {k: v for k, v in data.items() if k != "case"}
        out.update(
            ct=case.ct[None].astype(np.float32),
            masks=masks,
            body=case.body[None].astype(np.float32),
            spacing_mm=np.asarray(case.spacing_mm, dtype=np.float32),
            dose_scale_gy=self.dose_scale_gy,
            case_id=case.case_id,
        )
        if case.dose is not None:
            out["dose"] = (case.dose[None] / self.dose_scale_gy).astype(np.float32)
        if self.with_geometry:
            out.update(origin_mm=np.asarray(case.origin_mm, float),
                       beams=case.meta.get("beams"))
        return out


class SignedDistanced(MapTransform):
    """Add ``sdf``: (S, Z, Y, X) signed distances of ``masks``, divided by ``scale_mm``
    and clipped to [-1, 1] so they sit in the same range as the other channels."""

    def __init__(self, scale_mm: float = 50.0):
        super().__init__(keys=["masks"])
        self.scale_mm = float(scale_mm)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        masks = np.asarray(out["masks"]) > 0
        spacing = np.asarray(out["spacing_mm"], dtype=np.float64)
        sdf = np.stack([signed_distance_mm(m, spacing) for m in masks])
        out["sdf"] = torch.from_numpy(np.clip(sdf / self.scale_mm, -1.0, 1.0).astype(np.float32))
        return out


class RandFlipLeftRightd(RandomizableTransform, MapTransform):
    """Mirror along x (patient left-right) and swap the channels of paired structures,
    so that ``Femur_L`` stays the patient's left femur after the flip; ``prior_permutation``
    reorders the ``prior`` channels (its gantry sectors: g becomes -g), ``None`` keeps them."""

    def __init__(self, keys: KeysCollection, structures: Sequence[str],
                 pairs: Sequence[Sequence[str]], prob: float = 0.5, mask_keys=("masks", "sdf"),
                 prior_permutation: Sequence[int] | None = None):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.mask_keys = set(mask_keys)
        self.permutation = lr_permutation(structures, pairs)
        self.prior_permutation = list(prior_permutation) if prior_permutation else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        out = dict(data)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            flipped = torch.flip(torch.as_tensor(out[key]), dims=[-1])
            if key in self.mask_keys:
                flipped = flipped[self.permutation]
            elif key == "prior" and self.prior_permutation is not None:
                flipped = flipped[self.prior_permutation]
            out[key] = flipped
        return out


class Compactd(MapTransform):
    """Cast the volumes to their cache dtypes: :data:`HALF_KEYS` to float16, masks and
    body to uint8 (or float16 when pooled to fractions, ``masks_dtype``); with
    ``pack_masks``, the binary masks (S, Z, Y, X) become bits (ceil(S / 8), Z, Y, X)
    uint8 (``np.packbits`` over the channel axis)."""

    def __init__(self, keys: KeysCollection, masks_dtype: torch.dtype = torch.uint8,
                 pack_masks: bool = False):
        super().__init__(keys, allow_missing_keys=True)
        self.masks_dtype = masks_dtype
        self.pack_masks = pack_masks

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            if key == "masks" and self.pack_masks:
                masks = np.asarray(torch.as_tensor(out[key]).cpu().numpy()) > 0
                out[key] = torch.from_numpy(np.packbits(masks, axis=0))
                continue
            dtype = torch.float16 if key in HALF_KEYS else self.masks_dtype
            out[key] = torch.as_tensor(out[key]).to(dtype)
        return out


class UnpackMasks:
    """Bits (ceil(S / 8), Z, Y, X) -> masks (S, Z, Y, X) uint8, per sample.

    Deliberately not a MONAI ``Transform``: MONAI's ``CacheDataset`` caches everything up
    to the first step that is random *or not a Transform*, so the packed masks are what
    stays in memory and this runs on every fetch."""

    def __init__(self, n_masks: int):
        self.n_masks = int(n_masks)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        packed = torch.as_tensor(out["masks"]).cpu().numpy()
        out["masks"] = torch.from_numpy(np.unpackbits(packed, axis=0, count=self.n_masks))
        return out


class MaskMeand(MapTransform):
    """After pooling: ``dose`` becomes the mean dose over the possible-dose-mask part of
    each coarse voxel (``dose / body`` where the pooled ``body`` fraction is > 0, else 0),
    so a coarse voxel half outside the mask is not diluted by the zeros there; ``body``
    stays the fraction (the loss weight)."""

    def __init__(self, dose_key: str = "dose", body_key: str = "body"):
        super().__init__(keys=[dose_key], allow_missing_keys=True)
        self.dose_key, self.body_key = dose_key, body_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        if self.dose_key not in out:
            return out
        body = torch.as_tensor(out[self.body_key]).float()
        dose = torch.as_tensor(out[self.dose_key]).float()
        out[self.dose_key] = torch.where(body > 0, dose / body.clamp_min(1e-6),
                                         torch.zeros_like(dose))
        return out


def pool_grid_offsets(factor: int, count: int) -> list[tuple[int, int, int]]:
    """The first ``count`` pooling-grid offsets (z, y, x), in case voxels, of the
    ``factor``^3 grids that pooling by ``factor`` can start on: (0, 0, 0) first (the grid
    validation and inference use), then (h, h, h) with h = factor // 2 (half a coarse voxel
    along every axis), then each remaining offset followed by its opposite (every axis
    moved by h), so a few grids already spread over every axis."""
    if not 1 <= count <= factor ** 3:
        raise ValueError(f"pool grids: {count} asked, pooling by {factor} has "
                         f"{factor ** 3} (1 to {factor ** 3})")
    half = factor // 2
    ordered = [(0, 0, 0)]
    for offset in itertools.product(range(factor), repeat=3):
        for candidate in (offset, tuple((o + half) % factor for o in offset)):
            if candidate not in ordered:
                ordered.append(candidate)
    return ordered[:count]


class PoolGridsd(MapTransform):
    """Average-pool the volumes by ``factor`` on several grids: each volume (C, Z, Y, X)
    becomes (G, C, Z/f, Y/f, X/f), one pooling per offset of :func:`pool_grid_offsets`.
    Grid 0 is exactly the one grid's pooling (MONAI ``Zoom``, ``mode="area"``); grid o
    averages the f^3 case voxels that start o case voxels further along each axis (the far
    border repeated where they run past it): the anatomy moved by a fraction of a coarse
    voxel, training samples no single grid can give. :class:`MaskMeand` and the compact
    casts work on the stacked volumes as they are."""

    def __init__(self, keys: KeysCollection, factor: int, grids: int):
        super().__init__(keys, allow_missing_keys=True)
        self.factor = int(factor)
        self.offsets = pool_grid_offsets(self.factor, int(grids))
        self.zoom = Zoom(zoom=1.0 / factor, mode="area", keep_size=False)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            volume = torch.as_tensor(out[key]).float()
            first = torch.as_tensor(self.zoom(volume))
            means = _window_means(volume, self.factor)
            size = first.shape[1:]
            out[key] = torch.stack([first] + [
                means[:, oz::self.factor, oy::self.factor, ox::self.factor][
                    :, :size[0], :size[1], :size[2]] for oz, oy, ox in self.offsets[1:]])
        return out


def _window_means(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """The mean of the ``factor``^3 window that starts at each voxel of ``volume``
    (C, Z, Y, X), the far border repeated: (C, Z + f, Y + f, X + f), so every grid's
    strided slice is at least as long as grid 0's."""
    padded = F.pad(volume[None], [0, 2 * factor - 1] * 3, mode="replicate")[0]
    for axis in (-1, -2, -3):
        n = padded.shape[axis] - factor + 1
        padded = sum(padded.narrow(axis, k, n) for k in range(factor))
    return padded / factor ** 3


class PoolSpacingd(MapTransform):
    """``spacing_mm`` times ``factor`` (after pooling the volumes by it)."""

    def __init__(self, factor: int):
        super().__init__(keys=["spacing_mm"])
        self.factor = int(factor)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        out["spacing_mm"] = np.asarray(out["spacing_mm"], np.float32) * self.factor
        return out


class RandDoseCropd(Randomizable, MapTransform):
    """Random ``roi_size`` patch: with probability ``dose_fraction`` centred on a voxel
    whose reference dose is at least ``threshold`` (normalised: 0.1 = 10 % of the highest
    prescription; MONAI's :class:`RandCropByPosNegLabeld` with positives only), else
    uniformly placed (:class:`RandSpatialCropd`). A case without dose above the
    threshold always gets a uniform patch."""

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], dose_fraction: float,
                 threshold: float = 0.1, dose_key: str = "dose"):
        MapTransform.__init__(self, keys)
        if not 0.0 <= dose_fraction <= 1.0:
            raise ValueError(f"dose_fraction must be in [0, 1], got {dose_fraction}")
        self.dose_fraction = float(dose_fraction)
        self.threshold = float(threshold)
        self.dose_key = dose_key
        self.label_key = "_dose_region"
        self.positive = RandCropByPosNegLabeld(list(keys), self.label_key, list(roi_size),
                                               pos=1.0, neg=0.0, num_samples=1,
                                               allow_smaller=True)
        self.uniform = RandSpatialCropd(keys, roi_size=list(roi_size), random_size=False)

    def set_random_state(self, seed: int | None = None, state=None) -> RandDoseCropd:
        super().set_random_state(seed, state)
        self.positive.set_random_state(seed=int(self.R.randint(2**31)))
        self.uniform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: object = None) -> None:
        self._dose_patch = self.R.rand() < self.dose_fraction

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        out = dict(data)
        region = torch.as_tensor(out[self.dose_key]).float() >= self.threshold
        if not (self._dose_patch and bool(region.any())):
            return self.uniform(out)
        out[self.label_key] = region.to(torch.uint8)
        patch = self.positive(out)[0]
        patch.pop(self.label_key)
        return patch
