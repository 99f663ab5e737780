"""Rectified flow (flow matching on straight paths) on MONAI's :class:`RFlowScheduler`.

MONAI's convention: timestep t in [0, T] counts noise, x_t = (1 - t/T) x1 + (t/T) eps
(``RFlowScheduler.add_noise``), and the network predicts the velocity v = x1 - eps that
carries noise (t = T) to the data x1 (t = 0). Euler sampling is
:class:`~monai.inferers.DiffusionInferer` over ``RFlowScheduler.step``. MONAI has no
higher-order solver, so Heun's (Karras et al. 2022) is here, built on the same ``step``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import RFlowScheduler

SOLVERS = ("euler", "heun")
#: What the network outputs: the velocity (MONAI's convention) or the data x1 itself
#: (x-prediction; the velocity follows from it, :class:`DataPredictionVelocity`).
PREDICTIONS = ("velocity", "data")

#: ``velocity(x_t (B, 1, Z, Y, X), timesteps (B,) in [0, T]) -> v (B, 1, Z, Y, X)``
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rflow_scheduler(num_train_timesteps: int = 1000) -> RFlowScheduler:
    """MONAI's rectified-flow scheduler with discrete timesteps, usable as a submodule.

    MONAI 1.6's ``RFlowScheduler.__init__`` never calls ``nn.Module.__init__`` (its other
    schedulers do), so a LightningModule holding one fails in ``train()``/``to()``; the
    missing module state is added here.
    """
    scheduler = RFlowScheduler(num_train_timesteps=num_train_timesteps)
    if "_modules" not in scheduler.__dict__:
        torch.nn.Module.__init__(scheduler)
    return scheduler


def predicted_data(noisy: torch.Tensor, velocity: torch.Tensor, timesteps: torch.Tensor,
                   num_train_timesteps: int) -> torch.Tensor:
    """One Euler jump to t = 0: x1_hat = x_t + (t / T) v_hat (``timesteps`` (B,))."""
    t = timesteps.to(noisy).reshape(-1, *([1] * (noisy.ndim - 1))) / num_train_timesteps
    return noisy + t * velocity


def velocity_from_data(noisy: torch.Tensor, data: torch.Tensor, timesteps: torch.Tensor,
                       num_train_timesteps: int) -> torch.Tensor:
    """The straight-path velocity that reaches the predicted data ``data`` from ``noisy``
    at t: v = (x1_hat - x_t) T / t (the inverse of :func:`predicted_data`; ``timesteps``
    (B,) or (1,), t >= 1: samplers never query t = 0)."""
    t = timesteps.to(noisy).reshape(-1, *([1] * (noisy.ndim - 1))).clamp_min(1.0)
    return (data - noisy) * (num_train_timesteps / t)


class DataPredictionVelocity(torch.nn.Module):
    """A network that predicts the data x1 (output (B, 1, ...)) as the velocity network
    MONAI's sampling loop and :func:`heun_sample` step with: same call signature
    ``(x, timesteps, context=None)``, the diffused state is ``x[:, :1]``."""

    def __init__(self, net: torch.nn.Module, num_train_timesteps: int):
        super().__init__()
        self.net = net
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        data = self.net(x, timesteps=timesteps, context=context).float()
        return velocity_from_data(x[:, :1].float(), data, timesteps, self.num_train_timesteps)


def step_pairs(scheduler: RFlowScheduler) -> list[tuple[int, int]]:
    """(t, next t) of every step of the scheduler's inference grid, ending at 0."""
    times = scheduler.timesteps.tolist()
    return list(zip(times, times[1:] + [0]))


@torch.no_grad()
def heun_sample(velocity: Velocity, scheduler: RFlowScheduler,
                noise: torch.Tensor) -> torch.Tensor:
    """Heun (2nd order) integration from ``noise`` (t = T) to data over the scheduler's
    grid (``set_timesteps`` first): an Euler predictor, then the step taken with the mean
    of both end velocities. The last step stays Euler, so the network is never queried at
    t = 0: 2 * steps - 1 evaluations.

    Args:
        velocity: the conditioned velocity network, see :data:`Velocity`.
        noise: (B, 1, Z, Y, X) float32; all randomness of the sample.
    Returns:
        (B, 1, Z, Y, X) float32 sample.
    """
    x = noise.float()
    pairs = step_pairs(scheduler)
    for i, (t, t_next) in enumerate(pairs):
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device)).float()
        x_euler, _ = scheduler.step(v, t, x, t_next)
        if i == len(pairs) - 1:
            return x_euler
        v_next = velocity(x_euler, torch.full((x.shape[0],), t_next, device=x.device)).float()
        x, _ = scheduler.step(0.5 * (v + v_next), t, x, t_next)
    return x


def network_evaluations(steps: int, solver: str) -> int:
    """Network calls of ``steps`` steps of ``solver``."""
    return steps if solver == "euler" else 2 * steps - 1
