"""The beams a case is planned with: its recorded arrangement, or its protocol's default."""

from __future__ import annotations

import numpy as np

from vmatdose.data.beams import BeamArrangement, default_arrangement, targets_centroid_mm
from vmatdose.data.case import Case
from vmatdose.errors import InputError
from vmatdose.protocol import Protocol


def case_targets(case: Case) -> list[str]:
    """The case's prescribed structures that have voxels, highest prescription first."""
    ranked = sorted(case.prescriptions_gy.items(), key=lambda kv: -kv[1])
    return [name for name, _ in ranked if case.has_structure(name) and case.mask(name).any()]


def case_arrangement(case: Case, protocol: Protocol) -> BeamArrangement:
    """``meta["beams"]`` when the case records one, else the protocol's default beams
    around the centroid of the case's targets. ``InputError`` naming the case when neither
    can be had."""
    if case.meta.get("beams"):
        try:
            return BeamArrangement.from_meta(case.meta["beams"])
        except ValueError as err:
            raise InputError(f"case {case.case_id!r}: {err}") from err
    if not protocol.beams:
        raise InputError(f"case {case.case_id!r} records no beams and protocol "
                         f"{protocol.name!r} has no default 'beams'")
    targets = case_targets(case)
    if not targets:
        raise InputError(f"case {case.case_id!r} has no target voxels: nothing to plan")
    masks = np.stack([case.mask(t) for t in targets])
    return default_arrangement(protocol.beams,
                               targets_centroid_mm(masks, case.spacing_mm, case.origin_mm))
