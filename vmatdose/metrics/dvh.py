"""Dose-volume histogram (DVH) metrics with exact, interpolation-free definitions.

Shapes and units: ``dose`` (Z, Y, X) in Gy; ``masks`` (S, Z, Y, X), nonzero = inside (a
single (Z, Y, X) mask counts as S = 1); ``spacing_mm`` (dz, dy, dx) in mm, voxel volume
``dz * dy * dx / 1000`` cc. Inputs may be numpy or torch: array results come back as
float64 numpy arrays, or float64 tensors on the dose's device. An empty structure yields
NaN for every metric.

Definitions (``method="exact"``, the default). Every voxel of a structure is one
equal-volume sample: no partial-volume weighting and no interpolation between voxels or
histogram bins, so every D-value is the dose of an actual voxel. For a structure of N
voxels with doses sorted from the hottest, ``d(1) >= d(2) >= ... >= d(N)``:

* ``V(d)`` (cumulative DVH): fraction of the voxels with dose ``>= d``.
* ``V_xGy`` = ``100 * V(x)`` percent of the structure (or ``V(x) * N * voxel_cc`` cc).
  ``V_x%`` is ``V_yGy`` at ``y = x / 100 * prescription``.
* ``D_x%`` = ``max{d : V(d) >= x / 100}``: the highest dose received by at least x % of
  the volume, i.e. the minimum dose of the hottest ``k = ceil(x N / 100)`` voxels,
  ``d(k)``. Thus ``V(D_x%) >= x %`` and any higher dose covers less than x %, so
  ``D_x% >= L  <=>  V_L >= x %``. ``D0%`` is taken as ``d(1)`` (Dmax), ``D100%`` is Dmin.
* ``D_ycc`` = ``d(k)`` with ``k = ceil(y / voxel_cc)``: the minimum dose of the smallest
  hottest set of voxels holding at least y cc. NaN when the structure is smaller than y cc.
* ``Dmax`` is the true maximum voxel dose, ``d(1)`` (not a near-maximum); ask for
  ``D0.03cc`` (or ``D2%``) for the ICRU 83 near-maximum. ``Dmin`` is ``d(N)``; ``Dmean``
  the voxel average.

``method="openkbp"`` reproduces the OpenKBP challenge code instead
(https://github.com/ababier/open-kbp, ``dose_evaluation_class.py``): ``D_x% =
np.percentile(roi_dose, 100 - x)`` (linear interpolation between voxels) and ``D_ycc =
np.percentile(roi_dose, 100 - n / N * 100)`` with ``n = max(1, round(y / voxel_cc))``.

Metric strings (:func:`parse_dvh_metric`, :func:`evaluate_dvh_metric`): ``D95%``,
``D0.03cc``, ``V70Gy``, ``V95%`` (95 % of the prescription), ``Dmax``, ``Dmean``,
``Dmin``; D-metrics are in Gy, V-metrics in % of the structure volume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
Doses = float | Sequence[float] | np.ndarray | torch.Tensor

_METHODS = ("exact", "openkbp")
_VOLUME_UNITS = ("fraction", "percent", "cc")
# relative slack when rounding volume counts up: x * N / 100 = 95.00000000000001 means 95
_CEIL_SLACK = 1e-12


# --------------------------------------------------------------------------- public API


def cumulative_dvh(dose: ArrayLike, masks: ArrayLike, bin_width_gy: float = 0.01,
                   bins: Doses | None = None, *, unit: str = "fraction",
                   spacing_mm: Sequence[float] | None = None,
                   voxel_volume_cc: float | None = None) -> tuple[ArrayLike, ArrayLike]:
    """Cumulative DVH of every structure: volume receiving ``>=`` each dose level.

    Args:
        dose: (Z, Y, X) dose in Gy.
        masks: (S, Z, Y, X) structure masks.
        bin_width_gy: spacing of the default dose levels ``0, w, 2w, ...`` Gy (up to the
            first level above the maximum dose).
        bins: explicit dose levels in Gy (overrides ``bin_width_gy``).
        unit: ``"fraction"`` (0..1), ``"percent"`` or ``"cc"`` (needs ``spacing_mm`` or
            ``voxel_volume_cc``).

    Returns:
        ``(bins_gy (B,), volume (S, B))`` with ``volume[s, b]`` the volume of structure s
        receiving ``>= bins_gy[b]``; NaN rows for empty structures.
    """
    d, m = _prepare(dose, masks)
    scale = _volume_scale(unit, spacing_mm, voxel_volume_cc)
    if bins is None:
        if not math.isfinite(bin_width_gy) or bin_width_gy <= 0:
            raise ValueError(f"bin_width_gy must be positive, got {bin_width_gy!r}")
        top = max(float(d.max()), 0.0) if d.numel() else 0.0
        levels = torch.arange(math.floor(top / bin_width_gy) + 2, dtype=torch.float64,
                              device=d.device) * bin_width_gy
    else:
        levels = _levels(bins, "bins", d.device)
    rows = [_fraction_at_least(v, levels) * (v.numel() if unit == "cc" else 1) * scale
            for v in _sorted_rois(d, m)]
    return _out(levels, dose), _out(torch.stack(rows), dose)


def dose_at_volume(dose: ArrayLike, masks: ArrayLike, percent: Doses,
                   method: str = "exact") -> ArrayLike:
    """D_x%: dose (Gy) received by at least ``percent`` % of each structure.

    ``"exact"``: the ``ceil(x N / 100)``-th highest voxel dose (see the module docstring);
    ``"openkbp"``: ``np.percentile(roi_dose, 100 - x)``. Returns (S,) for a scalar
    ``percent``, else (S, Q).
    """
    d, m = _prepare(dose, masks)
    _check_method(method)
    pct = _levels(percent, "percent", d.device)
    if bool(((pct < 0) | (pct > 100)).any()):
        raise ValueError(f"percent must lie in [0, 100], got {pct.tolist()}")
    rows = [_dose_at_percent(v, pct, method) for v in _sorted_rois(d, m)]
    return _out(_squeeze_if_scalar(torch.stack(rows), percent), dose)


def dose_at_cc(dose: ArrayLike, masks: ArrayLike, cc: Doses,
               voxel_volume_cc: float | None = None, method: str = "exact", *,
               spacing_mm: Sequence[float] | None = None) -> ArrayLike:
    """D_ycc: minimum dose (Gy) of the hottest ``cc`` of each structure.

    Give the voxel volume as ``voxel_volume_cc`` or ``spacing_mm``. ``"exact"``: the
    ``ceil(cc / voxel_cc)``-th highest voxel dose, NaN if the structure is smaller than
    ``cc``; ``"openkbp"``: OpenKBP's percentile (see the module docstring). Returns (S,)
    for a scalar ``cc``, else (S, Q).
    """
    d, m = _prepare(dose, masks)
    _check_method(method)
    voxel_cc = _voxel_cc(spacing_mm, voxel_volume_cc)
    volumes = _levels(cc, "cc", d.device)
    if bool((volumes <= 0).any()):
        raise ValueError(f"cc must be positive, got {volumes.tolist()}")
    rows = [_dose_at_count(v, volumes / voxel_cc, method) for v in _sorted_rois(d, m)]
    return _out(_squeeze_if_scalar(torch.stack(rows), cc), dose)


def volume_at_dose(dose: ArrayLike, masks: ArrayLike, dose_gy: Doses, unit: str = "percent",
                   voxel_volume_cc: float | None = None, *,
                   spacing_mm: Sequence[float] | None = None) -> ArrayLike:
    """V_xGy: volume of each structure receiving ``>= dose_gy`` Gy.

    ``unit`` is ``"percent"`` (of the structure), ``"fraction"`` or ``"cc"`` (needs
    ``voxel_volume_cc`` or ``spacing_mm``). Returns (S,) for a scalar ``dose_gy``, else
    (S, Q).
    """
    d, m = _prepare(dose, masks)
    scale = _volume_scale(unit, spacing_mm, voxel_volume_cc)
    levels = _levels(dose_gy, "dose_gy", d.device)
    rows = [_fraction_at_least(v, levels) * (v.numel() if unit == "cc" else 1) * scale
            for v in _sorted_rois(d, m)]
    return _out(_squeeze_if_scalar(torch.stack(rows), dose_gy), dose)


def volume_at_relative_dose(dose: ArrayLike, masks: ArrayLike, percent_of_prescription: Doses,
                            prescription_gy: float, unit: str = "percent",
                            voxel_volume_cc: float | None = None, *,
                            spacing_mm: Sequence[float] | None = None) -> ArrayLike:
    """V_x%: volume receiving ``>= x / 100 * prescription_gy`` Gy (x = percent of Rx).

    E.g. a target's V95%. ``unit`` and shapes as in :func:`volume_at_dose`.
    """
    _check_positive(prescription_gy, "prescription_gy")
    pct = _levels(percent_of_prescription, "percent_of_prescription", torch.device("cpu"))
    levels = pct * prescription_gy / 100.0
    query = levels if np.ndim(percent_of_prescription) else float(levels[0])
    return volume_at_dose(dose, masks, query, unit, voxel_volume_cc, spacing_mm=spacing_mm)


def mean_dose(dose: ArrayLike, masks: ArrayLike) -> ArrayLike:
    """Dmean: mean voxel dose (Gy) of each structure, (S,); NaN for empty structures."""
    d, m = _prepare(dose, masks)
    return _out(torch.stack([_stat(v, "mean") for v in _sorted_rois(d, m)]), dose)


def max_dose(dose: ArrayLike, masks: ArrayLike) -> ArrayLike:
    """Dmax: true maximum voxel dose (Gy) of each structure, (S,); NaN if empty.

    Not a near-maximum: use :func:`dose_at_cc` with 0.03 cc (``"D0.03cc"``) for that.
    """
    d, m = _prepare(dose, masks)
    return _out(torch.stack([_stat(v, "max") for v in _sorted_rois(d, m)]), dose)


def min_dose(dose: ArrayLike, masks: ArrayLike) -> ArrayLike:
    """Dmin: minimum voxel dose (Gy) of each structure, (S,); NaN if empty."""
    d, m = _prepare(dose, masks)
    return _out(torch.stack([_stat(v, "min") for v in _sorted_rois(d, m)]), dose)


# ----------------------------------------------------------------------- metric strings


@dataclass(frozen=True)
class DVHMetric:
    """A parsed DVH metric name such as ``D95%``, ``D2cc``, ``V70Gy``, ``V95%``, ``Dmax``.

    ``quantity`` is ``"D"`` or ``"V"`` (with ``value`` and ``unit``: ``"%"`` or ``"cc"``
    for D, ``"Gy"`` or ``"%"`` (of the prescription) for V), or one of ``"Dmean"``,
    ``"Dmax"``, ``"Dmin"`` (``value`` and ``unit`` None). D-metrics are in Gy, V-metrics
    in percent of the structure volume.
    """

    name: str
    quantity: str
    value: float | None = None
    unit: str | None = None

    @property
    def needs_prescription(self) -> bool:
        return self.quantity == "V" and self.unit == "%"

    @property
    def result_unit(self) -> str:
        return "%" if self.quantity == "V" else "Gy"


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_PATTERN = re.compile(rf"(D|V)_?{_NUMBER}(%|cc|gy)", re.IGNORECASE)
_STATS = {"dmean": "Dmean", "dmax": "Dmax", "dmin": "Dmin"}


def parse_dvh_metric(name: str) -> DVHMetric:
    """Parse ``D<x>%``, ``D<x>cc``, ``V<x>Gy``, ``V<x>%``, ``Dmean``, ``Dmax``, ``Dmin``.

    Case-insensitive, spaces and an underscore after the letter allowed (``D_95%``).
    Raises ValueError for anything else (e.g. ``D70Gy``, ``V2cc``).
    """
    text = re.sub(r"\s+", "", str(name))
    if text.lower() in _STATS:
        return DVHMetric(str(name), _STATS[text.lower()])
    match = _PATTERN.fullmatch(text)
    if match:
        quantity, unit = match[1].upper(), {"%": "%", "cc": "cc", "gy": "Gy"}[match[3].lower()]
        if (quantity, unit) in (("D", "%"), ("D", "cc"), ("V", "Gy"), ("V", "%")):
            return DVHMetric(str(name), quantity, float(match[2]), unit)
    raise ValueError(f"unsupported DVH metric {name!r}: use D<x>%, D<x>cc, V<x>Gy, "
                     "V<x>% (of the prescription), Dmean, Dmax or Dmin")


def evaluate_dvh_metric(dose: ArrayLike, masks: ArrayLike, metric: str | DVHMetric, *,
                        spacing_mm: Sequence[float] | None = None,
                        voxel_volume_cc: float | None = None,
                        prescription_gy: float | None = None,
                        method: str = "exact") -> ArrayLike:
    """Value of one DVH metric string for each structure, (S,): Gy for D, % for V.

    ``D<x>cc`` needs ``spacing_mm`` or ``voxel_volume_cc``; ``V<x>%`` needs
    ``prescription_gy``. ``method`` applies to D-metrics (see the module docstring).
    """
    d, m = _prepare(dose, masks)
    spec = metric if isinstance(metric, DVHMetric) else parse_dvh_metric(metric)
    _check_method(method)
    voxel_cc = _voxel_cc(spacing_mm, voxel_volume_cc) if spec.unit == "cc" else None
    if spec.needs_prescription:
        if prescription_gy is None:
            raise ValueError(f"{spec.name}: a V<x>% metric needs prescription_gy")
        _check_positive(prescription_gy, "prescription_gy")
    rows = [_metric_value(v, spec, voxel_cc, prescription_gy, method)
            for v in _sorted_rois(d, m)]
    return _out(torch.stack(rows), dose)


def dvh_metrics(dose: ArrayLike, masks: ArrayLike, structures: Sequence[str],
                spacing_mm: Sequence[float], targets: Sequence[str] = (),
                method: str = "exact", extra: Sequence[str] = (),
                prescriptions_gy: Mapping[str, float] | None = None
                ) -> dict[str, dict[str, float]]:
    """Standard DVH metrics per structure, ``{structure: {metric: value}}``.

    Every structure gets D98, D95, D50, D2, Dmean, Dmax, D0.1cc and D2cc (Gy); structures
    named in ``targets`` also get D99 and D1 (the OpenKBP target metrics, with D95).
    ``extra`` metric strings (e.g. ``"V20Gy"``, ``"D0.03cc"``, ``"V95%"``) are added to
    every structure, keyed by the string; ``V<x>%`` only where ``prescriptions_gy`` has
    the structure.

    Args:
        dose: (Z, Y, X) dose in Gy.
        masks: (S, Z, Y, X) masks, in the order of ``structures``.
        structures: S structure names.
        spacing_mm: (dz, dy, dx) voxel spacing in mm.
        targets: names of target structures (a subset of ``structures``).
        method: ``"exact"`` or ``"openkbp"`` for the D-metrics.
        extra: additional metric strings (see :func:`parse_dvh_metric`).
        prescriptions_gy: structure -> prescription (Gy) for ``V<x>%`` metrics.
    """
    d, m = _prepare(dose, masks)
    names = list(structures)
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} structure names for {m.shape[0]} masks")
    unknown = sorted(set(targets) - set(names))
    if unknown:
        raise ValueError(f"targets not among the structures: {unknown}")
    _check_method(method)
    voxel_cc = _voxel_cc(spacing_mm, None)
    specs = [parse_dvh_metric(e) for e in extra]
    prescriptions = dict(prescriptions_gy or {})
    pct = torch.tensor([98.0, 95.0, 50.0, 2.0, 99.0, 1.0], dtype=torch.float64,
                       device=d.device)
    counts = torch.tensor([0.1, 2.0], dtype=torch.float64, device=d.device) / voxel_cc
    result: dict[str, dict[str, float]] = {}
    for name, v in zip(names, _sorted_rois(d, m)):
        dx = _dose_at_percent(v, pct, method).tolist()
        dcc = _dose_at_count(v, counts, method).tolist()
        row = {"D98": dx[0], "D95": dx[1], "D50": dx[2], "D2": dx[3],
               "Dmean": float(_stat(v, "mean")), "Dmax": float(_stat(v, "max")),
               "D0.1cc": dcc[0], "D2cc": dcc[1]}
        if name in targets:
            row.update({"D99": dx[4], "D1": dx[5]})
        for spec in specs:
            if spec.needs_prescription and name not in prescriptions:
                continue
            row[spec.name] = float(_metric_value(v, spec, voxel_cc, prescriptions.get(name),
                                                 method))
        result[name] = row
    return result


# ----------------------------------------------------------------------- helpers


def _prepare(dose: ArrayLike, masks: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to float64 dose (N,) and bool masks (S, N) on the dose's device."""
    d = _as_tensor(dose, "dose").double()
    if d.ndim != 3:
        raise ValueError(f"dose must be a (Z, Y, X) volume, got shape {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("dose contains non-finite values (NaN or inf)")
    m = _as_tensor(masks, "masks").to(d.device)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4 or tuple(m.shape[1:]) != tuple(d.shape):
        raise ValueError(f"masks must be (S, Z, Y, X) with (Z, Y, X) = {tuple(d.shape)}, "
                         f"got shape {tuple(m.shape)}")
    return d.reshape(-1), m.reshape(m.shape[0], -1) != 0


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _out(x: torch.Tensor, like: ArrayLike) -> ArrayLike:
    return x if isinstance(like, torch.Tensor) else x.cpu().numpy()


def _levels(values: Doses, name: str, device: torch.device) -> torch.Tensor:
    """1D float64 tensor of query values (a scalar becomes length 1)."""
    try:
        if isinstance(values, torch.Tensor):
            t = values.detach().to(device=device, dtype=torch.float64)
        else:
            t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number or a sequence of numbers, got "
                         f"{values!r}") from err
    t = t.reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite numbers, got {values!r}")
    return t


