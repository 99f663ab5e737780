"""Denoising diffusion maths on MONAI's schedulers: DDPM targets, x0 estimates, DDIM sampling.

Notation: ``clean`` is the data sample x0 (the dose in the model's [-1, 1] range),
``noisy`` the diffused x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, ``abar`` the
cumulative product of the scheduler's alphas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, Scheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: ``denoiser(noisy (B, 1, Z, Y, X), timesteps (B,)) -> network output (B, 1, Z, Y, X)``
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alpha_bar(scheduler: Scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t per sample, shaped (B, 1, 1, 1, 1) to broadcast against ``like``."""
    abar = scheduler.alphas_cumprod.to(like.device, torch.float32)[timesteps.to(like.device)]
    return abar.reshape(-1, *([1] * (like.ndim - 1)))


def training_target(scheduler: Scheduler, clean: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the network should output for ``scheduler.prediction_type``:
    eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0 itself. Same shape as ``clean``."""
    kind = scheduler.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        abar = alpha_bar(scheduler, timesteps, clean)
        return abar.sqrt() * noise - (1 - abar).sqrt() * clean
    raise ValueError(f"unknown prediction_type {kind!r}; choose one of {PREDICTION_TYPES}")


def predicted_clean(scheduler: Scheduler, output: torch.Tensor, noisy: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """The network's estimate of x0 from its output at x_t (the inverse of the target)."""
    kind = scheduler.prediction_type
    abar = alpha_bar(scheduler, timesteps, noisy)
    if kind == "epsilon":
        return (noisy - (1 - abar).sqrt() * output) / abar.sqrt()
    if kind == "sample":
        return output
    if kind == "v_prediction":
        return abar.sqrt() * noisy - (1 - abar).sqrt() * output
    raise ValueError(f"unknown prediction_type {kind!r}; choose one of {PREDICTION_TYPES}")


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, scheduler: DDIMScheduler, noise: torch.Tensor,
                steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise x_T to x0.

    Args:
        denoiser: the conditioned network, see :data:`Denoiser`.
        scheduler: MONAI DDIM scheduler with the training noise schedule.
        noise: (B, 1, Z, Y, X) x_T ~ N(0, I), float32; all randomness of the sample.
        steps: number of denoising steps (network evaluations).
    Returns:
        (B, 1, Z, Y, X) float32 sample in the model's [-1, 1] range.
    """
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps.tolist():
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        output = denoiser(x, timesteps).float()
        x, _ = scheduler.step(output, t, x, eta=0.0)
    return x.float()
