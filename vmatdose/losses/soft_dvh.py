"""Differentiable DVH quantities of one structure's voxel doses.

* :func:`smooth_percentile`: the exact percentile (numpy's linear interpolation, the
  OpenKBP D_x convention) as the value, with the gradient of a sigmoid-smoothed DVH: the
  implicit derivative of the root of ``V(d) = x`` spreads it over the voxels within a few
  ``width`` of the percentile (a plain sort would hand it to one or two voxels only).
* :func:`soft_cumulative_dvh`: volume fraction receiving at least each dose level, with
  the step function replaced by a sigmoid of the given width.

Shapes: ``values`` (N,) doses of one structure's voxels; every unit is the caller's (Gy or
normalised dose), ``width`` in the same unit.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def smooth_percentile(values: torch.Tensor, q: torch.Tensor, width: float) -> torch.Tensor:
    """Percentiles ``q`` (Q,) in [0, 100] of ``values`` (N,) -> (Q,).

    Forward: ``torch.quantile`` (linear interpolation). Backward: with the smoothed
    cumulative DVH ``V(d) = mean(sigmoid((v - d) / width))``, the root ``d*`` of
    ``V(d*) = 1 - q / 100`` moves by ``sum_i w_i dv_i`` with ``w_i = sigmoid'(z_i) /
    sum_j sigmoid'(z_j)``: a uniform shift of all doses shifts the percentile by as much.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    with torch.no_grad():
        level = torch.quantile(values.float(), q.to(values.device, torch.float32) / 100.0)
        z = (values.detach().float()[None, :] - level[:, None]) / width
        # log sigmoid'(z) = logsigmoid(z) + logsigmoid(-z): stable far in the tails
        weights = torch.softmax(F.logsigmoid(z) + F.logsigmoid(-z), dim=1)
    delta = values - values.detach()
    return level.to(values.dtype) + (weights.to(values.dtype) * delta[None, :]).sum(dim=1)


def soft_cumulative_dvh(values: torch.Tensor, levels: torch.Tensor,
                        width: float) -> torch.Tensor:
    """Smoothed fraction (0..1) of ``values`` (N,) at or above each of ``levels`` (L,)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return torch.sigmoid((values[None, :] - levels[:, None].to(values)) / width).mean(dim=1)
