"""Deep supervision: the loss on auxiliary decoder heads as well as on the main output.

MONAI's :class:`~monai.networks.nets.DynUNet` with ``deep_supervision=True`` returns, in
training mode, the main output and ``deep_supr_num`` lower-resolution heads (upsampled to
full size) stacked on dim 1: (B, 1 + deep_supr_num, 1, Z, Y, X). In eval mode it returns
the main output only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vmatdose.training.module import DoseModule


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Non-negative head weights scaled to sum to 1 (so the total stays on the scale of a
    single-output model's loss)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"head weights must be non-negative with a positive sum: {weights}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def halving_weights(n_heads: int) -> list[float]:
    """nnU-Net's default: 1, 1/2, 1/4, ... for the main head and then coarser heads."""
    return [0.5 ** i for i in range(n_heads)]


class DeepSupervisionDoseModule(DoseModule):
    """:class:`DoseModule` for networks that return stacked auxiliary heads in training.

    With an adversarial loss term, training uses :class:`DoseModule`'s adversarial step on
    the main head alone (the auxiliary heads get no loss).

    Args:
        head_weights: loss weight of each head, main head first (normalised to sum 1);
            ``None`` halves the weight per head (1, 1/2, 1/4, ...).
        *args, **kwargs: :class:`DoseModule` arguments.
    """

    def __init__(self, *args: Any, head_weights: Sequence[float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_weights = list(head_weights) if head_weights is not None else None

    def weights_for(self, n_heads: int) -> list[float]:
        """Normalised weights for ``n_heads`` outputs (checks the configured count)."""
        weights = self.head_weights or halving_weights(n_heads)
        if len(weights) != n_heads:
            raise ValueError(f"{len(weights)} head_weights for a network with {n_heads} "
                             "outputs (main head + deep_supr_num)")
        return normalised_weights(weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> (B, 1, Z, Y, X): the main head, in train and eval mode."""
        out = self.net(image)
        return out[:, 0] if out.ndim == image.ndim + 1 else out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if getattr(self, "adversarial_term", None) is not None:
            # DoseModule's adversarial (manual-optimisation) step sees the main head only.
            return super().training_step(batch, batch_idx)
        out = self.net(batch["image"])
        heads = out.unbind(dim=1) if out.ndim == batch["image"].ndim + 1 else (out,)
        total = out.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for i, (weight, head) in enumerate(zip(self.weights_for(len(heads)), heads)):
            head_total, head_terms = self.loss(self.masked_for_loss(head, batch), batch)
            total = total + weight * head_total
            if i == 0:
                terms.update(head_terms)
            else:
                terms[f"head{i}"] = head_total
        self._log_loss("train", total, terms, batch["image"].shape[0])
        return total
