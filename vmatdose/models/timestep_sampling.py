"""Which noise levels a generative dose model trains on: the law of its training timesteps.

In both of this project's generative models the timestep t in [0, T) counts noise (MONAI's
``DDPMScheduler`` and ``RFlowScheduler`` conventions): t near T is (almost) pure noise.
A network that predicts the dose itself (x0 / data prediction) learns little near t = 0,
where its noisy input already holds the answer; the hard part, reading the dose from the
CT and masks, happens at high noise, which also decides where a few-step sampler lands.
``logit_normal`` draws u = sigmoid(loc + scale n), n ~ N(0, 1), and t = u T (Esser et al.
2024, "Scaling rectified flow transformers", section 3.1): ``loc`` > 0 shifts the mass
to high noise, as their resolution-dependent shift does for large images (a shift by a
factor a of the noise-to-signal time is ``loc`` += ln a; MONAI's
``monai.networks.schedulers.rectified_flow.timestep_transform`` gives a = 2.1 for the
48 x 64 x 96 phantom against a 32^3 base, loc ~ 0.7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DISTRIBUTIONS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimestepSampling:
    """The distribution of training timesteps.

    Args:
        distribution: ``uniform`` over [0, T) or ``logit_normal`` (see the module).
        loc, scale: the logit-normal's location and scale (of the logit of t / T);
            ignored by ``uniform``.
    """

    distribution: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"timestep_sampling.distribution {self.distribution!r} is not one "
                             f"of {DISTRIBUTIONS}")
        if not self.scale > 0:
            raise ValueError(f"timestep_sampling.scale must be > 0, not {self.scale}")

    def fractions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) float32 noise fractions t / T in [0, 1), drawn on the CPU."""
        if self.distribution == "uniform":
            return torch.rand(n, generator=generator)
        logits = self.loc + self.scale * torch.randn(n, generator=generator)
        return torch.sigmoid(logits).clamp_max(1.0 - 1e-6)

    def sample(self, n: int, num_train_timesteps: int,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """(n,) int64 training timesteps in [0, ``num_train_timesteps`` - 1] on ``device``."""
        t = (self.fractions(n, generator) * num_train_timesteps).long()
        return t.clamp(0, num_train_timesteps - 1).to(device)
