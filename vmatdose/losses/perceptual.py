"""Perceptual loss: VGG16 feature differences on axial dose slices.

A 2D ImageNet network sees a dose slice as a grey image; matching its feature maps
penalises wrong shapes of isodose lines more than a voxel loss does. The weights must come
from a local file (torchvision's ``vgg16`` state_dict); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vmatdose.losses.vgg import VGG16Features, load_vgg16_features_state
from vmatdose.losses.voxel import voxel_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NO_WEIGHTS = (
    "the perceptual loss needs ImageNet VGG16 weights and never downloads them: set "
    "loss.terms.perceptual.term.weights_path=/path/to/vgg16.pth (a torchvision vgg16 "
    "state_dict such as vgg16-397923af.pth). For tests only, "
    "loss.terms.perceptual.term.random_weights=true uses untrained weights.")


def body_slice_candidates(body: torch.Tensor) -> list[torch.Tensor]:
    """For each case, the axial (z) indices whose slice contains body (all if none do).

    ``body``: (B, 1, Z, Y, X) -> B tensors of z indices.
    """
    has_body = body.flatten(3).amax(dim=(1, 3)) > 0  # (B, Z)
    all_z = torch.arange(body.shape[2], device=body.device)
    return [all_z[row] if row.any() else all_z for row in has_body]


def pick_slices(candidates: torch.Tensor, n: int, random: bool) -> torch.Tensor:
    """``n`` z indices from ``candidates``: random without replacement (with replacement
    if there are fewer), or evenly spaced (deterministic, for validation)."""
    count = candidates.numel()
    if not random:
        positions = torch.linspace(0, count - 1, n, device=candidates.device)
        return candidates[positions.round().long()]
    if count >= n:
        return candidates[torch.randperm(count, device=candidates.device)[:n]]
    return candidates[torch.randint(count, (n,), device=candidates.device)]


def axial_slices(volume: torch.Tensor, z_indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, 1, Z, Y, X) and B index tensors of length n -> (B * n, 1, Y, X)."""
    return torch.cat([volume[b, :, z].transpose(0, 1) for b, z in enumerate(z_indices)])


class PerceptualLoss(nn.Module):
    """Slice-wise VGG16 feature loss on the dose.

    Each call samples ``n_slices`` axial slices per case (random in training, evenly spaced
    in eval mode) among slices that contain body, replicates each dose slice to 3 channels,
    normalises it with the ImageNet mean and std (dose fractions of the highest
    prescription read as [0, 1] intensities), and averages the feature error over the
    chosen layers.

    Args:
        weights_path: torchvision ``vgg16`` state_dict (full, or ``features.*`` only).
        random_weights: allow running without ``weights_path`` on random weights (tests).
        layers: VGG16 layer names whose activations are compared.
        n_slices: axial slices per case and step.
        kind: ``mse`` or ``l1`` between feature maps.
    """

    def __init__(self, weights_path: str | None = None, random_weights: bool = False,
                 layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3"),
                 n_slices: int = 4, kind: str = "mse"):
        super().__init__()
        if weights_path is None and not random_weights:
            raise ValueError(_NO_WEIGHTS)
        if weights_path is not None and random_weights:
            raise ValueError("give either weights_path or random_weights=true, not both")
        if n_slices < 1:
            raise ValueError(f"n_slices must be >= 1, got {n_slices}")
        if kind not in ("mse", "l1"):
            raise ValueError(f"perceptual kind must be 'mse' or 'l1', got {kind!r}")
        self.vgg = VGG16Features(layers)
        if weights_path is not None:
            self.vgg.load_torchvision_state(load_vgg16_features_state(weights_path))
        self.n_slices, self.kind = n_slices, kind
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def to_vgg_input(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 1, Y, X) dose fractions -> (N, 3, Y, X) ImageNet-normalised images."""
        return (slices.expand(-1, 3, -1, -1) - self.mean.to(slices)) / self.std.to(slices)

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``pred``, ``batch["dose"]``: (B, 1, Z, Y, X) normalised dose -> scalar."""
        z = [pick_slices(c, self.n_slices, random=self.training)
             for c in body_slice_candidates(batch["body"])]
        pred_features = self.vgg(self.to_vgg_input(axial_slices(pred, z)))
        with torch.no_grad():
            ref_features = self.vgg(self.to_vgg_input(axial_slices(batch["dose"].to(pred), z)))
        errors = [voxel_error(p, r, self.kind).mean()
                  for p, r in zip(pred_features, ref_features)]
        return torch.stack(errors).mean()
