"""Generative dose models behind the :class:`DoseModule` contract.

* :class:`DiffusionDoseModule`: conditional DDPM (MONAI ``DDPMScheduler``) trained to predict
  the noise, v or the dose; sampled with deterministic DDIM (MONAI ``DDIMScheduler``).
* :class:`FlowMatchingDoseModule`: rectified flow (MONAI ``RFlowScheduler``) trained to
  predict the velocity from noise to dose, or the dose itself; sampled with Euler or Heun
  steps.

Both diffuse the dose mapped to [-1, 1] (``dose_max`` -> +1) with a network conditioned on
the batch ``image`` by channel concatenation (MONAI ``DiffusionInferer``,
``mode="concat"``: network input ``[state, image]``): a MONAI ``DiffusionModelUNet`` or any
dose network reading the noise level as a channel
(:class:`~vmatdose.models.noise_level.NoiseLevelChannelNet`). They predict whole volumes
as an ensemble of samples (mean dose and per-voxel standard deviation), draw all noise
from a ``torch.Generator`` seeded with ``sampling_seed`` so predictions repeat exactly,
and sample with an exponential moving average of the weights when ``ema_decay`` is set.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from torch import nn
from torch.nn import functional as F

from vmatdose.inference.volume import PassFn, pad_to_multiple
from vmatdose.losses import CompositeLoss
from vmatdose.models import diffusion, flow
from vmatdose.models.noise_level import downsampling_factor
from vmatdose.models.prior_correction import PriorCorrectionNet
from vmatdose.models.timestep_sampling import TimestepSampling
from vmatdose.training.module import DoseModule, weight_decay_groups
from vmatdose.training.weight_averaging import check_ema_decay, ema_decay_at


def dose_to_model(dose: torch.Tensor, dose_max: float) -> torch.Tensor:
    """Normalised dose [0, dose_max] -> model range [-1, 1] (same shape)."""
    return dose * (2.0 / dose_max) - 1.0


def model_to_dose(x: torch.Tensor, dose_max: float) -> torch.Tensor:
    """Model range [-1, 1] -> normalised dose [0, dose_max] (same shape)."""
    return (x + 1.0) * (dose_max / 2.0)


def first_cases(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` cases of a collated batch (tensors and lists indexed by case)."""
    size = batch["image"].shape[0]
    if n >= size:
        return dict(batch)
    return {k: v[:n] if isinstance(v, torch.Tensor | list | tuple) and len(v) == size else v
            for k, v in batch.items()}


def ensemble_std(samples: torch.Tensor) -> torch.Tensor:
    """Per-voxel sample standard deviation over dim 0 (Bessel-corrected); zeros for one
    sample. (N, B, 1, Z, Y, X) -> (B, 1, Z, Y, X)."""
    if samples.shape[0] == 1:
        return torch.zeros_like(samples[0])
    return samples.std(dim=0, correction=1)


