"""MONAI dictionary transforms that turn a case file into a training sample.

A sample is a dict of channel-first tensors (MONAI convention):

* ``image``: (C, Z, Y, X) float32 network input, channels as
  :class:`vmatdose.data.input_spec.InputSpec` lays them out: [CT window, masks...,
  (SDFs...), (prior), (conditioning planes)]
* ``dose``: (1, Z, Y, X) float32 reference dose divided by ``dose_scale_gy``
* ``masks``: (S, Z, Y, X) float32 structure masks in the data config's order
* ``body``: (1, Z, Y, X) float32 scoring region
* ``spacing_mm``: (3,) float32 ``(dz, dy, dx)``; ``dose_scale_gy``: float; ``case_id``: str

Options (all off by default): ``prior_dose`` adds a prior-dose input channel (see
:mod:`vmatdose.data.prior`); ``resolution_factor`` f > 1 average-pools every volume by f
(the network then works at 1/f of the grid, see ``DoseModule.resolution_factor``);
``patch_sampling="dose"`` centres a fraction of the training patches on the dose region;
``compact=True`` ends the pipeline before the float ``image`` is built, with CT, dose,
prior and SDFs in float16, the body in uint8 and the masks cached as bits (8 structures
per byte; float16 fractions once pooled), so a cached 128^3 OpenKBP case takes about
14 MB instead of 109 MB; the bits are unpacked per sample after the cache
(:class:`UnpackMasks`) and :func:`assemble_batch` casts and concatenates per batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    DivisiblePadd,
    EnsureTyped,
    MapTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    RandomizableTransform,
    RandRotated,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SpatialPadd,
    Zoomd,
)

from vmatdose.data.case import load_case
from vmatdose.data.conditioning import ConditionChanneld
from vmatdose.data.geometry import signed_distance_mm
from vmatdose.data.input_spec import InputSpec
from vmatdose.data.prior import PriorDosed

PATCH_SAMPLING = ("uniform", "dose")
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


def lr_permutation(structures: Sequence[str], pairs: Sequence[Sequence[str]]) -> list[int]:
    """Channel order of ``structures`` after a left/right mirror: each (left, right) pair
    present swaps places (``Femur_L`` stays the patient's left femur)."""
    structures = list(structures)
    permutation = list(range(len(structures)))
    for left, right in pairs:
        if left in structures and right in structures:
            i, j = structures.index(left), structures.index(right)
            permutation[i], permutation[j] = j, i
    return permutation


class RandFlipLeftRightd(RandomizableTransform, MapTransform):
    """Mirror along x (patient left-right) and swap the channels of paired structures,
    so that ``Femur_L`` stays the patient's left femur after the flip."""

    def __init__(self, keys: KeysCollection, structures: Sequence[str],
                 pairs: Sequence[Sequence[str]], prob: float = 0.5, mask_keys=("masks", "sdf")):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.mask_keys = set(mask_keys)
        self.permutation = lr_permutation(structures, pairs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        out = dict(data)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            flipped = torch.flip(torch.as_tensor(out[key]), dims=[-1])
            if key in self.mask_keys:
                flipped = flipped[self.permutation]
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


def assemble_batch(batch: Mapping[str, object], signed_distance: bool = False,
                   prior: bool = False, dtype: torch.dtype = torch.float32,
                   spec: InputSpec | None = None) -> dict:
    """A compact sample or batch -> the float one the models read: volumes cast to
    ``dtype`` and ``image`` = the volume blocks of ``spec`` ([CT, masks, (SDFs), (prior)]
    built from the flags when ``None``) concatenated on the channel axis (dim -4). A batch
    that already has an ``image`` only gets the casts."""
    spec = spec or InputSpec.build((), signed_distance, prior)
    parts = spec.volume_keys
    out = dict(batch)
    for key in dict.fromkeys(("ct", "masks", "body", "dose", "sdf", "prior", "image", *parts)):
        if key in out and isinstance(out[key], torch.Tensor):
            out[key] = out[key].to(dtype)
    if "image" not in out:
        out["image"] = torch.cat([out[k] for k in parts], dim=-4)
        for key in parts:
            if key != "masks":  # the masks stay a sample entry (losses, metrics)
                out.pop(key, None)
    return out


def _volume_keys(signed_distance: bool, with_dose: bool, prior: bool = False) -> list[str]:
    keys = ["ct", "masks", "body"]
    if signed_distance:
        keys.append("sdf")
    if prior:
        keys.append("prior")
    if with_dose:
        keys.append("dose")
    return keys


def build_transforms(
    structures: Sequence[str],
    dose_scale_gy: float,
    *,
    train: bool,
    ct_window: Sequence[float] = (-1000.0, 1500.0),
    signed_distance: bool = False,
    sdf_scale_mm: float = 50.0,
    patch_size: Sequence[int] | None = None,
    divisible_by: int = 16,
    lr_pairs: Sequence[Sequence[str]] = (),
    augment: Mapping | None = None,
    with_dose: bool = True,
    prior_dose: Mapping | None = None,
    resolution_factor: int = 1,
    patch_sampling: str = "uniform",
    dose_patch_fraction: float = 0.8,
    dose_patch_threshold: float = 0.1,
    compact: bool = False,
    prescriptions_gy: Mapping[str, float] | None = None,
    conditioning: Mapping | None = None,
    default_beams: Mapping | None = None,
) -> Compose:
    """The whole case -> sample pipeline.

    Args:
        train: add augmentation and random patches (training split only).
        ct_window: HU mapped linearly to [0, 1], clipped.
        patch_size: (Z, Y, X) random crop for training; ``None`` trains on whole volumes.
        divisible_by: whole training volumes are padded so a U-Net's down-samplings divide
            them.
        augment: ``flip_lr``, ``flip_ap``, ``flip_si`` (mirror probabilities: left/right
            with paired channels swapped, anterior/posterior, superior/inferior),
            ``rotate_deg``, ``rotate_prob``, ``intensity_shift``, ``intensity_prob``
            (probabilities and magnitudes; 0 disables one).
        prior_dose: the ``data.prior_dose`` config of the prior-dose channel
            (:class:`vmatdose.data.prior.PriorDosed`: ``kind`` distance or beams and their
            settings); needs ``prescriptions_gy``. ``None``: no prior channel.
        resolution_factor: average-pool every volume by this integer factor (MONAI
            ``Zoomd``, ``mode="area"``); spacing grows by it; the dose becomes the mean
            over the body part of each coarse voxel (:class:`MaskMeand`).
        patch_sampling: ``uniform`` or ``dose`` (``dose_patch_fraction`` of the patches
            centred on voxels with dose >= ``dose_patch_threshold`` x the highest
            prescription, see :class:`RandDoseCropd`).
        compact: stop before the float ``image`` (see the module docstring).
        conditioning: ``{targets, constraints, dose_scale_gy}`` of the protocol: adds the
            plan's conditioning vector (:mod:`vmatdose.data.conditioning`); ``None``: none.
        default_beams: the protocol's beam arrangement for cases without their own (the
            beam prior's).
    """
    augment = dict(augment or {})
    if patch_sampling not in PATCH_SAMPLING:
        raise ValueError(f"patch_sampling must be one of {PATCH_SAMPLING}, "
                         f"got {patch_sampling!r}")
    prior = prior_dose is not None
    if prior and not prescriptions_gy:
        raise ValueError("prior_dose needs prescriptions_gy")
    if conditioning and (compact or prior):
        # the conditioning planes are appended to the float image, which compact samples
        # build per batch, and the prior must stay the image's last channel
        raise ValueError("model.conditioning needs data.compact=false and no data.prior_dose")
    keys = _volume_keys(signed_distance, with_dose, prior)
    prior_step = (PriorDosed(structures, prescriptions_gy, dose_scale_gy, prior_dose,
                             default_beams) if prior else None)
    steps: list = [
        LoadCased(structures, dose_scale_gy,
                  with_geometry=prior_step is not None and prior_step.kind == "beams"),
        EnsureTyped([k for k in keys if k not in ("sdf", "prior")], dtype=torch.float32,
                    track_meta=False, allow_missing_keys=True),
        # before the CT window: the beam prior traces the CT in HU
        *([prior_step] if prior else []),
        ScaleIntensityRanged("ct", a_min=ct_window[0], a_max=ct_window[1], b_min=0.0,
                             b_max=1.0, clip=True),
    ]
    if signed_distance:
        steps.append(SignedDistanced(sdf_scale_mm))
    if resolution_factor > 1:
        steps += [Zoomd(keys, zoom=1.0 / resolution_factor, mode="area", keep_size=False),
                  MaskMeand(), PoolSpacingd(resolution_factor)]
    if compact:
        pooled = resolution_factor > 1
        steps += [Compactd(keys, torch.float16 if pooled else torch.uint8, pack_masks=not pooled)]
        if not pooled:
            steps.append(UnpackMasks(len(structures)))
    if train:
        steps += _augmentations(keys, structures, lr_pairs, augment)
    if train and patch_size:
        steps.append(SpatialPadd(keys, spatial_size=list(patch_size)))
        if patch_sampling == "dose" and with_dose:
            steps.append(RandDoseCropd(keys, patch_size, dose_patch_fraction,
                                       dose_patch_threshold))
        else:
            steps.append(RandSpatialCropd(keys, roi_size=list(patch_size), random_size=False))
    elif train:
        # Evaluation keeps the case's grid; the model pads and crops itself at inference.
        steps.append(DivisiblePadd(keys, k=divisible_by, mode="constant"))
    if compact:
        steps += [EnsureTyped(keys, track_meta=False),
                  DeleteItemsd(["path"]),
                  EnsureTyped("spacing_mm", dtype=torch.float32, track_meta=False)]
        return Compose(steps)
    image_parts = InputSpec.build(structures, signed_distance, prior).volume_keys
    steps += [
        # Random MONAI transforms hand back MetaTensors; plain tensors from here on.
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ConcatItemsd(image_parts, name="image", dim=0),
        *([ConditionChanneld(**conditioning)] if conditioning else []),
        DeleteItemsd(["path"] + [k for k in image_parts if k != "masks"]),
        EnsureTyped("spacing_mm", dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def _augmentations(keys: list[str], structures: Sequence[str],
                   lr_pairs: Sequence[Sequence[str]], augment: Mapping) -> list:
    steps: list = []
    if augment.get("flip_lr", 0) > 0:
        steps.append(RandFlipLeftRightd(keys, list(structures), lr_pairs,
                                        prob=augment["flip_lr"]))
    for name, axis in (("flip_ap", 1), ("flip_si", 0)):  # spatial axes of (Z, Y, X)
        if augment.get(name, 0) > 0:
            steps.append(RandFlipd(keys, prob=augment[name], spatial_axis=axis))
    if augment.get("rotate_deg", 0) > 0 and augment.get("rotate_prob", 0) > 0:
        angle = np.deg2rad(augment["rotate_deg"])
        # Rotation about z (the axial plane), the way a patient lies rotated on the couch.
        modes = ["bilinear" if k in ("ct", "dose", "sdf") else "nearest" for k in keys]
        steps.append(RandRotated(keys, range_x=angle, prob=augment["rotate_prob"],
                                 mode=modes, padding_mode="border", keep_size=True))
    if augment.get("intensity_shift", 0) > 0 and augment.get("intensity_prob", 0) > 0:
        steps.append(RandShiftIntensityd("ct", offsets=augment["intensity_shift"],
                                         prob=augment["intensity_prob"]))
    return steps


def inference_transform(data_cfg: Mapping, with_dose: bool = False) -> Compose:
    """The case -> float ``image`` pipeline a trained model's inference needs, on the
    case's own grid, from its data config (``structures``, ``dose_scale_gy``,
    ``ct_window``, ``signed_distance``, ``sdf_scale_mm``, ``prior_dose``, ``beams``,
    ``prescriptions_gy``, ``conditioning``: a :func:`~vmatdose.data.conditioning.conditioning_spec`). Resolution pooling is the model's job at inference
    (``DoseModule.resolution_factor``), so it is not applied here."""
    return build_transforms(
        list(data_cfg["structures"]), float(data_cfg["dose_scale_gy"]), train=False,
        ct_window=list(data_cfg.get("ct_window", (-1000.0, 1500.0))),
        signed_distance=bool(data_cfg.get("signed_distance", False)),
        sdf_scale_mm=float(data_cfg.get("sdf_scale_mm", 50.0)),
        prior_dose=data_cfg.get("prior_dose"),
        prescriptions_gy=data_cfg.get("prescriptions_gy"), with_dose=with_dose,
        conditioning=data_cfg.get("conditioning"), default_beams=data_cfg.get("beams"))
