"""DVH-aware losses: clinical-goal penalties and matching the reference plan's DVHs.

* :class:`DVHLoss` penalises the predicted dose for missing the data set's goals: target
  D95 below the prescription, target D2 above the hot limit (e.g. 107 % of it), and each
  structure constraint of the data config (``V<x>Gy``, ``V<x>%``, ``Dmax``, ``Dmin``,
  ``Dmean``, ``D<x>%``, parsed by :func:`vmatdose.metrics.dvh.parse_dvh_metric`). Dose errors are divided by the highest prescription and volume errors are
  fractions, so every penalty is on the scale of the normalised voxel loss.
* :class:`DVHMatchLoss` is the founding project's DVH-aware term: the mean absolute
  difference between the predicted and the reference plan's smoothed cumulative DVHs.

Both read the structure order of ``batch["masks"]`` from ``structures`` and convert the
normalised dose to Gy with ``batch["dose_scale_gy"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vmatdose.losses.soft_dvh import smooth_percentile, soft_cumulative_dvh
from vmatdose.metrics.dvh import DVHMetric, parse_dvh_metric

_UPPER_OPS, _LOWER_OPS = ("<", "<="), (">", ">=")
#: max / min dose as the percentile of the structure's voxel doses they are
_STAT_PERCENTILES = {"Dmax": 100.0, "Dmin": 0.0}


@dataclass(frozen=True)
class Objective:
    """One DVH goal of one structure.

    Attributes:
        structure: structure name (a channel of ``batch["masks"]``).
        quantity: ``percentile`` (dose in Gy at percentile ``level`` of the structure's
            voxels; D95 is percentile 5), ``mean`` (Gy) or ``volume`` (fraction 0..1 at
            or above ``level`` Gy).
        level: percentile (0..100) or dose level (Gy); unused for ``mean``.
        limit: Gy for dose quantities, fraction for ``volume``.
        upper: ``True`` penalises values above ``limit``, ``False`` values below.
        label: readable form, e.g. ``PTV70 D95% >= 70 Gy``.
    """

    structure: str
    quantity: str
    level: float
    limit: float
    upper: bool
    label: str


def target_objectives(prescriptions_gy: Mapping[str, float], coverage_percent: float = 95.0,
                      hot_percent: float = 2.0, hot_factor: float = 1.07) -> list[Objective]:
    """Per target: D<coverage>% >= Rx and D<hot>% <= hot_factor * Rx."""
    objectives = []
    for name, rx in prescriptions_gy.items():
        rx = float(rx)
        objectives += [
            Objective(name, "percentile", 100.0 - coverage_percent, rx, False,
                      f"{name} D{coverage_percent:g}% >= {rx:g} Gy"),
            Objective(name, "percentile", 100.0 - hot_percent, hot_factor * rx, True,
                      f"{name} D{hot_percent:g}% <= {hot_factor * rx:g} Gy"),
        ]
    return objectives


def constraint_objective(constraint: Mapping, prescriptions_gy: Mapping[str, float],
                         volume_as_dose: bool = True) -> Objective:
    """Turn a data-config constraint ``{structure, metric, op, limit}`` into an objective.

    ``V<x>Gy`` / ``V<x>%`` (x % of the structure's prescription) with a limit in % of the
    volume become, with ``volume_as_dose``, the equivalent dose goal ``D<limit>% op x Gy``
    (V_x < L % exactly when the dose to the hottest L % is below x): its gradient never
    vanishes, unlike a sigmoid volume count far from the threshold. Otherwise they become
    a smoothed volume fraction compared with ``limit / 100``.
    """
    name, metric, op = constraint["structure"], str(constraint["metric"]), constraint["op"]
    limit = float(constraint["limit"])
    if op not in _UPPER_OPS + _LOWER_OPS:
        raise ValueError(f"constraint {dict(constraint)}: op must be one of "
                         f"{_UPPER_OPS + _LOWER_OPS}")
    upper = op in _UPPER_OPS
    label = f"{name} {metric} {op} {limit:g}"
    spec = parse_dvh_metric(metric)
    if spec.quantity in _STAT_PERCENTILES:
        return Objective(name, "percentile", _STAT_PERCENTILES[spec.quantity], limit, upper,
                         label)
    if spec.quantity == "Dmean":
        return Objective(name, "mean", 0.0, limit, upper, label)
    if spec.quantity == "D" and spec.unit == "%":
        return Objective(name, "percentile", 100.0 - spec.value, limit, upper, label)
    if spec.quantity != "V":
        raise ValueError(f"unsupported DVH metric {metric!r} for {name} in a DVH loss: use "
                         "V<x>Gy, V<x>%, Dmax, Dmin, Dmean or D<x>%")
    level_gy = _volume_metric_level(name, spec, prescriptions_gy)
    if volume_as_dose:
        return Objective(name, "percentile", 100.0 - limit, level_gy, upper, label)
    return Objective(name, "volume", level_gy, limit / 100.0, upper, label)


def _volume_metric_level(name: str, spec: DVHMetric, prescriptions_gy: Mapping[str, float]
                         ) -> float:
    """Dose level (Gy) of ``V<x>Gy`` or ``V<x>%`` (x % of the structure's prescription)."""
    if not spec.needs_prescription:
        return float(spec.value)
    if name not in prescriptions_gy:
        raise ValueError(f"{name} {spec.name}: a V<x>% metric needs a prescription for "
                         f"{name}; prescriptions are {dict(prescriptions_gy)}")
    return float(spec.value) / 100.0 * float(prescriptions_gy[name])


def structure_doses_gy(pred: torch.Tensor, batch: Mapping) -> tuple[torch.Tensor,
                                                                    torch.Tensor]:
    """``pred`` (B, 1, Z, Y, X) normalised -> (B, Z, Y, X) float32 Gy, and the (B, S, Z, Y,
    X) boolean masks."""
    scale = batch["dose_scale_gy"]
    scale = torch.as_tensor(scale, dtype=torch.float32, device=pred.device).reshape(-1)
    dose_gy = pred[:, 0].float() * scale.view(-1, 1, 1, 1)
    return dose_gy, batch["masks"] > 0.5


class DVHLoss(nn.Module):
    """Mean hinge penalty of DVH goals on the predicted dose (0 when all are met).

    Args:
        structures: channel order of ``batch["masks"]`` (``${data.structures}``).
        prescriptions_gy: target -> prescription (``${data.prescriptions_gy}``).
        dose_scale_gy: divides dose penalties (``${data.dose_scale_gy}``, the highest
            prescription), so 0.01 means 1 % of it.
        constraints: data-config constraints (``${data.constraints}``); empty: targets only.
        coverage_percent, hot_percent, hot_factor: the target goals D95 >= Rx and
            D2 <= 1.07 Rx.
        width_gy: sigmoid width of the smoothed DVH (gradient spread, volume counts).
        volume_as_dose: express V-metrics as equivalent dose goals (see
            :func:`constraint_objective`).
    """

    def __init__(self, structures: Sequence[str], prescriptions_gy: Mapping[str, float],
                 dose_scale_gy: float, constraints: Sequence[Mapping] = (),
                 coverage_percent: float = 95.0, hot_percent: float = 2.0,
                 hot_factor: float = 1.07, width_gy: float = 1.0,
                 volume_as_dose: bool = True):
        super().__init__()
        self.structures = list(structures)
        self.objectives = target_objectives(prescriptions_gy, coverage_percent, hot_percent,
                                            hot_factor)
        self.objectives += [constraint_objective(c, prescriptions_gy, volume_as_dose)
                            for c in constraints]
        unknown = sorted({o.structure for o in self.objectives} - set(self.structures))
        if unknown:
            raise ValueError(f"DVH goals name structures {unknown} that are not in "
                             f"structures {self.structures}")
        self.dose_scale_gy, self.width_gy = float(dose_scale_gy), float(width_gy)

    def objective_values(self, values_gy: torch.Tensor, objective: Objective) -> torch.Tensor:
        """The objective's quantity for one structure's voxel doses (N,) in Gy."""
        if objective.quantity == "mean":
            return values_gy.mean()
        if objective.quantity == "volume":
            level = values_gy.new_tensor([objective.level])
            return soft_cumulative_dvh(values_gy, level, self.width_gy)[0]
        q = values_gy.new_tensor([objective.level])
        return smooth_percentile(values_gy, q, self.width_gy)[0]

    def penalty(self, value: torch.Tensor, objective: Objective) -> torch.Tensor:
        """Hinge on the violation: Gy / dose_scale_gy, or a volume fraction."""
        excess = value - objective.limit if objective.upper else objective.limit - value
        scale = 1.0 if objective.quantity == "volume" else self.dose_scale_gy
        return torch.relu(excess) / scale

    def penalties(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """(B, n_objectives) penalties; NaN where the case lacks the structure."""
        dose_gy, masks = structure_doses_gy(pred, batch)
        rows = []
        for b in range(dose_gy.shape[0]):
            voxels = {name: dose_gy[b][masks[b, self.structures.index(name)]]
                      for name in {o.structure for o in self.objectives}}
            row = [self.penalty(self.objective_values(voxels[o.structure], o), o)
                   if voxels[o.structure].numel() else dose_gy.new_tensor(float("nan"))
                   for o in self.objectives]
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """Mean penalty over objectives and cases (missing structures skipped)."""
        values = self.penalties(pred, batch)
        valid = ~values.isnan()
        if not valid.any():
            return pred.sum() * 0.0
        return values[valid].mean()


class DVHMatchLoss(nn.Module):
    """Mean absolute difference of smoothed cumulative DVHs, predicted vs reference.

    Per case and structure, the two DVHs are sampled at ``0, bin_width_gy, ...`` up to
    ``max_dose_factor * dose_scale_gy``; the term is the mean over bins, structures and
    cases of the volume-fraction difference (0..1).

    Args:
        structures: channel order of ``batch["masks"]`` (``${data.structures}``).
        dose_scale_gy: highest prescription (``${data.dose_scale_gy}``).
        include: structures to match (default: all).
        bin_width_gy: spacing of the dose levels.
        width_gy: sigmoid width (default: ``bin_width_gy``, so every voxel has gradient).
        max_dose_factor: highest level as a multiple of ``dose_scale_gy``.
    """

    def __init__(self, structures: Sequence[str], dose_scale_gy: float,
                 include: Sequence[str] | None = None, bin_width_gy: float = 1.0,
                 width_gy: float | None = None, max_dose_factor: float = 1.2):
        super().__init__()
        self.structures = list(structures)
        include = self.structures if include is None else list(include)
        unknown = sorted(set(include) - set(self.structures))
        if unknown:
            raise ValueError(f"include names {unknown}, not in structures {self.structures}")
        self.channels = [self.structures.index(name) for name in include]
        if bin_width_gy <= 0 or max_dose_factor <= 0:
            raise ValueError("bin_width_gy and max_dose_factor must be positive")
        top = max_dose_factor * float(dose_scale_gy)
        self.register_buffer("levels_gy", torch.arange(0.0, top + 1e-6, bin_width_gy),
                             persistent=False)
        self.width_gy = float(width_gy if width_gy is not None else bin_width_gy)

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``pred``, ``batch["dose"]``: (B, 1, Z, Y, X) normalised -> scalar in [0, 1]."""
        pred_gy, masks = structure_doses_gy(pred, batch)
        ref_gy, _ = structure_doses_gy(batch["dose"].to(pred), batch)
        diffs = []
        for b in range(pred_gy.shape[0]):
            for s in self.channels:
                mask = masks[b, s]
                if not mask.any():
                    continue
                dvh = soft_cumulative_dvh(pred_gy[b][mask], self.levels_gy, self.width_gy)
                ref = soft_cumulative_dvh(ref_gy[b][mask], self.levels_gy, self.width_gy)
                diffs.append((dvh - ref).abs().mean())
        if not diffs:
            return pred.sum() * 0.0
        return torch.stack(diffs).mean()