class GenerativeDoseModule(DoseModule, abc.ABC):
    """Shared training, sampling and validation logic of the generative dose models.

    Args:
        net: a MONAI :class:`~monai.networks.nets.DiffusionModelUNet` or a
            :class:`~vmatdose.models.noise_level.NoiseLevelChannelNet`, with
            ``in_channels`` = 1 (the diffused dose) + the ``image`` channels, one output.
        loss: voxel loss terms, used on the validation samples (as for every model) and,
            with ``loss_on_x0_weight`` > 0, on the network's one-step dose estimate in
            training. ``None`` for inference only.
        optimizer, scheduler: as for :class:`DoseModule`.
        sampling_steps: sampler steps at inference (DDIM steps or ODE steps).
        ensemble_size: samples per case; their mean is the prediction, their standard
            deviation the uncertainty map.
        sampling_seed: seed of the generator that draws the initial noise of every
            prediction call (the ensemble members take successive draws).
        val_sampling_steps: sampler steps of validation samples and of any prediction made
            while fitting (one sample per case, see :meth:`sampling_budget`).
        val_max_cases: validation cases sampled per epoch (``None``: all).
        loss_on_x0_weight: weight of ``loss`` on the dose estimate x0_hat in training.
        dose_max: normalised dose mapped to +1 (headroom above the highest prescription
            keeps hot spots inside the sampler's [-1, 1] range).
        divisible_by: whole volumes are zero-padded to multiples of this for sampling.
        timestep_sampling: the law of the training timesteps,
            :class:`~vmatdose.models.timestep_sampling.TimestepSampling` arguments
            (``distribution``, ``loc``, ``scale``); ``None``: uniform.
        prior_channel: index of the prior-dose channel in ``image``
            (``${vmatdose.prior_channel:${data}}``): the network's dose estimate
            (x-prediction only) is that prior plus the network's output, a correction
            (:class:`~vmatdose.models.prior_correction.PriorCorrectionNet`); ``None``: the
            network predicts the dose itself.
        ema_decay: keep an exponential moving average of the network weights
            (``ema_net``, updated after every training batch with decay
            ``min(ema_decay, (1 + n) / (10 + n))`` at update n, so a short run is not
            dominated by its random start) and sample with it; ``None``: sample with the
            trained weights.
        val_gamma: as for :class:`DoseModule`.
        **kwargs: further :class:`DoseModule` arguments.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: CompositeLoss | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        *,
        sampling_steps: int = 50,
        ensemble_size: int = 4,
        sampling_seed: int = 0,
        val_sampling_steps: int = 10,
        val_max_cases: int | None = 2,
        loss_on_x0_weight: float = 0.0,
        dose_max: float = 1.2,
        divisible_by: int = 16,
        ema_decay: float | None = None,
        prior_channel: int | None = None,
        timestep_sampling: Mapping[str, Any] | None = None,
        val_gamma: Mapping | None = None,
        **kwargs: Any,
    ):
        super().__init__(net, loss, optimizer, scheduler, divisible_by=divisible_by,
                         val_gamma=val_gamma, **kwargs)
        if self.inference_patch_size:
            raise ValueError("generative models sample whole volumes; set "
                             "model.inference_patch_size=null")
        factor = downsampling_factor(net)
        if divisible_by % factor:
            raise ValueError(f"divisible_by={divisible_by} is not a multiple of the network's "
                             f"downsampling factor {factor}")
        if sampling_steps < 1 or ensemble_size < 1 or val_sampling_steps < 1:
            raise ValueError("sampling_steps, ensemble_size and val_sampling_steps must be >= 1")
        self.sampling_steps = int(sampling_steps)
        self.ensemble_size = int(ensemble_size)
        self.sampling_seed = int(sampling_seed)
        self.val_sampling_steps = int(val_sampling_steps)
        self.val_max_cases = val_max_cases
        self.loss_on_x0_weight = float(loss_on_x0_weight)
        self.dose_max = float(dose_max)
        self._val_cases_seen = 0
        self.timestep_sampling = TimestepSampling(**dict(timestep_sampling or {}))
        self.prior_channel = None if prior_channel is None else int(prior_channel)
        if self.prior_channel is not None:  # the input is [diffused dose, image]
            self.net = PriorCorrectionNet(self.net, self.prior_channel + 1, self.dose_max)
        self.ema_decay = check_ema_decay(ema_decay, "model.ema_decay")
        self.ema_net: nn.Module | None = None
        if self.ema_decay is not None:
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # -- weights ------------------------------------------------------------------------

    @property
    def sampling_net(self) -> nn.Module:
        """The network that samples: the moving average when kept, else ``net``."""
        return self.ema_net if self.ema_net is not None else self.net

    @torch.no_grad()
    def update_ema(self) -> None:
        """One moving-average update of ``ema_net`` towards ``net`` (see ``ema_decay``)."""
        if self.ema_net is None:
            return
        decay = ema_decay_at(self.ema_decay, int(self.ema_updates))
        for average, current in zip(self.ema_net.parameters(), self.net.parameters()):
            average.lerp_(current.detach().to(average.dtype), 1.0 - decay)
        for average, current in zip(self.ema_net.buffers(), self.net.buffers()):
            average.copy_(current)
        self.ema_updates += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_ema()

    def configure_optimizers(self) -> Any:
        """As :class:`DoseModule`'s, over the trained parameters only (not ``ema_net``)."""
        trained = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=weight_decay_groups(trained))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "epoch"}}

    # -- what a generative model defines

    @property
    @abc.abstractmethod
    def train_scheduler(self) -> Scheduler:
        """The MONAI scheduler that noises the training samples (``add_noise``)."""

    @abc.abstractmethod
    def target_and_estimate(self, clean: torch.Tensor, noise: torch.Tensor,
                            noisy: torch.Tensor, output: torch.Tensor,
                            timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the network should have output, its one-step estimate of ``clean``) for
        the network ``output`` at ``noisy``; all (B, 1, Z, Y, X), ``timesteps`` (B,)."""

    @abc.abstractmethod
    def sample(self, noise: torch.Tensor, condition: torch.Tensor, steps: int) -> torch.Tensor:
        """Deterministic map from initial noise (B, 1, Z, Y, X) to a sample in [-1, 1]."""

    # -- randomness ---------------------------------------------------------------------

    @staticmethod
    def randn(shape: torch.Size, like: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal float32 noise on ``like``'s device; drawn on the CPU when a
        generator is given, so a seed gives the same noise on every device."""
        if generator is None:
            return torch.randn(shape, device=like.device)
        return torch.randn(shape, generator=generator).to(like.device)

    def objective(self, clean: torch.Tensor, condition: torch.Tensor,
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training objective on one batch: MSE between the network output and its target
        at random training steps drawn from ``timestep_sampling``.

        Args:
            clean: (B, 1, Z, Y, X) dose in the model range [-1, 1].
            condition: (B, C, Z, Y, X) the batch ``image``.
            generator: CPU generator for the noise and times (``None``: global RNG).
        Returns:
            (scalar loss, (B, 1, Z, Y, X) one-step estimate of ``clean`` in [-1, 1]).
        """
        scheduler = self.train_scheduler
        noise = self.randn(clean.shape, clean, generator)
        t = self.timestep_sampling.sample(clean.shape[0], scheduler.num_train_timesteps,
                                          generator, clean.device)
        output = self.inferer(clean, self.net, noise, t, condition=condition.to(clean.dtype),
                              mode="concat").float()
        noisy = scheduler.add_noise(clean, noise, t)
        target, clean_hat = self.target_and_estimate(clean, noise, noisy, output, t)
        return F.mse_loss(output, target), clean_hat.clamp(-1.0, 1.0)

    def inferer_sample(self, scheduler: Scheduler, noise: torch.Tensor,
                       condition: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """MONAI's sampling loop over ``scheduler``'s steps, concatenation conditioning,
        with ``net`` (default: :attr:`sampling_net`)."""
        return self.inferer.sample(noise, net or self.sampling_net, scheduler=scheduler,
                                   conditioning=condition.to(noise.dtype), mode="concat",
                                   verbose=False).float()

    # -- inference ----------------------------------------------------------------------

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict_dose(image)

    def is_fitting(self) -> bool:
        """Whether a Trainer is running ``fit`` with this module."""
        trainer = self._trainer
        return (trainer is not None and trainer.state.fn == TrainerFn.FITTING
                and trainer.state.status == TrainerStatus.RUNNING)

    def sampling_budget(self) -> tuple[int, int]:
        """(steps, ensemble size) of a prediction: ``sampling_steps`` and ``ensemble_size``,
        but ``val_sampling_steps`` and one sample while a Trainer is fitting the module, so
        that whatever predicts during training (validation, image callbacks) stays cheap."""
        if self.is_fitting():
            return self.val_sampling_steps, 1
        return self.sampling_steps, self.ensemble_size

    @torch.no_grad()
    def sample_doses(self, image: torch.Tensor, steps: int | None = None,
                     ensemble_size: int | None = None) -> torch.Tensor:
        """Ensemble of sampled doses for whole volumes of any size.

        Args:
            image: (B, C, Z, Y, X) conditioning channels.
            steps, ensemble_size: default to :meth:`sampling_budget`.
        Returns:
            (N, B, 1, Z, Y, X) float32 normalised doses >= 0.
        """
        default_steps, default_n = self.sampling_budget()
        steps = steps or default_steps
        n = ensemble_size or default_n
        if image.shape[1] + 1 != self.net.in_channels:
            raise ValueError(f"expected {self.net.in_channels - 1} condition channels, "
                             f"got {image.shape[1]}")
        condition, crop = pad_to_multiple(image, self.divisible_by)
        shape = torch.Size((condition.shape[0], 1, *condition.shape[2:]))
        generator = torch.Generator().manual_seed(self.sampling_seed)
        samples = []
        for _ in range(n):
            noise = self.randn(shape, condition, generator)
            x = self.sample(noise, condition, steps)[crop]
            samples.append(model_to_dose(x.float(), self.dose_max).clamp_min(0))
        return torch.stack(samples)

    @torch.no_grad()
    def ensemble_stats(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ensemble mean dose, per-voxel ensemble std) of ``image`` as it is (no TTA);
        the std is zero for a one-sample ensemble (see :meth:`sampling_budget`)."""
        samples = self.sample_doses(image)
        return samples.mean(dim=0), ensemble_std(samples)

    def passes(self) -> PassFn:
        """Each TTA view gives the ensemble's (mean, std): ``predict_with_uncertainty``
        averages means and stds over the flips, with the module's resolution factor and
        zeroing outside ``body`` (:class:`~vmatdose.inference.volume.VolumeInference`)."""
        return self.ensemble_stats

    @torch.no_grad()
    def predict_dose(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> (B, 1, Z, Y, X) ensemble mean normalised dose >= 0 on the
        network's grid (no TTA)."""
        return self.ensemble_stats(image)[0]

    @contextmanager
    def sampling_settings(self, steps: int, ensemble_size: int) -> Iterator[None]:
        """Temporarily sample with other ``steps`` and ``ensemble_size``."""
        saved = self.sampling_steps, self.ensemble_size
        self.sampling_steps, self.ensemble_size = steps, ensemble_size
        try:
            yield
        finally:
            self.sampling_steps, self.ensemble_size = saved

    # -- training and validation --------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        clean = dose_to_model(batch["dose"], self.dose_max)
        objective, clean_hat = self.objective(clean, batch["image"])
        total, terms = objective, {"objective": objective}
        if self.loss_on_x0_weight > 0 and self.loss is not None:
            x0 = self.masked_for_loss(model_to_dose(clean_hat, self.dose_max), batch)
            x0_total, x0_terms = self.loss(x0, batch)
            total = total + self.loss_on_x0_weight * x0_total
            terms.update({f"x0_{name}": value for name, value in x0_terms.items()})
        self._log_loss("train", total, terms, batch["image"].shape[0])
        return total

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_cases_seen = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Sample up to ``val_max_cases`` cases per epoch with ``val_sampling_steps`` steps
        and one sample each; log the objective (fixed noise) on the same cases."""
        if self.val_max_cases is not None:
            room = self.val_max_cases - self._val_cases_seen
            if room <= 0:
                return
            batch = first_cases(batch, room)
        n = batch["image"].shape[0]
        self._val_cases_seen += n
        with self.sampling_settings(self.val_sampling_steps, 1):
            super().validation_step(batch, batch_idx)
        generator = torch.Generator().manual_seed(self.sampling_seed + 1 + batch_idx)
        objective, _ = self.objective(dose_to_model(batch["dose"], self.dose_max),
                                      batch["image"], generator)
        self.log("val/objective", objective, batch_size=n, sync_dist=True)


class DiffusionDoseModule(GenerativeDoseModule):
    """Conditional DDPM; DDIM (eta = 0) sampling.

    Args:
        num_train_timesteps: diffusion steps T of the training chain.
        schedule: MONAI noise schedule name (``linear_beta``, ``scaled_linear_beta``,
            ``cosine``, ...); ``schedule_args`` its arguments (e.g. ``beta_start``).
        prediction_type: network target: ``epsilon`` (noise), ``v_prediction`` or
            ``sample``.
        clip_sample: clip DDIM's x0 estimate to [-1, 1] at every step.
        **kwargs: :class:`GenerativeDoseModule` arguments.
    """

    def __init__(self, *args: Any, num_train_timesteps: int = 1000,
                 schedule: str = "linear_beta", schedule_args: Mapping | None = None,
                 prediction_type: str = "epsilon", clip_sample: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if prediction_type not in diffusion.PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of "
                             f"{diffusion.PREDICTION_TYPES}")
        common = dict(num_train_timesteps=num_train_timesteps, schedule=schedule,
                      prediction_type=prediction_type, clip_sample=clip_sample,
                      **dict(schedule_args or {}))
        self.noise_scheduler = DDPMScheduler(**common)
        self.ddim = DDIMScheduler(**common)
        self.inferer = DiffusionInferer(self.noise_scheduler)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        if self.prior_channel is not None and prediction_type != "sample":
            raise ValueError("prior_channel (the dose as prior + correction) needs "
                             "prediction_type=sample, the network predicting the dose")

    @property
    def train_scheduler(self) -> Scheduler:
        return self.noise_scheduler

    def target_and_estimate(self, clean: torch.Tensor, noise: torch.Tensor,
                            noisy: torch.Tensor, output: torch.Tensor,
                            timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``prediction_type`` target and the x0 estimate from the output."""
        return (diffusion.training_target(self.noise_scheduler, clean, noise, timesteps),
                diffusion.predicted_clean(self.noise_scheduler, output, noisy, timesteps))

    def sample(self, noise: torch.Tensor, condition: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM (eta = 0) over :func:`~vmatdose.models.diffusion.trailing_timesteps`."""
        self.ddim.set_timesteps(steps)
        self.ddim.timesteps = diffusion.trailing_timesteps(self.num_train_timesteps, steps)
        return self.inferer_sample(self.ddim, noise, condition)


class FlowMatchingDoseModule(GenerativeDoseModule):
    """Conditional rectified flow along x_t = (1 - t/T) dose + (t/T) noise (MONAI's
    :class:`RFlowScheduler` convention, see :mod:`vmatdose.models.flow`).

    Args:
        solver: ``euler`` (MONAI's ``RFlowScheduler.step`` through the inferer) or
            ``heun`` (:func:`vmatdose.models.flow.heun_sample`).
        prediction: what the network outputs: ``velocity`` v = dose - noise, trained
            with the MSE to it, or ``data``, the dose itself (x-prediction, trained with
            the MSE to the dose; the sampler steps with the velocity it implies,
            :func:`vmatdose.models.flow.velocity_from_data`).
        num_train_timesteps: T, the range of the network's timestep input.
        **kwargs: :class:`GenerativeDoseModule` arguments.
    """

    def __init__(self, *args: Any, solver: str = "euler", prediction: str = "velocity",
                 num_train_timesteps: int = 1000, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if solver not in flow.SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {flow.SOLVERS}")
        if prediction not in flow.PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of "
                             f"{flow.PREDICTIONS}")
        self.solver = solver
        self.prediction = prediction
        if self.prior_channel is not None and prediction != "data":
            raise ValueError("prior_channel (the dose as prior + correction) needs "
                             "prediction=data, the network predicting the dose")
        self.rflow = flow.rflow_scheduler(num_train_timesteps)
        self.inferer = DiffusionInferer(self.rflow)

    @property
    def train_scheduler(self) -> Scheduler:
        return self.rflow

    def target_and_estimate(self, clean: torch.Tensor, noise: torch.Tensor,
                            noisy: torch.Tensor, output: torch.Tensor,
                            timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the velocity or the dose, the one-step estimate x1_hat)."""
        if self.prediction == "data":
            return clean, output
        return clean - noise, flow.predicted_data(noisy, output, timesteps,
                                                  self.rflow.num_train_timesteps)

    def velocity_net(self) -> nn.Module:
        """The sampling network as a velocity network (MONAI's convention)."""
        if self.prediction == "data":
            return flow.DataPredictionVelocity(self.sampling_net, self.rflow.num_train_timesteps)
        return self.sampling_net

    def sample(self, noise: torch.Tensor, condition: torch.Tensor, steps: int) -> torch.Tensor:
        self.rflow.set_timesteps(steps)
        net = self.velocity_net()
        if self.solver == "euler":
            return self.inferer_sample(self.rflow, noise, condition, net)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(torch.cat([x, condition.to(x.dtype)], dim=1), timesteps=t).float()

        return flow.heun_sample(velocity, self.rflow, noise)
