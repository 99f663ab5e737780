"""Two-way gamma: the gamma pass rate that noise cannot pass (validation, search objectives).

The reference gamma (:func:`vmatdose.metrics.gamma.gamma_index`, pymedphys semantics)
searches the *evaluated* dose, trilinearly interpolated between voxels, for a value close
to each reference voxel's dose. That is correct physics for a smooth evaluated dose (a
measured or calculated plan), but it rewards noise: an untrained network whose output
oscillates between neighbouring voxels crosses every reference value within 3 mm, so a
checkerboard of +-33 Gy around the reference passes 3 %/3 mm on 100 % of the voxels and
uniform 0-80 Gy noise on 66 % (OpenKBP grid, 2.5 x 3.9 x 3.9 mm) to 97 % (2.5 x 1.2 x 1.2
mm); ``experiments/validation_gamma.md`` has the table. Searching only the voxel centres
does not cure it on a fine grid: ~60 voxels lie within 3 mm of each voxel at 1.2 mm, and
one of them lands within 3 % of the reference by chance.

The two-way gamma also asks the converse: the reverse gamma takes the *prediction* as the
reference and searches the (smooth) reference dose, interpolated as usual, for a value
close to it. A voxel passes only when both gammas are <= 1. Noise fails the reverse search
wherever the reference does not itself span the noise within the distance criterion
(checkerboard: 3 % pass, uniform noise: 13 %), while a perfect prediction passes 100 % and
a shift below the distance criterion passes both ways (a 1.2 mm shift: 99.5 %).

Both directions are scored on the same voxels, the reference's evaluated set (reference
dose >= the cutoff, inside ``mask``), with the same global dose criterion (the reference
maximum unless ``global_normalisation`` is given). Local gamma is refused: the reverse
tolerance would be a percentage of the prediction, which a zero prediction makes zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vmatdose.metrics.gamma.api import ArrayLike, Backend, _as_numpy, gamma_index


@dataclass(frozen=True)
class TwoWayGamma:
    """Pass rates (%) over ``points`` evaluated voxels; NaN rates when ``points`` is 0.

    ``pass_percent``: both directions <= 1 (the validation number); ``forward_percent``:
    the reference gamma alone; ``reverse_percent``: the prediction-as-reference gamma alone.
    """

    pass_percent: float
    forward_percent: float
    reverse_percent: float
    points: int


def two_way_gamma(
    reference: ArrayLike,
    evaluated: ArrayLike,
    spacing_mm: Sequence[float],
    dose_percent: float = 3.0,
    distance_mm: float = 3.0,
    lower_percent_dose_cutoff: float = 10.0,
    local: bool = False,
    interp_fraction: float = 10,
    max_gamma: float | None = 2.0,
    global_normalisation: float | None = None,
    *,
    mask: ArrayLike | None = None,
    backend: Backend = "auto",
) -> TwoWayGamma:
    """Two-way gamma pass rates of ``evaluated`` (prediction) against ``reference``.

    Args:
        reference: reference dose (Z, Y, X) in Gy, numpy or torch.
        evaluated: predicted dose (Z, Y, X) in Gy on the same grid.
        spacing_mm, dose_percent, distance_mm, lower_percent_dose_cutoff, interp_fraction,
            max_gamma, global_normalisation, mask, backend: as for
            :func:`~vmatdose.metrics.gamma.gamma_index` (global gamma only).
        local: must be ``False`` (see the module docstring).

    Returns:
        :class:`TwoWayGamma` over the reference's evaluated voxels.
    """
    if local:
        raise ValueError("two_way_gamma is global only (local=True would scale the reverse "
                         "tolerance by the prediction, zero where the prediction is zero)")
    ref_np = _as_numpy(reference, "reference")
    norm = float(ref_np.max()) if global_normalisation is None else global_normalisation
    if not norm > 0:
        return TwoWayGamma(float("nan"), float("nan"), float("nan"), 0)
    criteria = dict(dose_percent=dose_percent, distance_mm=distance_mm,
                    interp_fraction=interp_fraction, max_gamma=max_gamma,
                    global_normalisation=norm, backend=backend)
    forward = _as_numpy(gamma_index(reference, evaluated, spacing_mm,
                                    lower_percent_dose_cutoff=lower_percent_dose_cutoff,
                                    mask=mask, **criteria), "forward gamma")
    scored = ~np.isnan(forward)
    reverse = _as_numpy(gamma_index(evaluated, reference, spacing_mm,
                                    lower_percent_dose_cutoff=0.0, mask=scored, **criteria),
                        "reverse gamma")
    points = int(scored.sum())
    if points == 0:
        return TwoWayGamma(float("nan"), float("nan"), float("nan"), 0)
    forward_ok, reverse_ok = forward[scored] <= 1.0, reverse[scored] <= 1.0
    return TwoWayGamma(pass_percent=100.0 * float(np.mean(forward_ok & reverse_ok)),
                       forward_percent=100.0 * float(np.mean(forward_ok)),
                       reverse_percent=100.0 * float(np.mean(reverse_ok)),
                       points=points)
