"""A loss is a weighted set of named terms; each term is logged on its own."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class CompositeLoss(nn.Module):
    """Weighted sum of loss terms.

    Every term is an ``nn.Module`` called as ``term(pred, batch) -> scalar tensor`` where
    ``pred`` is the (B, 1, Z, Y, X) predicted dose divided by ``batch["dose_scale_gy"]`` and
    ``batch`` holds the sample keys of :mod:`vmatdose.data.transforms`.

    Args:
        terms: name -> ``{"weight": float, "term": nn.Module}`` (the ``loss`` config group
            builds this with ``instantiate``). Terms of weight 0 are not computed.
    """

    def __init__(self, terms: Mapping[str, Mapping]):
        super().__init__()
        if not terms:
            raise ValueError("a loss needs at least one term (loss.terms is empty)")
        self.weights: dict[str, float] = {}
        modules = {}
        for name, spec in terms.items():
            if "term" not in spec:
                raise ValueError(f"loss term {name!r} has no 'term' entry: {dict(spec)}")
            self.weights[name] = float(spec.get("weight", 1.0))
            modules[name] = spec["term"]
        self.terms = nn.ModuleDict(modules)

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
            total = total + weight * values[name]
        return total, values
