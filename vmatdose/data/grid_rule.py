"""The rule that put a data set's cases on their voxel grid, so a case that comes by another
route (a clinic's DICOM) can be put on the grid its training data would have given it.

OpenKBP's arrays are 128 voxels across the CT's field of view (the 512 x 512 CT averaged
by four: in-plane spacing = CT pixel x 4) and keep the CT's slices, so their in-plane
spacing follows the patient's size (3.5-5.5 mm) and a model trained on them has learnt
patients that fill its box. The same patient from DICOM at 1.2 mm put on the training
median instead (3.906 mm) is another image to the network: 1.2-2.2 Gy mean difference on
off-median patients (``experiments/route_invariance.md``). A :class:`GridRule` says how
the training cases' grid follows from the CT; :func:`training_grid_rule` finds the rule
of a set of case files from their source (``meta["source"]``, as
:mod:`~vmatdose.data.body_region` does for the body), the checkpoint records it, and the
predictor and ``predict dicom_dir=`` put a DICOM case on :meth:`GridRule.spacing_for`
its CT (recorded as ``meta["source_grids"]["ct"]``). Data without a rule (DICOM cases on one training spacing, phantoms) have the
empty rule: the training spacing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmatdose.data.case import read_case_header


@dataclass(frozen=True)
class GridRule:
    """How a case's grid follows from its CT.

    Attributes:
        field_of_view_voxels: ``N``: in-plane spacing = the CT's in-plane field of view
            (columns x pixel spacing, rows x pixel spacing; mm) / ``N``, slices those of the
            CT; ``None``: no rule (one training spacing).
    """

    field_of_view_voxels: int | None = None

    @property
    def follows_ct(self) -> bool:
        return self.field_of_view_voxels is not None

    def spacing_for(self, ct_shape: Sequence[int], ct_spacing_mm: Sequence[float]
                    ) -> tuple[float, float, float] | None:
        """``(dz, dy, dx)`` mm for a CT of ``ct_shape`` (Z, Y, X) voxels at
        ``ct_spacing_mm`` (dz, dy, dx); ``None`` without a rule."""
        if self.field_of_view_voxels is None:
            return None
        n = float(self.field_of_view_voxels)
        return (float(ct_spacing_mm[0]), ct_shape[1] * float(ct_spacing_mm[1]) / n,
                ct_shape[2] * float(ct_spacing_mm[2]) / n)

    def to_dict(self) -> dict:
        return {} if self.field_of_view_voxels is None else \
            {"field_of_view_voxels": int(self.field_of_view_voxels)}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> GridRule:
        voxels = (data or {}).get("field_of_view_voxels")
        return cls(None if voxels is None else int(voxels))

    def describe(self) -> str:
        if self.field_of_view_voxels is None:
            return "one training spacing"
        return (f"in-plane the CT's field of view / {self.field_of_view_voxels}, "
                "the CT's own slices")


#: OpenKBP: 128 voxels across the CT's field of view.
OPENKBP = GridRule(field_of_view_voxels=128)
#: ``meta["source"]`` -> the rule its cases were made by (others: no rule).
BY_SOURCE = {"openkbp": OPENKBP}


def grid_rule_of(meta: Mapping) -> GridRule:
    """The rule a case was made by, from its ``meta["source"]``."""
    return BY_SOURCE.get(str(meta.get("source")), GridRule())


def training_grid_rule(paths: Iterable[str | Path]) -> GridRule:
    """The rule every case file of ``paths`` shares (headers only); no rule when they were
    made by different rules (then one training spacing is all that is common)."""
    rules = {grid_rule_of(read_case_header(p).meta) for p in paths}
    return rules.pop() if len(rules) == 1 else GridRule()

