"""Public gamma functions, input validation and the driver shared by both backends (see
:mod:`vmatdose.metrics.gamma` for the definition and conventions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vmatdose.metrics.gamma.cpu import gamma_sq_numba
from vmatdose.metrics.gamma.points import PointSet, point_set
from vmatdose.metrics.gamma.torch_kernel import gamma_sq_torch

ArrayLike = np.ndarray | torch.Tensor
Backend = Literal["auto", "numba", "torch"]


# --------------------------------------------------------------------------- public API


def gamma_index(
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
) -> ArrayLike:
    """Gamma index volume of ``evaluated`` against ``reference``.

    Args:
        reference: reference dose (Z, Y, X) in Gy (any consistent unit), numpy or torch.
        evaluated: evaluated dose, same shape and grid as ``reference``.
        spacing_mm: voxel spacing (dz, dy, dx) in mm.
        dose_percent: dose-difference criterion in percent (of the normalisation, or of
            the local reference dose when ``local``).
        distance_mm: distance-to-agreement criterion in mm.
        lower_percent_dose_cutoff: reference voxels below this percent of the
            normalisation are not evaluated (NaN).
        local: local instead of global dose difference.
        interp_fraction: the search step is ``distance_mm / interp_fraction``.
        max_gamma: gamma cap; the search stops at ``distance_mm * max_gamma``. ``None``
            searches uncapped (slower).
        global_normalisation: dose (Gy, e.g. the prescription) that ``dose_percent`` (global)
            and the cutoff refer to; the reference maximum by default.
        mask: optional boolean (Z, Y, X) volume; voxels outside it are NaN.
        backend: ``"auto"`` (numba on CPU, torch on CUDA), ``"numba"`` or ``"torch"``.

    Returns:
        float32 gamma volume (Z, Y, X), NaN where not evaluated; numpy if ``reference`` is
        numpy, otherwise a torch tensor on ``reference``'s device.
    """
    criteria = _Criteria.validated(spacing_mm, dose_percent, distance_mm,
                                   lower_percent_dose_cutoff, local, interp_fraction,
                                   max_gamma, global_normalisation)
    device = reference.device if isinstance(reference, torch.Tensor) else torch.device("cpu")
    if _pick_backend(backend, device) == "numba":
        # numpy + numba only: torch's own OpenMP pool, woken by any torch op, spin-waits
        # and steals the cores from numba's pool (2x slower on 2 cores)
        ref, ev, msk = _prepare_numpy(reference, evaluated, mask)
        gamma = _gamma_numba(ref, ev, msk, criteria)
        return torch.from_numpy(gamma) if isinstance(reference, torch.Tensor) else gamma
    ref_t, ev_t, msk_t = _prepare_torch(reference, evaluated, mask, device)
    gamma_t = _gamma_torch(ref_t, ev_t, msk_t, criteria)
    return gamma_t if isinstance(reference, torch.Tensor) else gamma_t.cpu().numpy()


def gamma_pass_rate(
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
) -> float:
    """Percent of evaluated voxels with gamma <= 1 (arguments as :func:`gamma_index`).

    Returns NaN when no voxel is evaluated (everything below the cutoff or masked out).
    """
    gamma = gamma_index(reference, evaluated, spacing_mm, dose_percent, distance_mm,
                        lower_percent_dose_cutoff, local, interp_fraction, max_gamma,
                        global_normalisation, mask=mask, backend=backend)
    return pass_rate_from_gamma(gamma)


def pass_rate_from_gamma(gamma: ArrayLike) -> float:
    """Percent of non-NaN voxels of a gamma volume with gamma <= 1 (NaN if none)."""
    if isinstance(gamma, torch.Tensor):
        valid = ~torch.isnan(gamma)
        n, passed = int(valid.sum()), int((gamma[valid] <= 1.0).sum())
    else:
        valid = ~np.isnan(gamma)
        n, passed = int(valid.sum()), int(np.count_nonzero(gamma[valid] <= 1.0))
    return 100.0 * passed / n if n else float("nan")


# ----------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Criteria:
    """Validated gamma settings; ``max_gamma`` is ``inf`` for an uncapped search."""

    spacing: tuple[float, float, float]
    dose_percent: float
    distance_mm: float
    cutoff_percent: float
    local: bool
    interp_fraction: float
    max_gamma: float
    global_normalisation: float | None

    @classmethod
    def validated(cls, spacing_mm, dose_percent, distance_mm, cutoff_percent, local,
                  interp_fraction, max_gamma, global_normalisation) -> _Criteria:
        positive = {"dose_percent": dose_percent, "distance_mm": distance_mm,
                    "interp_fraction": interp_fraction, "max_gamma": max_gamma,
                    "global_normalisation": global_normalisation}
        for name, value in positive.items():
            if value is None and name in ("max_gamma", "global_normalisation"):
                continue
            if not isinstance(value, (int, float, np.number)) or not value > 0 or \
                    not (math.isfinite(value) or (name == "max_gamma" and value == math.inf)):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        if not isinstance(cutoff_percent, (int, float, np.number)) or \
                not math.isfinite(cutoff_percent) or cutoff_percent < 0:
            raise ValueError(f"lower_percent_dose_cutoff must be >= 0, got {cutoff_percent!r}")
        return cls(_check_spacing(spacing_mm), float(dose_percent), float(distance_mm),
                   float(cutoff_percent), bool(local), float(interp_fraction),
                   math.inf if max_gamma is None else float(max_gamma),
                   None if global_normalisation is None else float(global_normalisation))

    def normalisation(self, reference_max: float) -> float:
        if self.global_normalisation is None:
            return reference_max
        return self.global_normalisation

    def points(self, max_g0_sq: float) -> PointSet:
        """Search points; uncapped, no point beyond the largest d=0 gamma can matter."""
        limit_mm = self.distance_mm * (self.max_gamma if math.isfinite(self.max_gamma)
                                       else math.sqrt(max_g0_sq))
        return point_set(self.spacing, self.distance_mm, self.interp_fraction,
                          self.max_gamma, limit_mm)


def _check_shapes(ref_shape: tuple, ev_shape: tuple, mask_shape: tuple | None) -> None:
    if len(ref_shape) != 3:
        raise ValueError(f"reference must be a 3D (Z, Y, X) volume, got shape {ref_shape}")
    if ref_shape != ev_shape:
        raise ValueError(f"reference and evaluated shapes differ: {ref_shape} vs {ev_shape} "
                         "(both doses must be on the same grid)")
    if mask_shape is not None and mask_shape != ref_shape:
        raise ValueError(f"mask shape {mask_shape} differs from the dose shape {ref_shape}")


def _prepare_numpy(reference: ArrayLike, evaluated: ArrayLike, mask: ArrayLike | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """C-contiguous float32 doses and bool mask as numpy arrays, validated."""
    ref, ev = _as_numpy(reference, "reference"), _as_numpy(evaluated, "evaluated")
    msk = None if mask is None else _as_numpy(mask, "mask")
    _check_shapes(ref.shape, ev.shape, None if msk is None else msk.shape)
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    ev = np.ascontiguousarray(ev, dtype=np.float32)
    for name, dose in (("reference", ref), ("evaluated", ev)):
        if not np.isfinite(dose).all():
            raise ValueError(f"{name} dose contains non-finite values (NaN or inf)")
    return ref, ev, None if msk is None else msk.astype(bool)


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _prepare_torch(reference: ArrayLike, evaluated: ArrayLike, mask: ArrayLike | None,
                   device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Contiguous float32 doses and bool mask as tensors on ``device``, validated."""
    ref, ev = _as_tensor(reference, "reference", device), _as_tensor(evaluated, "evaluated",
                                                                      device)
    msk = None if mask is None else _as_tensor(mask, "mask", device)
    _check_shapes(tuple(ref.shape), tuple(ev.shape), None if msk is None else tuple(msk.shape))
    ref, ev = ref.float().contiguous(), ev.float().contiguous()
    for name, dose in (("reference", ref), ("evaluated", ev)):
        if not bool(torch.isfinite(dose).all()):
            raise ValueError(f"{name} dose contains non-finite values (NaN or inf)")
    return ref, ev, None if msk is None else msk.bool()


