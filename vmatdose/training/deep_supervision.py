"""Deep supervision: the loss on auxiliary decoder heads as well as on the main output.

MONAI's :class:`~monai.networks.nets.DynUNet` with ``deep_supervision=True`` returns, in
training mode, the main output and ``deep_supr_num`` lower-resolution heads (upsampled to
full size) stacked on dim 1: (B, 1 + deep_supr_num, 1, Z, Y, X). In eval mode it returns
the main output only. The weighted sum over heads is MONAI's
:class:`~monai.losses.DeepSupervisionLoss`, around the composite loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.losses import DeepSupervisionLoss
from torch import nn

from vmatdose.losses import CompositeLoss
from vmatdose.training.module import DoseModule


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Non-negative head weights scaled to sum to 1 (so the total stays on the scale of a
    single-output model's loss)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"head weights must be non-negative with a positive sum: {weights}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


class HeadLoss(nn.Module):
    """A :class:`CompositeLoss` seen as ``loss(head, target)`` for
    :class:`DeepSupervisionLoss`; it scores each head against ``batch`` and keeps each
    head's ``(total, terms)`` for logging."""

    def __init__(self, loss: CompositeLoss, batch: Mapping):
        super().__init__()
        self.loss, self.batch = loss, batch
        self.per_head: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def forward(self, head: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total, terms = self.loss(head, self.batch)
        self.per_head.append((total.detach(), terms))
        return total


class DeepSupervisionDoseModule(DoseModule):
    """:class:`DoseModule` for networks that return stacked auxiliary heads in training.

    Args:
        head_weights: loss weight of each head, main head first (normalised to sum 1);
            ``None``: MONAI's ``exp`` weights (1, 1/2, 1/4, ...), normalised.
        *args, **kwargs: :class:`DoseModule` arguments.
    """

    def __init__(self, *args: Any, head_weights: Sequence[float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_weights = list(head_weights) if head_weights is not None else None

    def weights_for(self, n_heads: int) -> list[float]:
        """Normalised weights for ``n_heads`` outputs (checks the configured count)."""
        weights = self.head_weights or DeepSupervisionLoss(nn.L1Loss()).get_weights(n_heads)
        if len(weights) != n_heads:
            raise ValueError(f"{len(weights)} head_weights for a network with {n_heads} "
                             "outputs (main head + deep_supr_num)")
        return normalised_weights(weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> (B, 1, Z, Y, X): the main head, in train and eval mode."""
        out = self.net(image)
        return out[:, 0] if out.ndim == image.ndim + 1 else out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Weighted loss over every head; logs the main head's terms and ``head<i>``
        totals of the auxiliary heads."""
        batch = self.crop_to_body(batch)
        out = self.net(batch["image"])
        heads = list(out.unbind(dim=1)) if out.ndim == batch["image"].ndim + 1 else [out]
        heads = [self.masked_for_loss(head, batch) for head in heads]
        head_loss = HeadLoss(self.loss, batch)
        total = DeepSupervisionLoss(head_loss, weights=self.weights_for(len(heads)))(
            heads, batch["dose"])
        (_, terms), *auxiliary = head_loss.per_head
        terms = {**terms, **{f"head{i}": t for i, (t, _) in enumerate(auxiliary, start=1)}}
        self._log_loss("train", total, terms, batch["image"].shape[0])
        return total
