"""Rectified flow (flow matching on straight paths) and its ODE samplers.

Convention: time runs from noise to data. With x0 ~ N(0, I) and x1 the data sample (the
dose in the model's [-1, 1] range), x_t = (1 - t) x0 + t x1 and the velocity to learn is
v = x1 - x0 (constant along each straight path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SOLVERS = ("euler", "heun")

#: ``velocity(x_t (B, 1, Z, Y, X), t (B,) in [0, 1]) -> v (B, 1, Z, Y, X)``
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t x1 with ``t`` of shape (B,) broadcast over the volume."""
    tt = _per_sample(t, data)
    return (1 - tt) * noise + tt * data


def target_velocity(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """v = x1 - x0, the straight path's velocity."""
    return data - noise


def predicted_data(state: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One Euler jump to t = 1: x1_hat = x_t + (1 - t) v_hat."""
    return state + (1 - _per_sample(t, state)) * velocity


def _times(steps: int, x: torch.Tensor) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, device=x.device)


@torch.no_grad()
def integrate(velocity: Velocity, noise: torch.Tensor, steps: int,
              solver: str = "euler") -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (``noise``) to t = 1 on a uniform grid.

    ``euler`` uses ``steps`` network evaluations. ``heun`` (2nd order) adds a corrector
    evaluation at the end of every step but the last, which is a plain Euler step (as in
    Karras et al. 2022), so the network is never queried at t = 1: 2 * steps - 1
    evaluations.

    Args:
        velocity: the conditioned velocity network, see :data:`Velocity`.
        noise: (B, 1, Z, Y, X) x0 ~ N(0, I), float32; all randomness of the sample.
        steps: number of time steps (>= 1).
        solver: ``euler`` or ``heun``.
    Returns:
        (B, 1, Z, Y, X) float32 sample x1.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = _times(steps, noise)
    x = noise.float()
    batch = x.shape[0]
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        dt = t_next - t
        v = velocity(x, t.expand(batch)).float()
        if solver == "euler" or i == steps - 1:
            x = x + dt * v
            continue
        x_pred = x + dt * v
        v_next = velocity(x_pred, t_next.expand(batch)).float()
        x = x + dt * 0.5 * (v + v_next)
    return x


def network_evaluations(steps: int, solver: str) -> int:
    """Network calls :func:`integrate` makes for ``steps`` steps of ``solver``."""
    return steps if solver == "euler" else 2 * steps - 1
