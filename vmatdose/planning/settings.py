"""Planning settings: the dose grid, bixels, sparsity, objective weights and limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from vmatdose.config_schema import PlanningConfig
from vmatdose.errors import InputError


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
        max_iter: iteration cap of the fluence optimiser (L-BFGS-B).
        target_weight, oar_weight, body_weight: priorities of the voxel-wise mimicking
            objectives (squared deviation from the prediction) in targets, organs at risk
            and the rest of the body.
        constraint_weight: priority of the penalties built from the protocol's clinical
            constraints (:mod:`.objectives`).
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
    memory_limit_gb: float = PlanningConfig.memory_limit_gb
    progress: bool = PlanningConfig.progress

    def __post_init__(self) -> None:
        positive = {"bixel_width_mm": self.bixel_width_mm,
                    "lateral_cutoff_mm": self.lateral_cutoff_mm,
                    "max_iter": self.max_iter, "memory_limit_gb": self.memory_limit_gb}
        if self.dose_grid_mm is not None:
            positive["dose_grid_mm"] = self.dose_grid_mm
        for key, value in positive.items():
            if not value > 0:
                raise InputError(f"planning.{key} must be > 0, got {value}")
        if not 0.0 < self.sparsity_cutoff < 1.0:
            raise InputError(f"planning.sparsity_cutoff must be in (0, 1), got "
                             f"{self.sparsity_cutoff}")
        for key in ("target_weight", "oar_weight", "body_weight", "constraint_weight"):
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