def _as_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _check_spacing(spacing_mm: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing_mm is None:
        raise ValueError("spacing_mm is required: (dz, dy, dx) voxel spacing in mm")
    try:
        spacing = tuple(float(s) for s in np.asarray(spacing_mm, dtype=float).ravel())
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing_mm must be 3 numbers (dz, dy, dx) in mm, got "
                         f"{spacing_mm!r}") from err
    if len(spacing) != 3:
        raise ValueError(f"spacing_mm must have 3 values (dz, dy, dx) in mm, got {len(spacing)}")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm values must be finite and positive, got {spacing}")
    return spacing  # type: ignore[return-value]


def _pick_backend(backend: Backend, device: torch.device) -> str:
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "numba" and device.type != "cpu":
        raise ValueError("the numba backend needs CPU tensors")
    if backend == "auto":
        return "numba" if device.type == "cpu" else "torch"
    return backend


# ----------------------------------------------------------------------- driver


def _gamma_torch(ref: torch.Tensor, ev: torch.Tensor, msk: torch.Tensor | None,
                 criteria: _Criteria) -> torch.Tensor:
    """Gamma volume (float32, on ``ref``'s device) with the torch backend."""
    norm = criteria.normalisation(float(ref.max()))
    evaluate = ref >= criteria.cutoff_percent / 100.0 * norm
    if msk is not None:
        evaluate &= msk
    if criteria.local:
        evaluate &= ref > 0
    vox = torch.nonzero(evaluate.ravel()).ravel()
    out = torch.full(ref.shape, math.nan, dtype=torch.float32, device=ref.device)
    if vox.numel() == 0:
        return out
    r = ref.ravel()[vox]
    tol = criteria.dose_percent / 100.0 * (r if criteria.local else torch.full_like(r, norm))
    inv_tol = 1.0 / tol
    g_sq = ((ev.ravel()[vox] - r) * inv_tol).square()
    points = criteria.points(float(g_sq.max()))
    g_sq = gamma_sq_torch(ref, ev, vox, inv_tol, g_sq.clamp(max=criteria.max_gamma ** 2),
                           points)
    out.view(-1)[vox] = g_sq.sqrt()
    return out


def _gamma_numba(ref: np.ndarray, ev: np.ndarray, msk: np.ndarray | None,
                 criteria: _Criteria) -> np.ndarray:
    """Gamma volume (float32 numpy) with the numba backend; same steps as _gamma_torch."""
    norm = criteria.normalisation(float(ref.max()))
    evaluate = ref >= criteria.cutoff_percent / 100.0 * norm
    if msk is not None:
        evaluate &= msk
    if criteria.local:
        evaluate &= ref > 0
    vox = np.flatnonzero(evaluate)
    out = np.full(ref.shape, np.nan, dtype=np.float32)
    if vox.size == 0:
        return out
    r = ref.ravel()[vox]
    tol = criteria.dose_percent / 100.0 * (r if criteria.local else np.full_like(r, norm))
    inv_tol = (1.0 / tol).astype(np.float32)
    g_sq = np.square((ev.ravel()[vox] - r) * inv_tol)
    points = criteria.points(float(g_sq.max()))
    g_sq = np.minimum(g_sq, np.float32(criteria.max_gamma ** 2)).astype(np.float32)
    out.ravel()[vox] = np.sqrt(gamma_sq_numba(ref, ev, vox, inv_tol, g_sq, points))
    return out
