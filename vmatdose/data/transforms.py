"""MONAI dictionary transforms that turn a case file into a training sample.

A sample is a dict of channel-first tensors (MONAI convention):

* ``image``: (C, Z, Y, X) float32 network input = [CT window, masks..., (SDFs...)]
* ``dose``: (1, Z, Y, X) float32 reference dose divided by ``dose_scale_gy``
* ``masks``: (S, Z, Y, X) float32 structure masks in the data config's order
* ``body``: (1, Z, Y, X) float32 scoring region
* ``spacing_mm``: (3,) float32 ``(dz, dy, dx)``; ``dose_scale_gy``: float; ``case_id``: str
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
    RandomizableTransform,
    RandRotated,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SpatialPadd,
)

from vmatdose.data.case import load_case
from vmatdose.data.conditioning import ConditionChanneld
from vmatdose.data.geometry import signed_distance_mm


class LoadCased(MapTransform):
    """Read the case file at ``data["path"]`` into channel-first numpy arrays.

    Structures are reordered to ``structures``; a structure the case lacks becomes an
    all-zero channel (OpenKBP patients miss some OARs).
    """

    def __init__(self, structures: Sequence[str], dose_scale_gy: float, path_key: str = "path"):
        super().__init__(keys=[path_key])
        self.structures = list(structures)
        self.dose_scale_gy = float(dose_scale_gy)
        self.path_key = path_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        case = load_case(data[self.path_key])
        masks = np.zeros((len(self.structures), *case.shape), dtype=np.float32)
        for i, name in enumerate(self.structures):
            if case.has_structure(name):
                masks[i] = case.mask(name)
        out = dict(data)
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
    so that ``Femur_L`` stays the patient's left femur after the flip."""

    def __init__(self, keys: KeysCollection, structures: Sequence[str],
                 pairs: Sequence[Sequence[str]], prob: float = 0.5, mask_keys=("masks", "sdf")):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.mask_keys = set(mask_keys)
        self.permutation = list(range(len(structures)))
        for left, right in pairs:
            if left in structures and right in structures:
                i, j = structures.index(left), structures.index(right)
                self.permutation[i], self.permutation[j] = j, i

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


def _volume_keys(signed_distance: bool, with_dose: bool) -> list[str]:
    keys = ["ct", "masks", "body"]
    if signed_distance:
        keys.append("sdf")
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
    conditioning: Mapping | None = None,
) -> Compose:
    """The whole case -> sample pipeline.

    Args:
        train: add augmentation and random patches (training split only).
        ct_window: HU mapped linearly to [0, 1], clipped.
        patch_size: (Z, Y, X) random crop for training; ``None`` trains on whole volumes.
        divisible_by: whole training volumes are padded so a U-Net's down-samplings divide
            them.
        augment: ``flip_lr``, ``rotate_deg``, ``rotate_prob``, ``intensity_shift``,
            ``intensity_prob`` (probabilities and magnitudes; 0 disables one).
        conditioning: ``{targets, constraints, dose_scale_gy}`` of the protocol: adds the
            plan's conditioning vector (:mod:`vmatdose.data.conditioning`); ``None``: none.
    """
    augment = dict(augment or {})
    keys = _volume_keys(signed_distance, with_dose)
    steps: list = [
        LoadCased(structures, dose_scale_gy),
        EnsureTyped([k for k in keys if k != "sdf"], dtype=torch.float32, track_meta=False,
                    allow_missing_keys=True),
        ScaleIntensityRanged("ct", a_min=ct_window[0], a_max=ct_window[1], b_min=0.0,
                             b_max=1.0, clip=True),
    ]
    if signed_distance:
        steps.append(SignedDistanced(sdf_scale_mm))
    if train:
        steps += _augmentations(keys, structures, lr_pairs, augment)
    if train and patch_size:
        steps += [SpatialPadd(keys, spatial_size=list(patch_size)),
                  RandSpatialCropd(keys, roi_size=list(patch_size), random_size=False)]
    elif train:
        # Evaluation keeps the case's grid; the model pads and crops itself at inference.
        steps.append(DivisiblePadd(keys, k=divisible_by, mode="constant"))
    image_parts = ["ct", "masks"] + (["sdf"] if signed_distance else [])
    steps += [
        # Random MONAI transforms hand back MetaTensors; plain tensors from here on.
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ConcatItemsd(image_parts, name="image", dim=0),
        *([ConditionChanneld(**conditioning)] if conditioning else []),
        DeleteItemsd(["ct", "path"] + (["sdf"] if signed_distance else [])),
        EnsureTyped("spacing_mm", dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def _augmentations(keys: list[str], structures: Sequence[str],
                   lr_pairs: Sequence[Sequence[str]], augment: Mapping) -> list:
    steps: list = []
    if augment.get("flip_lr", 0) > 0:
        steps.append(RandFlipLeftRightd(keys, list(structures), lr_pairs,
                                        prob=augment["flip_lr"]))
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
