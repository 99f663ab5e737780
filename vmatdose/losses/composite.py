"""A loss is a weighted set of named terms; each term is logged on its own.

Two weightings (``loss.weighting``):

* ``fixed``: ``total = sum_i w_i L_i`` with the configured weights;
* ``uncertainty``: learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla,
  CVPR 2018): ``total = sum_i w_i L_i / (2 sigma_i^2) + log sigma_i``, one learned
  ``sigma_i`` per term. A term whose magnitude stays large gets a large sigma (less
  weight); the ``log sigma`` keeps sigmas from growing without bound. The network learns
  ``s_i = log sigma_i`` (unconstrained, stable); the training module keeps it out of weight
  decay (:data:`SIGMA_PARAMETER`). Initial sigmas come from ``initial_sigmas`` (default
  1: the loss starts as the fixed one, halved), e.g. written by
  ``python -m vmatdose.calibrate_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

WEIGHTINGS = ("fixed", "uncertainty")
#: name of the learned log-sigma parameters (``loss.log_sigmas``)
SIGMA_PARAMETER = "log_sigmas"


class CompositeLoss(nn.Module):
    """Weighted sum of loss terms.

    Every term is an ``nn.Module`` called as ``term(pred, batch) -> scalar tensor`` where
    ``pred`` is the (B, 1, Z, Y, X) predicted dose divided by ``batch["dose_scale_gy"]`` and
    ``batch`` holds the sample keys of :mod:`vmatdose.data.pipeline`.

    Args:
        terms: name -> ``{"weight": float, "term": nn.Module}`` (the ``loss`` config group
            builds this with ``instantiate``). Terms of weight 0 are not computed.
        weighting: ``fixed`` or ``uncertainty`` (see the module docstring).
        initial_sigmas: term name -> initial sigma (> 0) for ``uncertainty``; terms not
            named start at 1.
    """

    def __init__(self, terms: Mapping[str, Mapping], weighting: str = "fixed",
                 initial_sigmas: Mapping[str, float] | None = None):
        super().__init__()
        if not terms:
            raise ValueError("a loss needs at least one term (loss.terms is empty)")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, not {weighting!r}")
        self.weights: dict[str, float] = {}
        modules = {}
        for name, spec in terms.items():
            if "term" not in spec:
                raise ValueError(f"loss term {name!r} has no 'term' entry: {dict(spec)}")
            self.weights[name] = float(spec.get("weight", 1.0))
            modules[name] = spec["term"]
        self.terms = nn.ModuleDict(modules)
        self.weighting = weighting
        self.log_sigmas = (nn.ParameterDict(_initial_log_sigmas(self.weights, initial_sigmas))
                           if weighting == "uncertainty" else None)

    def sigmas(self) -> dict[str, float]:
        """Term name -> current sigma (empty for ``fixed`` weighting)."""
        if self.log_sigmas is None:
            return {}
        return {name: float(s.detach().exp()) for name, s in self.log_sigmas.items()}

    def forward(self, pred: torch.Tensor, batch: Mapping) -> tuple[torch.Tensor,
                                                                   dict[str, torch.Tensor]]:
        """Returns ``(total, {name: unweighted value})``."""
        values: dict[str, torch.Tensor] = {}
        total = pred.new_zeros(())
        for name, term in self.terms.items():
            weight = self.weights[name]
            if weight == 0:
                continue
            values[name] = term(pred, batch)
            total = total + self._weighted(name, weight * values[name])
        return total, values

    def _weighted(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.log_sigmas is None:
            return value
        s = self.log_sigmas[name]
        return value * torch.exp(-2.0 * s) / 2.0 + s


def _initial_log_sigmas(weights: Mapping[str, float],
                        initial: Mapping[str, float] | None) -> dict[str, nn.Parameter]:
    initial = dict(initial or {})
    unknown = sorted(set(initial) - set(weights))
    if unknown:
        raise ValueError(f"loss.initial_sigmas names terms the loss lacks: {unknown}; "
                         f"terms: {sorted(weights)}")
    out = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        sigma = float(initial.get(name, 1.0))
        if not sigma > 0:
            raise ValueError(f"loss.initial_sigmas.{name} must be positive, not {sigma}")
        out[name] = nn.Parameter(torch.tensor(sigma).log())
    return out
