"""The case -> sample pipeline: which steps of :mod:`vmatdose.data.transforms` (and
MONAI's) run, in which order, for training, evaluation and inference.

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
(:class:`~vmatdose.data.transforms.UnpackMasks`) and :func:`assemble_batch` casts and
concatenates per batch.

The stages, in order: loading and input channels, resolution pooling, compact storage,
training augmentation and patches, final assembly (the float ``image``, or the compact
sample's last casts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    DivisiblePadd,
    EnsureTyped,
    RandFlipd,
    RandRotated,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SpatialPadd,
    Zoomd,
)

from vmatdose.config_schema import CT_WINDOW_HU, SDF_SCALE_MM
from vmatdose.data.conditioning import ConditionChanneld
from vmatdose.data.input_spec import InputSpec, prior_sectors
from vmatdose.data.prior import PriorDosed
from vmatdose.data.transforms import (
    Compactd,
    LoadCased,
    MaskMeand,
    PoolGridsd,
    PoolSpacingd,
    RandDoseCropd,
    RandFlipLeftRightd,
    SignedDistanced,
    UnpackMasks,
)

PATCH_SAMPLING = ("uniform", "dose")


@dataclass(frozen=True)
class InputSettings:
    """What a sample holds: its input channels and the reference dose.

    Attributes:
        structures: the mask (and SDF) channels, in order; a structure a case lacks is an
            all-zero channel.
        dose_scale_gy: dose and prior are divided by it.
        ct_window: HU mapped linearly to [0, 1], clipped.
        signed_distance: add one signed-distance channel per structure (mm divided by
            ``sdf_scale_mm``, clipped to [-1, 1]).
        prior_dose: the ``data.prior_dose`` config of the prior-dose channel
            (:class:`vmatdose.data.prior.PriorDosed`); needs ``prescriptions_gy``.
            ``None``: no prior channel.
        conditioning: ``{targets, constraints, dose_scale_gy}`` of the protocol: adds the
            plan's conditioning vector (:mod:`vmatdose.data.conditioning`); ``None``: none.
        default_beams: the protocol's beam arrangement for cases without their own (the
            beam prior's).
        with_dose: read the reference dose (``False`` for cases to predict).
    """

    structures: Sequence[str]
    dose_scale_gy: float
    ct_window: Sequence[float] = CT_WINDOW_HU
    signed_distance: bool = False
    sdf_scale_mm: float = SDF_SCALE_MM
    prior_dose: Mapping | None = None
    prescriptions_gy: Mapping[str, float] | None = None
    conditioning: Mapping | None = None
    default_beams: Mapping | None = None
    with_dose: bool = True

    def __post_init__(self) -> None:
        if self.prior and not self.prescriptions_gy:
            raise ValueError("prior_dose needs prescriptions_gy")

    @property
    def prior(self) -> bool:
        return self.prior_dose is not None

    @property
    def volume_keys(self) -> list[str]:
        """The sample's volumes: ``ct``, ``masks``, ``body``, (``sdf``), (``prior``),
        (``dose``)."""
        return ["ct", "masks", "body", *(["sdf"] if self.signed_distance else []),
                *(["prior"] if self.prior else []), *(["dose"] if self.with_dose else [])]

    @property
    def image_keys(self) -> list[str]:
        """The volumes concatenated, in order, into the ``image``."""
        return InputSpec.build(self.structures, self.signed_distance, self.prior).volume_keys

    @property
    def prior_lr_permutation(self) -> list[int] | None:
        """``prior`` channel order after a left/right mirror (its gantry sectors swap),
        ``None`` without sectors."""
        sectors = prior_sectors(self.prior_dose)
        if not sectors:
            return None
        return InputSpec.build((), prior=True, prior_sectors=sectors).block_lr_permutation("prior")


#: Volumes a rotation interpolates (bilinear); the masks and the body are taken from the
#: nearest voxel, so they stay what they were (binary, or pooled fractions).
SMOOTH_KEYS = ("ct", "dose", "sdf", "prior")


@dataclass(frozen=True)
class SamplingSettings:
    """How training samples are drawn: augmentation, then a random patch or the whole
    volume padded.

    Attributes:
        patch_size: (Z, Y, X) random crop; ``None`` trains on whole volumes.
        divisible_by: whole volumes are padded so a U-Net's down-samplings divide them.
        lr_pairs: (left, right) structures whose channels swap on a left/right mirror.
        augment: ``flip_lr``, ``flip_ap``, ``flip_si`` (mirror probabilities: left/right
            with paired channels swapped, anterior/posterior, superior/inferior),
            ``rotate_deg``, ``rotate_prob``, ``intensity_shift``, ``intensity_prob``
            (probabilities and magnitudes; 0 or absent disables one); ``pool_grids``
            (with ``resolution_factor`` f > 1 and the device cache: each training case
            pooled on that many of the f^3 grids, one drawn per case and batch).
        patch_sampling: ``uniform`` or ``dose`` (``dose_patch_fraction`` of the patches
            centred on voxels with dose >= ``dose_patch_threshold`` x the highest
            prescription, see :class:`~vmatdose.data.transforms.RandDoseCropd`).
    """

    patch_size: Sequence[int] | None = None
    divisible_by: int = 16
    lr_pairs: Sequence[Sequence[str]] = ()
    augment: Mapping | None = None
    patch_sampling: str = "uniform"
    dose_patch_fraction: float = 0.8
    dose_patch_threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.patch_sampling not in PATCH_SAMPLING:
            raise ValueError(f"patch_sampling must be one of {PATCH_SAMPLING}, "
                             f"got {self.patch_sampling!r}")


def check_sector_augment(inputs: InputSettings, training: SamplingSettings) -> None:
    """Refuse augmentations that move gantry angles off the prior's sectors: an
    anterior/posterior mirror (g becomes 180 - g) and rotations about z. A left/right
    mirror swaps sectors exactly; a superior/inferior one leaves coplanar beams as they are."""
    if not prior_sectors(inputs.prior_dose):
        return
    augment = dict(training.augment or {})
    for key in ("flip_ap", "rotate_prob"):
        if augment.get(key, 0) > 0:
            raise ValueError(f"data.augment.{key}={augment[key]} would move the beams off the "
                             "prior's gantry sectors (data.prior_dose.beam_sectors): set it "
                             "to 0 or beam_sectors to 0")


def build_transforms(inputs: InputSettings, training: SamplingSettings | None = None, *,
                     resolution_factor: int = 1, compact: bool = False,
                     pool_grids: int = 1) -> Compose:
    """The whole case -> sample pipeline (sample keys: the module docstring).

    Args:
        inputs: what the sample holds.
        training: augmentation and random patches (training split only); ``None``:
            the case's own grid, nothing random.
        resolution_factor: average-pool every volume by this integer factor (MONAI
            ``Zoomd``, ``mode="area"``); spacing grows by it; the dose becomes the mean
            over the body part of each coarse voxel
            (:class:`~vmatdose.data.transforms.MaskMeand`).
        compact: stop before the float ``image`` (see the module docstring).
        pool_grids: > 1 pools every volume on that many grids, each volume stacked to
            (G, C, Z/f, Y/f, X/f) (:class:`~vmatdose.data.transforms.PoolGridsd`; the
            device cache's training samples, ``data.augment.pool_grids``).
    """
    if inputs.conditioning and (compact or inputs.prior):
        # the conditioning planes are appended to the float image, which compact samples
        # build per batch, and the prior must stay the image's last channel
        raise ValueError("model.conditioning needs data.compact=false and no data.prior_dose")
    keys = inputs.volume_keys
    steps = _input_steps(inputs, keys) + _pooling_steps(keys, resolution_factor, pool_grids)
    if compact:
        steps += _compact_steps(keys, len(inputs.structures), pooled=resolution_factor > 1)
    if training is not None:
        check_sector_augment(inputs, training)
        steps += _augmentation_steps(keys, inputs, training)
        steps += _patch_steps(keys, training, inputs.with_dose)
    steps += _compact_ending(keys) if compact else _image_steps(keys, inputs)
    return Compose(steps)


def _input_steps(inputs: InputSettings, keys: list[str]) -> list:
    """Read the case, (the prior, from the CT in HU), the CT window, (the SDFs)."""
    prior = (PriorDosed(inputs.structures, inputs.prescriptions_gy, inputs.dose_scale_gy,
                        inputs.prior_dose, inputs.default_beams) if inputs.prior else None)
    steps: list = [
        LoadCased(inputs.structures, inputs.dose_scale_gy,
                  with_geometry=prior is not None and prior.kind == "beams"),
        EnsureTyped([k for k in keys if k not in ("sdf", "prior")], dtype=torch.float32,
                    track_meta=False, allow_missing_keys=True),
        # before the CT window: the beam prior traces the CT in HU
        *([prior] if prior is not None else []),
        ScaleIntensityRanged("ct", a_min=inputs.ct_window[0], a_max=inputs.ct_window[1],
                             b_min=0.0, b_max=1.0, clip=True),
    ]
    if inputs.signed_distance:
        steps.append(SignedDistanced(inputs.sdf_scale_mm))
    return steps


def _pooling_steps(keys: list[str], factor: int, grids: int = 1) -> list:
    """Average-pool the volumes by ``factor`` (none for 1), on ``grids`` grids when > 1."""
    if factor <= 1:
        if grids > 1:
            raise ValueError(f"{grids} pooling grids without pooling (resolution factor 1)")
        return []
    pool = (PoolGridsd(keys, factor, grids) if grids > 1
            else Zoomd(keys, zoom=1.0 / factor, mode="area", keep_size=False))
    return [pool, MaskMeand(), PoolSpacingd(factor)]


def _compact_steps(keys: list[str], n_masks: int, pooled: bool) -> list:
    """Cast to the cache dtypes; binary masks are packed for the cache and unpacked
    after it (pooled masks are fractions: float16, not packed)."""
    steps: list = [Compactd(keys, torch.float16 if pooled else torch.uint8,
                            pack_masks=not pooled)]
    if not pooled:
        steps.append(UnpackMasks(n_masks))
    return steps


def _augmentation_steps(keys: list[str], inputs: InputSettings,
                        training: SamplingSettings) -> list:
    """The random mirrors, rotation and CT shift that ``training.augment`` switches on."""
    augment = dict(training.augment or {})
    steps: list = []
    if augment.get("flip_lr", 0) > 0:
        steps.append(RandFlipLeftRightd(keys, list(inputs.structures), training.lr_pairs,
                                        prob=augment["flip_lr"],
                                        prior_permutation=inputs.prior_lr_permutation))
    for name, axis in (("flip_ap", 1), ("flip_si", 0)):  # spatial axes of (Z, Y, X)
        if augment.get(name, 0) > 0:
            steps.append(RandFlipd(keys, prob=augment[name], spatial_axis=axis))
    if augment.get("rotate_deg", 0) > 0 and augment.get("rotate_prob", 0) > 0:
        angle = np.deg2rad(augment["rotate_deg"])
        # Rotation about z (the axial plane), the way a patient lies rotated on the couch.
        modes = ["bilinear" if k in SMOOTH_KEYS else "nearest" for k in keys]
        steps.append(RandRotated(keys, range_x=angle, prob=augment["rotate_prob"],
                                 mode=modes, padding_mode="border", keep_size=True))
    if augment.get("intensity_shift", 0) > 0 and augment.get("intensity_prob", 0) > 0:
        steps.append(RandShiftIntensityd("ct", offsets=augment["intensity_shift"],
                                         prob=augment["intensity_prob"]))
    return steps


def _patch_steps(keys: list[str], training: SamplingSettings, with_dose: bool) -> list:
    """A random ``patch_size`` patch (dose-centred or uniform), or the whole volume
    padded to ``divisible_by``."""
    if not training.patch_size:
        # Evaluation keeps the case's grid; the model pads and crops itself at inference.
        return [DivisiblePadd(keys, k=training.divisible_by, mode="constant")]
    size = list(training.patch_size)
    if training.patch_sampling == "dose" and with_dose:
        crop = RandDoseCropd(keys, training.patch_size, training.dose_patch_fraction,
                             training.dose_patch_threshold)
    else:
        crop = RandSpatialCropd(keys, roi_size=size, random_size=False)
    return [SpatialPadd(keys, spatial_size=size), crop]


def _compact_ending(keys: list[str]) -> list:
    """Plain tensors (random MONAI transforms hand back MetaTensors), no ``path``."""
    return [EnsureTyped(keys, track_meta=False), DeleteItemsd(["path"]),
            EnsureTyped("spacing_mm", dtype=torch.float32, track_meta=False)]


def _image_steps(keys: list[str], inputs: InputSettings) -> list:
    """Float32 volumes concatenated into ``image`` (then the conditioning planes); the
    image's parts other than the masks leave the sample."""
    image_parts = inputs.image_keys
    return [
        # Random MONAI transforms hand back MetaTensors; plain tensors from here on.
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ConcatItemsd(image_parts, name="image", dim=0),
        *([ConditionChanneld(**inputs.conditioning)] if inputs.conditioning else []),
        DeleteItemsd(["path"] + [k for k in image_parts if k != "masks"]),
        EnsureTyped("spacing_mm", dtype=torch.float32, track_meta=False),
    ]


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


def inference_transform(data_cfg: Mapping, with_dose: bool = False) -> Compose:
    """The case -> float ``image`` pipeline a trained model's inference needs, on the
    case's own grid, from its data config (``structures``, ``dose_scale_gy``,
    ``ct_window``, ``signed_distance``, ``sdf_scale_mm``, ``prior_dose``, ``beams``,
    ``prescriptions_gy``, ``conditioning``: a
    :func:`~vmatdose.data.conditioning.conditioning_spec`). Resolution pooling is the
    model's job at inference (``DoseModule.resolution_factor``), so it is not applied
    here."""
    return build_transforms(InputSettings(
        list(data_cfg["structures"]), float(data_cfg["dose_scale_gy"]),
        ct_window=list(data_cfg.get("ct_window", CT_WINDOW_HU)),
        signed_distance=bool(data_cfg.get("signed_distance", False)),
        sdf_scale_mm=float(data_cfg.get("sdf_scale_mm", SDF_SCALE_MM)),
        prior_dose=data_cfg.get("prior_dose"), prescriptions_gy=data_cfg.get("prescriptions_gy"),
        conditioning=data_cfg.get("conditioning"), default_beams=data_cfg.get("beams"),
        with_dose=with_dose))