def _squeeze_if_scalar(result: torch.Tensor, query: Doses) -> torch.Tensor:
    """(S, 1) -> (S,) when the query was a scalar."""
    scalar = query.ndim == 0 if isinstance(query, torch.Tensor) else np.ndim(query) == 0
    return result[:, 0] if scalar else result


def _check_positive(value: float | None, name: str) -> None:
    if value is None or not isinstance(value, (int, float, np.number)) or \
            not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _voxel_cc(spacing_mm: Sequence[float] | None, voxel_volume_cc: float | None) -> float:
    """Voxel volume in cc from exactly one of ``spacing_mm`` (dz, dy, dx) mm or cc."""
    if (spacing_mm is None) == (voxel_volume_cc is None):
        raise ValueError("give exactly one of spacing_mm or voxel_volume_cc for volumes in cc")
    if voxel_volume_cc is not None:
        _check_positive(voxel_volume_cc, "voxel_volume_cc")
        return float(voxel_volume_cc)
    try:
        spacing = np.asarray(spacing_mm, dtype=float).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing_mm must be 3 numbers, got {spacing_mm!r}") from err
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive numbers (dz, dy, dx) in mm, "
                         f"got {spacing_mm!r}")
    return float(np.prod(spacing)) / 1000.0


def _volume_scale(unit: str, spacing_mm: Sequence[float] | None,
                  voxel_volume_cc: float | None) -> float:
    """Factor from a volume fraction to ``unit`` (times the voxel count for cc)."""
    if unit not in _VOLUME_UNITS:
        raise ValueError(f"unit must be one of {_VOLUME_UNITS}, got {unit!r}")
    if unit == "cc":
        return _voxel_cc(spacing_mm, voxel_volume_cc)
    return 100.0 if unit == "percent" else 1.0


