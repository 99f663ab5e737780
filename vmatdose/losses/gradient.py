"""Gradient loss: difference of 3D dose-gradient magnitudes, in dose per mm.

Sharp fall-off around the targets is what makes a plan good; a voxel loss alone blurs it.
This term compares the gradient magnitude of the predicted and reference dose, with the
derivatives divided by the voxel spacing so anisotropic grids (3 mm slices, 1 mm pixels)
are measured in one physical unit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from vmatdose.losses.voxel import masked_mean, voxel_error

_OPERATORS = ("sobel", "central")


def derivative_kernels(operator: str = "sobel") -> torch.Tensor:
    """(3, 1, 3, 3, 3) correlation kernels of d/dz, d/dy, d/dx in units of one voxel.

    ``central``: (x[i+1] - x[i-1]) / 2. ``sobel``: the same difference, smoothed with
    [1, 2, 1] / 4 along the two other axes. Both return exactly the slope on a linear ramp.
    """
    if operator not in _OPERATORS:
        raise ValueError(f"unknown gradient operator {operator!r}; choose one of {_OPERATORS}")
    diff = torch.tensor([-0.5, 0.0, 0.5])
    smooth = torch.tensor([0.25, 0.5, 0.25] if operator == "sobel" else [0.0, 1.0, 0.0])
    kernels = []
    for axis in range(3):
        factors = [diff if a == axis else smooth for a in range(3)]
        kernels.append(torch.einsum("i,j,k->ijk", *factors))
    return torch.stack(kernels)[:, None]


def spatial_gradient(x: torch.Tensor, spacing_mm: torch.Tensor,
                     kernels: torch.Tensor) -> torch.Tensor:
    """Per-mm gradient of a single-channel volume.

    Args:
        x: (B, 1, Z, Y, X).
        spacing_mm: (B, 3) voxel size ``(dz, dy, dx)`` in mm.
        kernels: (3, 1, 3, 3, 3) from :func:`derivative_kernels`.
    Returns:
        (B, 3, Z, Y, X) ``(d/dz, d/dy, d/dx)`` in units of ``x`` per mm; borders use
        replicate padding (no artificial edge at the volume boundary).
    """
    padded = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    grad = F.conv3d(padded, kernels.to(x))
    return grad / spacing_mm.to(x).view(-1, 3, 1, 1, 1)


def gradient_magnitude(x: torch.Tensor, spacing_mm: torch.Tensor, kernels: torch.Tensor,
                       eps: float = 1e-20) -> torch.Tensor:
    """(B, 1, Z, Y, X) -> (B, 1, Z, Y, X) float32 Euclidean norm of the per-mm gradient.

    ``eps`` under the root keeps the derivative finite where the gradient vanishes; the
    norm is taken in float32 (autocast off) so that it does not underflow under mixed
    precision.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        grad = spatial_gradient(x.float(), spacing_mm, kernels)
    return (grad.square().sum(dim=1, keepdim=True) + eps).sqrt()


class GradientLoss(nn.Module):
    """Voxel error between predicted and reference dose-gradient magnitudes.

    Args:
        operator: ``sobel`` (smoothed, less noise-sensitive) or ``central`` differences.
        kind: ``l1``, ``mse`` or ``huber`` error between the two magnitude maps.
        in_body: average over the body only.
        length_mm: gradients are expressed per ``length_mm`` mm (1: dose fraction per mm;
            a typical voxel size makes the term's scale close to per-voxel differences).
        huber_delta: Huber transition point, in the same units as the magnitudes.
    """

    def __init__(self, operator: str = "sobel", kind: str = "l1", in_body: bool = False,
                 length_mm: float = 1.0, huber_delta: float = 0.05):
        super().__init__()
        if length_mm <= 0:
            raise ValueError(f"length_mm must be positive, got {length_mm}")
        self.register_buffer("kernels", derivative_kernels(operator), persistent=False)
        voxel_error(torch.zeros(1), torch.zeros(1), kind)  # fail early on an unknown kind
        self.kind, self.in_body = kind, in_body
        self.length_mm, self.huber_delta = float(length_mm), huber_delta

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``pred``, ``batch["dose"]``: (B, 1, Z, Y, X) normalised dose -> scalar."""
        spacing = batch["spacing_mm"]
        pred_mag = gradient_magnitude(pred, spacing, self.kernels) * self.length_mm
        ref_mag = gradient_magnitude(batch["dose"], spacing, self.kernels) * self.length_mm
        error = voxel_error(pred_mag, ref_mag, self.kind, self.huber_delta)
        return masked_mean(error, batch["body"] if self.in_body else None)
