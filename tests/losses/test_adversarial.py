"""Adversarial term: objectives, warm-up, and alternating training inside DoseModule."""

from functools import partial

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from vmatdose.losses import AdversarialLoss, CompositeLoss, PatchDiscriminator3D, VoxelLoss
from vmatdose.training.fit import trainer_overrides
from vmatdose.training.module import DoseModule

from loss_testing import as_samples, box_batch

N_CHANNELS = 8  # CT + 7 structure masks


class ConstantCritic(nn.Module):
    """A 'discriminator' that answers a fixed logit ``c`` for every patch."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, image: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        return self.c.expand(dose.shape[0], 1, 2, 2, 2) + 0 * dose.mean()


def test_patch_discriminator_scores_patches_of_the_conditioned_pair():
    disc = PatchDiscriminator3D(image_channels=N_CHANNELS, base_channels=4, n_layers=3)
    batch = box_batch(n_cases=2, size=16)
    assert disc.model[0].in_channels == N_CHANNELS + 1
    assert disc(batch["image"], batch["dose"]).shape == (2, 1, 2, 2, 2)
    assert disc(torch.zeros(1, N_CHANNELS, 32, 32, 48), torch.zeros(1, 1, 32, 32, 48)
                ).shape == (1, 1, 4, 4, 6)


@pytest.mark.parametrize("objective, c, generator, critic", [
    ("lsgan", 0.25, (0.25 - 1) ** 2, 0.5 * ((0.25 - 1) ** 2 + 0.25 ** 2)),
    ("hinge", 0.25, -0.25, (1 - 0.25) + (1 + 0.25)),
    ("hinge", 3.0, -3.0, 0.0 + 4.0),
])
def test_objectives_give_the_textbook_values(objective, c, generator, critic):
    term = AdversarialLoss(ConstantCritic(c), objective=objective)
    batch = box_batch(n_cases=1)
    assert term(batch["dose"], batch).item() == pytest.approx(generator)
    assert term.discriminator_loss(batch["dose"], batch).item() == pytest.approx(critic)


def test_warm_up_turns_the_term_off():
    term = AdversarialLoss(ConstantCritic(0.0), warmup_epochs=2)
    batch = box_batch(n_cases=1)
    values = []
    for epoch in range(4):
        term.set_epoch(epoch)
        values.append(term(batch["dose"], batch).item())
    assert values == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="objective"):
        AdversarialLoss(ConstantCritic(0.0), objective="wgan")


def test_generator_gradient_reaches_the_prediction_and_is_finite():
    term = AdversarialLoss(PatchDiscriminator3D(N_CHANNELS, base_channels=4))
    batch = box_batch(n_cases=1)
    pred = batch["dose"].clone().requires_grad_()
    term(pred, batch).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def make_module(warmup_epochs: int = 0, scheduler=None) -> DoseModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(N_CHANNELS, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(4, 1, 3, padding=1))
    critic = PatchDiscriminator3D(N_CHANNELS, base_channels=4, n_layers=2)
    loss = CompositeLoss({
        "voxel": {"weight": 1.0, "term": VoxelLoss("l1")},
        "adversarial": {"weight": 0.1, "term": AdversarialLoss(
            critic, warmup_epochs=warmup_epochs,
            optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999)))},
    })
    return DoseModule(net, loss, partial(torch.optim.Adam, lr=1e-3), scheduler=scheduler,
                      divisible_by=4)


def fit(module: DoseModule, **trainer_kwargs) -> L.Trainer:
    samples = as_samples(box_batch(n_cases=2, size=16))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, DataLoader(samples, batch_size=1), DataLoader(samples, batch_size=1))
    return trainer


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_adversarial_training_alternates_two_optimizers_without_nan():
    module = make_module()
    assert not module.automatic_optimization
    critic = module.loss.terms["adversarial"].discriminator
    net_before, critic_before = snapshot(module.net), snapshot(critic)
    trainer = fit(module, max_epochs=2)
    assert trainer.global_step == 8  # 2 epochs x 2 batches x (critic + generator step)
    assert changed(net_before, module.net) and changed(critic_before, critic)
    params = list(module.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss/voxel", "train/loss/adversarial",
                "train/discriminator_loss", "val/loss/adversarial", "val/mae_gy"):
        assert torch.isfinite(metrics[key]), key
    generator_opt, critic_opt = trainer.optimizers
    generator_ids = {id(p) for g in generator_opt.param_groups for p in g["params"]}
    assert generator_ids == {id(p) for p in module.net.parameters()}
    assert {id(p) for g in critic_opt.param_groups for p in g["params"]} == {
        id(p) for p in critic.parameters()}


def test_discriminator_waits_for_the_warm_up_and_lr_schedule_still_steps():
    module = make_module(warmup_epochs=1,
                         scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1,
                                           gamma=0.5))
    critic = module.loss.terms["adversarial"].discriminator
    critic_before = snapshot(critic)
    trainer = fit(module, max_epochs=1)
    assert not changed(critic_before, critic)  # epoch 0 is warm-up
    assert trainer.global_step == 2  # generator steps only
    assert trainer.callback_metrics["train/loss/adversarial"].item() == 0.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_fast_dev_run_and_non_adversarial_losses_keep_automatic_optimisation():
    fit(make_module(), fast_dev_run=2)
    plain = DoseModule(nn.Conv3d(N_CHANNELS, 1, 1),
                       CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss()}}),
                       partial(torch.optim.Adam, lr=1e-3))
    assert plain.automatic_optimization and plain.adversarial_term is None
    off = make_module()
    off.loss.weights["adversarial"] = 0.0
    assert DoseModule(off.net, off.loss, off.optimizer_factory).automatic_optimization


def test_training_script_drops_lightning_clipping_for_manual_optimisation():
    # `python -m vmatdose.train loss=adversarial` with the default trainer (clip 1.0):
    # Lightning would refuse it under manual optimisation, so train.py passes None.
    cfg = OmegaConf.create({"trainer": {"gradient_clip_val": 1.0}})
    assert trainer_overrides(cfg, make_module()) == {"gradient_clip_val": None}
    plain = DoseModule(nn.Conv3d(N_CHANNELS, 1, 1),
                       CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss()}}),
                       partial(torch.optim.Adam, lr=1e-3))
    assert trainer_overrides(cfg, plain) == {}
