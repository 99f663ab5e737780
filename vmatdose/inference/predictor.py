"""A trained model applied to case files: doses in Gy on each case's own grid.

:class:`Predictor` is built once from a checkpoint and owns the module, its device, the
input transforms the model was trained with, the checks of a case against the
checkpoint's contract (protocol, structures, required targets, voxel spacing) and the
resampling of a case off the training spacing; the whole-volume inference itself (window,
pooling, TTA, upsampling, zeroing) is the module's
:class:`~vmatdose.inference.volume.VolumeInference`, run once per case.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from vmatdose.config_schema import (
    ConfigValueError,
    check_dose_bound,
    tta_pool_grids_problem,
    unknown_organ_problem,
)
from vmatdose.data.body_region import body_mismatch
from vmatdose.data.case import Case, load_case
from vmatdose.data.ingest.training_grid import full_target_grid, source_ct_grid
from vmatdose.data.pipeline import inference_transform
from vmatdose.data.prior import cap_organs, floor_targets, scale_organs, stretch_targets
from vmatdose.data.resample import Grid, resample_case, resample_case_onto, resample_volume
from vmatdose.data.validation import SPACING_TOLERANCE, check_cases
from vmatdose.inference.checkpoint import CheckpointContract, CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

#: What to do with a case whose spacing is off the training spacing by more than 10 %;
#: ``training_grid``: resample every case not at the training median spacing (a model
#: trained on mixed spacings then predicts on one grid whatever the route).
SPACING_POLICIES = ("resample", "refuse", "training_grid")
#: the policy of ``predict``, ``evaluate`` and ``plan`` unless one is chosen: each case on its
#: own grid within the training range (``training_grid``, one grid whatever the route, cost
#: an OpenKBP model 0.24 Gy of dose score: experiments/route_invariance.md)
DEFAULT_SPACING_POLICY = "resample"


#: The model's inference settings ``predict`` and ``evaluate`` may replace for a checkpoint
#: (``<name>=``; ``None``: the checkpoint's own): :meth:`Predictor.from_checkpoint`'s keywords.
CHECKPOINT_OVERRIDES = ("target_dose_floor", "oar_dose_ceiling", "oar_dose_scale",
                        "target_dose_stretch", "tta_pool_grids")


@dataclass
class Prediction:
    """One case's predicted dose: ``dose_gy`` and ``std_gy`` (generative ensembles, else
    ``None``) are (Z, Y, X) float32 in Gy on ``case``'s grid."""

    case: Case
    path: Path
    dose_gy: np.ndarray
    std_gy: np.ndarray | None


def resolve_device(accelerator: str = "auto") -> torch.device:
    """``cuda`` for ``gpu``/``cuda``, or ``auto`` with a GPU present; else ``cpu``."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def predict_image(module: torch.nn.Module, image: torch.Tensor, body: torch.Tensor | None,
                  zero: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's whole-volume inference (``module.inference``) on its device: image
    (B, C, Z, Y, X) and body (B, 1, Z, Y, X) -> (mean, std or ``None``), (B, 1, Z, Y, X)
    float32 on the CPU, normalised by the dose scale; ``zero=False`` leaves the zeroing
    outside the body to the caller (a prediction resampled to another grid)."""
    device = next(module.parameters()).device
    image = image.to(device)
    body = body.to(device) if body is not None else None
    inference = module.inference
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        mean, std = inference.run(image, body, module.passes())
        if zero:
            mean, std = inference.zero_outside(mean, std, body)
    return mean.float().cpu(), (None if std is None else std.float().cpu())


