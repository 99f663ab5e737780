"""Denoising diffusion maths on MONAI's schedulers: DDPM training targets and x0 estimates.

Sampling is MONAI's: :class:`~monai.inferers.DiffusionInferer` with concatenation
conditioning over :class:`~monai.networks.schedulers.DDIMScheduler` steps, on the grid of
:func:`trailing_timesteps`.

Notation: ``clean`` is the data sample x0 (the dose in the model's [-1, 1] range),
``noisy`` the diffused x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, ``abar`` the
cumulative product of the scheduler's alphas.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import Scheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
        return scheduler.get_velocity(clean, noise, timesteps)
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


def trailing_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """DDIM's inference grid, (steps,) int64 from T - 1 down by T // steps ("trailing"
    spacing, Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed"): it starts at pure noise and is the grid ``DDIMScheduler.step`` walks, which
    always steps from t to t - T // steps (the final step to alpha_bar = 1).

    MONAI 1.6's ``DDIMScheduler.set_timesteps`` spaces its grid by (T - 1) / (steps - 1)
    instead ([999, 749, 500, 250, 0] for 5 steps, against steps of 200): each state then
    holds more noise than the timestep the network is told, and the last, queried as
    t = 0, keeps the noise of t = 50 (cosine schedule: 0.09 of the [-1, 1] range, some
    4 Gy at 70 Gy) in the sample.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], not {steps}")
    ratio = num_train_timesteps // steps
    return torch.arange(steps, dtype=torch.long).mul(-ratio).add(num_train_timesteps - 1)
