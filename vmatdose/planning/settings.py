"""Planning settings: the dose grid, bixels, sparsity, objective weights and limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from vmatdose.config_schema import PlanningConfig
from vmatdose.errors import InputError
from vmatdose.planning.mlc import pairs_per_row

NORMALISATIONS = ("d95", "median", "none")


@dataclass(frozen=True)
class PlanSettings:
    """How a case is planned (``planning`` in ``conf/plan.yaml``).

    Attributes:
        dose_grid_mm: isotropic resolution of the dose grid the engine computes on (mm);
            ``None``: the case grid. The deliverable dose is resampled to the case grid.
        bixel_width_mm: bixel (beamlet) width in the isocentre plane (mm).
        sparsity_cutoff: relative dose (0-1 of a bixel's maximum) below which the dose
            influence matrix keeps only a random sample of entries (the engine's
            ``dij_sampling.rel_dose_threshold``): higher is sparser, lighter and faster.
        lateral_cutoff_mm: the pencil-beam kernel's geometric lateral cut-off (mm).
        max_iter: iteration cap of the first (mimicking) stage (the engine's L-BFGS-B).
        target_weight, oar_weight, body_weight: priorities of the voxel-wise mimicking
            objectives (squared deviation from the prediction) in targets, organs at risk
            and the rest of the body.
        constraint_weight: priority of the penalties built from the protocol's clinical
            constraints (:mod:`.objectives`).
        criteria_weight: priority of the criteria terms of the second stage
            (:mod:`.refinement`); 0 skips the stage.
        criteria_margin: how far inside each criterion the second stage aims (fraction
            of its dose: V95 % aims at 95 % x (1 + margin) of the prescription, Dmax < L
            at L x (1 - margin)).
        criteria_max_iter: iteration cap of the second stage.
        segment_max_iter: iteration cap of the segment-weight stage after sequencing.
        smoothing_weight: priority of the fluence-smoothness term of the second stage.
        leaf_width_mm: MLC leaf width in the isocentre plane (mm); the bixel width must
            be a whole multiple of it.
        intensity_levels: levels the fluence is quantised into for sequencing.
        max_segments_per_beam: segments a beam may have at most.
        min_segment_mu: monitor units (per fraction) a segment must have at least.
        min_segment_bixels: open bixels a segment must have at least.
        mu_per_weight: monitor units one unit of bixel weight stands for, over the whole
            treatment (the engine's generic machine has no calibration of its own).
        normalisation: ``d95`` (the primary target's D95 set to ``normalisation_percent``
            % of its prescription), ``median`` (its median set so) or ``none``.
        normalisation_percent: see ``normalisation``.
        memory_limit_gb: a case whose estimated peak memory exceeds this is refused
            before any optimisation starts.
        progress: show progress bars (the engine's per-beam bars and the case loop).
    """

    # The defaults are the config schema's (written once, there).
    dose_grid_mm: float | None = PlanningConfig.dose_grid_mm
    bixel_width_mm: float = PlanningConfig.bixel_width_mm
    sparsity_cutoff: float = PlanningConfig.sparsity_cutoff
    lateral_cutoff_mm: float = PlanningConfig.lateral_cutoff_mm
    max_iter: int = PlanningConfig.max_iter
    target_weight: float = PlanningConfig.target_weight
    oar_weight: float = PlanningConfig.oar_weight
    body_weight: float = PlanningConfig.body_weight
    constraint_weight: float = PlanningConfig.constraint_weight
    criteria_weight: float = PlanningConfig.criteria_weight
    criteria_margin: float = PlanningConfig.criteria_margin
    criteria_max_iter: int = PlanningConfig.criteria_max_iter
    segment_max_iter: int = PlanningConfig.segment_max_iter
    smoothing_weight: float = PlanningConfig.smoothing_weight
    leaf_width_mm: float = PlanningConfig.leaf_width_mm
    intensity_levels: int = PlanningConfig.intensity_levels
    max_segments_per_beam: int = PlanningConfig.max_segments_per_beam
    min_segment_mu: float = PlanningConfig.min_segment_mu
    min_segment_bixels: int = PlanningConfig.min_segment_bixels
    mu_per_weight: float = PlanningConfig.mu_per_weight
    normalisation: str = PlanningConfig.normalisation
    normalisation_percent: float = PlanningConfig.normalisation_percent
    memory_limit_gb: float = PlanningConfig.memory_limit_gb
    progress: bool = PlanningConfig.progress

    def __post_init__(self) -> None:
        positive = {"bixel_width_mm": self.bixel_width_mm,
                    "lateral_cutoff_mm": self.lateral_cutoff_mm,
                    "max_iter": self.max_iter, "memory_limit_gb": self.memory_limit_gb,
                    "criteria_max_iter": self.criteria_max_iter,
                    "segment_max_iter": self.segment_max_iter,
                    "leaf_width_mm": self.leaf_width_mm, "intensity_levels": self.intensity_levels,
                    "max_segments_per_beam": self.max_segments_per_beam,
                    "min_segment_bixels": self.min_segment_bixels,
                    "mu_per_weight": self.mu_per_weight,
                    "normalisation_percent": self.normalisation_percent}
        if self.dose_grid_mm is not None:
            positive["dose_grid_mm"] = self.dose_grid_mm
        for key, value in positive.items():
            if not value > 0:
                raise InputError(f"planning.{key} must be > 0, got {value}")
        if not 0.0 < self.sparsity_cutoff < 1.0:
            raise InputError(f"planning.sparsity_cutoff must be in (0, 1), got "
                             f"{self.sparsity_cutoff}")
        pairs_per_row(self.bixel_width_mm, self.leaf_width_mm)
        if self.normalisation not in NORMALISATIONS:
            raise InputError(f"planning.normalisation must be one of {NORMALISATIONS}, got "
                             f"{self.normalisation!r}")
        if not 0.0 <= self.criteria_margin < 0.5:
            raise InputError(f"planning.criteria_margin must be in [0, 0.5), got "
                             f"{self.criteria_margin}")
        for key in ("target_weight", "oar_weight", "body_weight", "constraint_weight",
                    "criteria_weight", "smoothing_weight", "min_segment_mu"):
            if getattr(self, key) < 0:
                raise InputError(f"planning.{key} must be >= 0, got {getattr(self, key)}")

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> PlanSettings:
        """From the ``planning`` config mapping; an unknown key is an error naming it."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise InputError(f"planning: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**cfg)
