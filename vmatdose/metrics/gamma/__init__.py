"""Fast 3D gamma index with the semantics of ``pymedphys.gamma`` (shell search).

Why hand-written: ``pymedphys.gamma`` is the reference implementation (and the tests
check parity with it voxel by voxel), but it sweeps every search shell over all
still-unresolved voxels in numpy with a generic interpolator, taking seconds to minutes
per 3D dose. That is too slow to run on every validation case every epoch
(``vmatdose.training.module`` logs ``val/gamma_pass``). This module searches the very same
point set exactly, ~90-180x faster on 2 CPU cores (``benchmarks/bench_gamma.py``).

The reference and evaluated doses live on the same (Z, Y, X) grid with voxel spacing
``spacing_mm = (dz, dy, dx)``. For every reference voxel at or above the lower dose cutoff
the gamma index is::

    gamma(r) = min over p of sqrt(((De(r + p) - Dr(r)) / dD)^2 + (|p| / DTA)^2)

where ``De`` is the trilinearly interpolated evaluated dose and ``p`` runs over exactly the
point set pymedphys searches: concentric spherical shells of radius 0, s, 2s, ... (with
``s = DTA / interp_fraction``, the radius sequence, the forced shell at ``DTA`` and the
per-shell point layout reproduced from ``pymedphys._gamma.implementation.shell`` and
``pymedphys._utilities.createshells``) up to ``DTA * max_gamma``. Points off the grid are
ignored (pymedphys fills them with ``inf``), decided on the float64 coordinates
``i * spacing + offset`` as pymedphys does with axes ``np.arange(n) * spacing``, so voxels
on the grid faces agree too. Per-voxel results match pymedphys to ~1e-5 (float32).

Conventions (chosen to agree with pymedphys):

* Global: ``dD = dose_percent / 100 * normalisation``, normalisation = reference max unless
  ``global_normalisation`` is given. Local: ``dD = dose_percent / 100 * Dr(r)``.
* The cutoff is ``Dr(r) >= lower_percent_dose_cutoff / 100 * normalisation``; voxels below
  it, outside ``mask``, or (local gamma only) with ``Dr(r) <= 0`` are NaN. The mask only
  selects reference voxels; the evaluated dose is searched everywhere on the grid.
* Gamma is capped at ``max_gamma``: where no searched point gives a smaller value the voxel
  reads exactly ``max_gamma`` (pymedphys' ``gamma > max_gamma -> max_gamma``); it is never
  ``inf``. ``max_gamma=None`` searches without a cap, out to the largest distance that can
  still lower any voxel's gamma (like pymedphys' unbounded search).
* The pass rate counts ``gamma <= 1`` over the evaluated (non-NaN) voxels. (pymedphys'
  ``calculate_pass_rate`` helper uses ``< 1``; the two differ only for voxels at exactly 1.)

Speed comes from an exact branch-and-bound over the same point set, not from an
approximation: the points are grouped by the grid cell they fall in (relative to the
voxel), cells are visited in order of their nearest point and the search stops once that
distance alone exceeds the best gamma so far; a cell is skipped when even the dose range
of its 8 corners (a trilinear value cannot leave it) cannot beat the best gamma, and inside
a cell only points nearer than the best gamma are evaluated, in a vectorised loop.

Backends: on CPU a numba kernel, one voxel per loop iteration, because the per-voxel early
exits and per-cell pruning are branchy and do not map onto whole-tensor torch ops (the
torch backend on CPU is ~40x slower on a 64^3 plan). The CPU path stays in numpy + numba
throughout: any torch op wakes torch's own OpenMP pool, whose spin-waiting threads then
compete with numba's. On CUDA (or ``backend="torch"``) a vectorised torch version sweeps
the shells in increasing radius over compacted lists of still-unresolved voxels, pruned by
a per-voxel dose-range bound.

Which gamma where: :func:`gamma_index` / :func:`gamma_pass_rate` (this reference gamma) in
evaluation, planning and the pymedphys parity tests, where the evaluated dose is a smooth
plan and interpolating it is correct physics; :func:`two_way_gamma` (:mod:`.two_way`: a voxel
passes only when the prediction-as-reference gamma passes too) for ``val/gamma_pass`` and
any search objective, where the evaluated dose is an unfinished network's output whose
voxel-to-voxel noise the interpolated search would pass.

Layout: :mod:`.api` (public functions, validation, the shared driver), :mod:`.points`
(the pymedphys point set, split into grid cells), :mod:`.cpu` (numba kernel),
:mod:`.torch_kernel` (vectorised torch sweep), :mod:`.two_way` (the validation gamma).
"""

from vmatdose.metrics.gamma.api import (
    ArrayLike,
    Backend,
    gamma_index,
    gamma_pass_rate,
    pass_rate_from_gamma,
)
from vmatdose.metrics.gamma.points import pymedphys_search_radii, pymedphys_shell
from vmatdose.metrics.gamma.two_way import TwoWayGamma, two_way_gamma

__all__ = ["ArrayLike", "Backend", "TwoWayGamma", "gamma_index", "gamma_pass_rate",
           "pass_rate_from_gamma", "pymedphys_search_radii", "pymedphys_shell",
           "two_way_gamma"]