class Predictor:
    """Predict doses for case files with one trained model.

    Args:
        module: a vmatdose LightningModule in eval mode.
        contract: the checkpoint contract it was trained under.
        spacing_mismatch: ``resample`` (a case more than 10 % off the training spacing is
            resampled to the training median, predicted, and the dose resampled back onto
            the case's grid), ``refuse`` (such a case is an error) or ``training_grid``
            (every case not at the training median spacing is resampled: the same patient
            is predicted on the same grid whether it comes at 1.2 mm or at 5.4 mm). With
            ``resample``, a DICOM case of a model whose training data follow a grid rule
            (OpenKBP's) is predicted on the grid the rule gives its CT
            (:meth:`on_training_grid`); ``refuse`` refuses a case file off the training
            range first (``predict dicom_dir=`` ingests onto the rule's grid, in range).
    """

    def __init__(self, module: torch.nn.Module, contract: CheckpointContract,
                 spacing_mismatch: str = DEFAULT_SPACING_POLICY):
        if spacing_mismatch not in SPACING_POLICIES:
            raise ValueError(f"spacing_mismatch must be one of {SPACING_POLICIES}, "
                             f"not {spacing_mismatch!r}")
        self.module = module
        self.contract = contract
        self.spacing_mismatch = spacing_mismatch
        self.protocol = contract.protocol_obj
        problem = unknown_organ_problem("oar_dose_scale", getattr(module, "oar_dose_scale", None),
                                        self.protocol.oars)
        if problem:
            raise ConfigValueError(f"oar_dose_scale={module.oar_dose_scale}: {problem}")
        self.spacing = contract.spacing_range
        self.transform: Compose = inference_transform(
            {**contract.inputs, "structures": contract.structures,
             "prescriptions_gy": self.protocol.prescriptions_gy,
             "beams": self.protocol.beams or None})

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, accelerator: str = "auto",
                        spacing_mismatch: str = DEFAULT_SPACING_POLICY,
                        target_dose_floor: float | None = None,
                        oar_dose_ceiling: float | None = None,
                        tta_pool_grids: int | None = None,
                        oar_dose_scale: float | None = None,
                        target_dose_stretch: float | None = None) -> Predictor:
        """Read ``ckpt_path`` (once) and rebuild its model on the chosen device; the
        inference settings of :data:`CHECKPOINT_OVERRIDES` given here replace the model's
        (``None``: the checkpoint's own)."""
        bounds = {name: check_dose_bound(name, value, name) for name, value in (
            ("target_dose_floor", target_dose_floor), ("oar_dose_ceiling", oar_dose_ceiling),
            ("oar_dose_scale", oar_dose_scale), ("target_dose_stretch", target_dose_stretch))}
        problem = tta_pool_grids_problem(tta_pool_grids) if tta_pool_grids is not None else None
        if problem:  # before the checkpoint is read; its grid is checked after
            raise ValueError(f"tta_pool_grids={tta_pool_grids!r}: {problem}")
        checkpoint = read_checkpoint(ckpt_path)
        module = checkpoint.build_module(resolve_device(accelerator))
        for name, value in bounds.items():
            if value is not None:
                setattr(module, name, value)
        if tta_pool_grids is not None:
            problem = tta_pool_grids_problem(tta_pool_grids, module.resolution_factor)
            if problem:  # a setting this checkpoint's network cannot use: one line, no trace
                raise CheckpointError(f"tta_pool_grids={tta_pool_grids!r} for {ckpt_path}: "
                                      f"{problem}")
            module.tta_pool_grids = tta_pool_grids
        return cls(module, checkpoint.contract, spacing_mismatch)

    def check(self, paths: Sequence[Path]) -> None:
        """Raise one :class:`~vmatdose.data.validation.CaseSetError` naming every case file
        that is unreadable, of another protocol or structure set, lacks a required target,
        or (``refuse``) is more than 10 % off the training spacing."""
        refuse = self.spacing if self.spacing_mismatch == "refuse" else None
        check_cases(paths, self.protocol, self.contract.structures, refuse,
                    what="not matching the checkpoint")

    def predict_all(self, paths: Sequence[Path]) -> Iterator[Prediction]:
        """:meth:`check` every case first, then yield their predictions in order."""
        paths = [Path(p) for p in paths]
        self.check(paths)
        for path in paths:
            yield self.predict(path)

    def predict(self, path: Path) -> Prediction:
        """The dose of one (checked) case file, on its own grid (the file read once).

        A case off the training spacing is resampled to the training median first
        (:func:`vmatdose.data.resample.resample_case`, in patient mm), so every input
        channel (the prior, SDFs) is computed on the grid the model was trained on; the
        dose comes back onto the case's grid (trilinear, in patient mm) and is zeroed
        outside the case's own body there. A case whose body is another kind of region
        than the training cases' (:mod:`vmatdose.data.body_region`) is predicted with a
        warning naming it."""
        case = load_case(path)
        mismatch = body_mismatch(case.meta, self.contract.body)
        if mismatch:
            log.warning("%s: %s", Path(path).name, mismatch)
        work = self.on_training_grid(case)
        sample = self.transform({"path": str(path), "case": work})
        # zeroed once, on the case's own grid (zeros would bleed into the interpolation)
        mean, std = predict_image(self.module, sample["image"][None], sample["body"][None],
                                  zero=work is case)
        scale = self.contract.dose_scale_gy
        dose, std_gy = (np.asarray(mean[0, 0]) * scale).astype(np.float32), \
            None if std is None else (np.asarray(std[0, 0]) * scale).astype(np.float32)
        # bounded on the grid the model predicts on, so both routes of one patient agree
        dose = self.floor_targets(work, self.stretch_targets(work, dose))
        dose = self.cap_organs(work, self.scale_organs(work, dose))
        if work is not case:
            dose, std_gy = self._back_on(case, work, dose, std_gy)
        return Prediction(case, Path(path), dose, std_gy)

    def _target_masks(self, case: Case) -> tuple[np.ndarray, list[float]]:
        """(T, Z, Y, X) bool masks of ``case``'s protocol targets (inside its body when the
        model zeroes outside it) and their prescriptions (Gy)."""
        targets = [t for t in self.protocol.prescriptions_gy if t in case.structures]
        inside = (np.asarray(case.body) > 0 if self.module.inference.zero_outside_body
                  else True)
        masks = np.stack([(case.mask(t) > 0) & inside for t in targets]) if targets else \
            np.zeros((0, *case.shape), bool)
        return masks, [self.protocol.prescriptions_gy[t] for t in targets]

    def stretch_targets(self, case: Case, dose_gy: np.ndarray) -> np.ndarray:
        """(Z, Y, X) ``dose_gy`` on ``case``'s grid stretched above the prescription inside
        its protocol targets by ``module.target_dose_stretch`` (:func:`stretch_targets`);
        as is when that is ``None`` (see :meth:`floor_targets` for the grid)."""
        factor = getattr(self.module, "target_dose_stretch", None)
        if factor is None:
            return dose_gy
        return stretch_targets(dose_gy, *self._target_masks(case), factor)

    def floor_targets(self, case: Case, dose_gy: np.ndarray) -> np.ndarray:
        """(Z, Y, X) ``dose_gy`` on ``case``'s grid raised inside each of its protocol
        targets to at least ``module.target_dose_floor`` x its prescription (Gy); as is
        when that is ``None``. Outside the body nothing is raised when the model zeroes
        there. :meth:`predict` floors on the grid the model predicts on (a case off the
        training spacing: the training grid, before the dose goes back onto the case's)."""
        fraction = getattr(self.module, "target_dose_floor", None)
        if fraction is None:
            return dose_gy
        masks, levels = self._target_masks(case)
        return floor_targets(dose_gy, masks, [fraction * level for level in levels])

    def scale_organs(self, case: Case, dose_gy: np.ndarray) -> np.ndarray:
        """(Z, Y, X) ``dose_gy`` on ``case``'s grid times ``module.oar_dose_scale`` inside
        each of its protocol organs at risk (one factor, or one per organ named; the others
        kept), outside its targets; as is when that is ``None`` (see :meth:`floor_targets`
        for the grid)."""
        factor = getattr(self.module, "oar_dose_scale", None)
        per_organ = factor if isinstance(factor, Mapping) else None
        organs = [o for o in self.protocol.oars if o in case.structures
                  and (per_organ is None or o in per_organ)]
        if factor is None or not organs:
            return dose_gy
        factors = [per_organ[o] for o in organs] if per_organ is not None else factor
        return scale_organs(dose_gy, np.stack([case.mask(o) > 0 for o in organs]), factors,
                            keep=self._targets(case))

    def _targets(self, case: Case) -> np.ndarray:
        """(Z, Y, X) bool: inside any of ``case``'s protocol targets (as
        :meth:`_target_masks` gives them)."""
        return self._target_masks(case)[0].any(axis=0)

    def cap_organs(self, case: Case, dose_gy: np.ndarray) -> np.ndarray:
        """(Z, Y, X) ``dose_gy`` on ``case``'s grid lowered inside each of its organs with a
        maximum-dose limit in the protocol to at most ``module.oar_dose_ceiling`` x that
        limit (Gy), outside its targets; as is when that is ``None`` (see
        :meth:`floor_targets` for the grid)."""
        fraction = getattr(self.module, "oar_dose_ceiling", None)
        if fraction is None:
            return dose_gy
        limits = {o: v for o, v in self.protocol.max_dose_limits_gy.items()
                  if o in case.structures}
        if not limits:
            return dose_gy
        return cap_organs(dose_gy, np.stack([case.mask(o) > 0 for o in limits]),
                          [fraction * v for v in limits.values()], self._targets(case))

    def on_training_grid(self, case: Case) -> Case:
        """The case on the grid the model predicts it on: for a case from DICOM (its source
        CT recorded) of a model whose training data follow a grid rule, the spacing that
        rule gives its CT, over the CT's whole field of view (an OpenKBP model: 128 voxels
        across it, the CT's slices: the image the challenge arrays would have made of the
        patient, also from a case cropped to its body); otherwise
        ``case`` itself within 10 % of the training spacing (``training_grid``: at the
        training median spacing), else resampled to the training median spacing."""
        median = np.asarray(self.spacing.median_mm, float)
        by_rule = self.rule_grid(case)
        if by_rule is not None and self.spacing_mismatch != "training_grid":
            own = Grid.of(case)
            if own.shape == by_rule.shape and np.allclose(own.spacing_mm, by_rule.spacing_mm) \
                    and np.allclose(own.origin_mm, by_rule.origin_mm, atol=1e-3):
                return case
            return resample_case_onto(case, by_rule)
        if self.spacing_mismatch == "training_grid":
            if np.allclose(case.spacing_mm, median, rtol=1e-3):
                return case
        elif self.spacing.contains(case.spacing_mm, SPACING_TOLERANCE):
            return case
        return resample_case(case, self.spacing.median_mm)

    def rule_grid(self, case: Case) -> Grid | None:
        """The grid the training data's rule gives a DICOM case: its source CT's whole
        field of view at the rule's spacing (``None``: no rule, or no recorded CT)."""
        rule = self.contract.grid_rule_obj
        geometry = (case.meta.get("source_grids") or {}).get("ct")
        if not rule.follows_ct or not geometry:
            return None
        ct = source_ct_grid(geometry)
        full = full_target_grid(ct, rule.spacing_for(ct.shape, ct.spacing_mm))
        if not self.spacing.contains(full.spacing_mm, SPACING_TOLERANCE):
            log.warning("%s: the training data's grid rule (%s) gives this CT %s mm, more "
                        "than 10 %% off the training spacings (%s to %s mm): predicted "
                        "there all the same, as its challenge arrays would have been",
                        case.case_id, rule.describe(),
                        " x ".join(f"{v:.3g}" for v in full.spacing_mm),
                        self.spacing.low_mm, self.spacing.high_mm)
        return Grid(full.shape, full.spacing_mm, full.origin_mm)

    def _back_on(self, case: Case, work: Case, dose_gy: np.ndarray, std_gy: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """(Z, Y, X) dose and std (or ``None``) on ``work``'s grid -> ``case``'s grid
        (trilinear in patient mm), then zeroed outside its body by the module's inference
        (:meth:`~vmatdose.inference.volume.VolumeInference.zero_outside`), once."""
        def back(volume: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(resample_volume(volume, Grid.of(work), Grid.of(case))
                                    .astype(np.float32))[None, None]
        mean, std = self.module.inference.zero_outside(
            back(dose_gy), None if std_gy is None else back(std_gy),
            torch.from_numpy(np.asarray(case.body))[None, None])
        return mean[0, 0].numpy(), None if std is None else std[0, 0].numpy()