def _sorted_rois(d: torch.Tensor, m: torch.Tensor) -> list[torch.Tensor]:
    """Ascending dose values of each structure."""
    return [torch.sort(d[mask]).values for mask in m]


def _stat(v: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean, max or min of sorted ``v``, NaN if empty (0-dim float64)."""
    if v.numel() == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=v.device)
    return {"mean": v.mean, "max": lambda: v[-1], "min": lambda: v[0]}[kind]()


def _metric_value(v: torch.Tensor, spec: DVHMetric, voxel_cc: float | None,
                  prescription_gy: float | None, method: str) -> torch.Tensor:
    """One parsed metric of sorted ``v`` (0-dim float64): Gy for D, % for V."""
    if spec.value is None:
        return _stat(v, spec.quantity[1:])
    x = torch.tensor([spec.value], dtype=torch.float64, device=v.device)
    if spec.quantity == "D" and spec.unit == "%":
        if spec.value > 100:
            raise ValueError(f"{spec.name}: the percent must lie in [0, 100]")
        return _dose_at_percent(v, x, method)[0]
    if spec.quantity == "D":
        return _dose_at_count(v, x / voxel_cc, method)[0]
    level = x if spec.unit == "Gy" else x * prescription_gy / 100.0
    return _fraction_at_least(v, level)[0] * 100.0


def _ceil(x: torch.Tensor) -> torch.Tensor:
    """Ceiling that forgives float noise just above an integer (95.00000000000001 -> 95)."""
    return torch.ceil(x * (1.0 - _CEIL_SLACK))


def _dose_at_percent(v: torch.Tensor, pct: torch.Tensor, method: str) -> torch.Tensor:
    """D_x% of sorted ``v`` for each percent in ``pct`` (Q,) -> (Q,)."""
    if v.numel() == 0:
        return torch.full_like(pct, math.nan)
    if method == "openkbp":
        return _percentile(v, 100.0 - pct)
    k = _ceil(pct * v.numel() / 100.0).long().clamp(min=1)  # hottest k voxels
    return v[v.numel() - k]


def _dose_at_count(v: torch.Tensor, n_voxels: torch.Tensor, method: str) -> torch.Tensor:
    """Dose to the hottest ``n_voxels`` (Q,) (float: cc / voxel_cc) of sorted ``v``."""
    if v.numel() == 0:
        return torch.full_like(n_voxels, math.nan)
    if method == "openkbp":
        n_hot = torch.clamp(torch.round(n_voxels), min=1)
        return _percentile(v, (100.0 - n_hot / v.numel() * 100.0).clamp(min=0.0))
    k = _ceil(n_voxels).long().clamp(min=1)
    values = v[(v.numel() - k).clamp(min=0)]
    return torch.where(k > v.numel(), torch.full_like(values, math.nan), values)


def _percentile(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """numpy's default ('linear') percentile of sorted non-empty ``v`` at percents ``q``."""
    position = q / 100.0 * (v.numel() - 1)
    lo = position.floor().long().clamp(0, v.numel() - 1)
    hi = (lo + 1).clamp(max=v.numel() - 1)
    t = position - lo
    a, b = v[lo], v[hi]
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end so the result stays monotone
    return torch.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _fraction_at_least(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Fraction of sorted ``v`` that is >= each level (NaN when ``v`` is empty)."""
    if v.numel() == 0:
        return torch.full_like(levels, math.nan)
    below = torch.searchsorted(v, levels, side="left")
    return (v.numel() - below).double() / v.numel()
