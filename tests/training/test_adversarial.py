"""AdversarialDoseModule: MONAI critic and objective, warm-up, alternating optimisation."""

from functools import partial

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.utils.data import DataLoader

from vmatdose.config import CONFIG_DIR
from vmatdose.losses import CompositeLoss, VoxelLoss
from vmatdose.training.adversarial import AdversarialDoseModule
from vmatdose.training.module import DoseModule

N_CHANNELS = 8  # CT + 7 structure masks
SIZE = 16


def batch(n_cases: int = 2) -> dict:
    """A ball 'patient': body ball, dose 1 inside a centred target ball, 0.3 elsewhere."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3,
                                      indexing="ij"))
    dist = (grid - SIZE / 2).norm(dim=0)
    body, target = (dist < SIZE * 0.45).float(), (dist < SIZE * 0.2).float()
    image = torch.cat([body[None] * 0.4, target[None], torch.zeros(N_CHANNELS - 2, *body.shape)])
    dose = (torch.maximum(body * 0.3, target))[None]
    return {"image": image.expand(n_cases, -1, -1, -1, -1).clone(),
            "dose": dose.expand(n_cases, -1, -1, -1, -1).clone(),
            "body": body[None].expand(n_cases, -1, -1, -1, -1).clone(),
            "spacing_mm": torch.full((n_cases, 3), 3.0),
            "dose_scale_gy": torch.full((n_cases,), 70.0)}


class ConstantCritic(nn.Module):
    """A 'discriminator' answering the fixed logit ``c`` for every patch, as a feature list."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, self.c.expand(x.shape[0], 1, 2, 2, 2) + 0 * x.mean()]


def make_module(critic: nn.Module | None = None, warmup_epochs: int = 0, scheduler=None,
                adversarial_loss=None) -> AdversarialDoseModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(N_CHANNELS, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(4, 1, 3, padding=1))
    critic = critic or PatchDiscriminator(spatial_dims=3, channels=4,
                                          in_channels=N_CHANNELS + 1, num_layers_d=2,
                                          norm="INSTANCE")
    loss = CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss("l1")}})
    return AdversarialDoseModule(
        net, loss, partial(torch.optim.Adam, lr=1e-3), scheduler=scheduler, divisible_by=4,
        discriminator=lambda: critic, adversarial_weight=0.1, warmup_epochs=warmup_epochs,
        adversarial_loss=adversarial_loss,
        discriminator_optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999)))


@pytest.mark.parametrize("criterion, c, generator, critic", [
    # LSGAN on raw logits: (c - 1)^2; critic 0.5 ((c - 1)^2 + c^2)
    ("least_squares", 0.25, (0.25 - 1) ** 2, 0.5 * ((0.25 - 1) ** 2 + 0.25 ** 2)),
    # MONAI's hinge squashes logits with tanh first: relu(1 - tanh c), relu(1 + tanh c)
    ("hinge", 0.25, 1 - torch.tanh(torch.tensor(0.25)).item(), 0.5 * 2.0),
])
def test_generator_and_critic_losses_give_the_textbook_values(criterion, c, generator, critic):
    from monai.losses import PatchAdversarialLoss

    module = make_module(ConstantCritic(c), adversarial_loss=PatchAdversarialLoss(
        criterion=criterion, no_activation_leastsq=True))
    b = batch(1)
    total, terms = module.compute_loss(b["dose"], b)
    assert terms["voxel"].item() == 0.0
    assert terms["adversarial"].item() == pytest.approx(generator, rel=1e-5)
    assert total.item() == pytest.approx(0.1 * generator, rel=1e-5)
    assert module.discriminator_loss(b["dose"], b).item() == pytest.approx(critic, rel=1e-5)


def test_generator_gradient_reaches_the_prediction():
    module = make_module()
    b = batch(1)
    pred = b["dose"].clone().requires_grad_()
    module.compute_loss(pred, b)[1]["adversarial"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def fit(module: DoseModule, **trainer_kwargs) -> L.Trainer:
    samples = [{k: v[i] for k, v in batch(2).items()} for i in range(2)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, DataLoader(samples, batch_size=1), DataLoader(samples, batch_size=1))
    return trainer


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_training_alternates_two_optimizers_without_nan():
    module = make_module()
    assert not module.automatic_optimization
    net_before, critic_before = snapshot(module.net), snapshot(module.discriminator)
    trainer = fit(module, max_epochs=2)
    assert trainer.global_step == 8  # 2 epochs x 2 batches x (critic + generator step)
    assert changed(net_before, module.net) and changed(critic_before, module.discriminator)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss/voxel", "train/loss/adversarial",
                "train/discriminator_loss", "val/loss/adversarial", "val/mae_gy"):
        assert torch.isfinite(metrics[key]), key
    generator_opt, critic_opt = trainer.optimizers
    assert {id(p) for g in generator_opt.param_groups for p in g["params"]} == {
        id(p) for p in module.net.parameters()}
    assert {id(p) for g in critic_opt.param_groups for p in g["params"]} == {
        id(p) for p in module.discriminator.parameters()}


def test_critic_waits_for_the_warm_up_and_lr_schedule_still_steps():
    module = make_module(warmup_epochs=1, scheduler=partial(
        torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    critic_before = snapshot(module.discriminator)
    trainer = fit(module, max_epochs=1)
    assert not changed(critic_before, module.discriminator)  # epoch 0 is warm-up
    assert trainer.global_step == 2  # generator steps only
    assert trainer.callback_metrics["train/loss/adversarial"].item() == 0.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_plain_dose_module_keeps_automatic_optimisation():
    plain = DoseModule(nn.Conv3d(N_CHANNELS, 1, 1),
                       CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss()}}),
                       partial(torch.optim.Adam, lr=1e-3))
    assert plain.automatic_optimization
    with pytest.raises(ValueError, match="warmup_epochs"):
        AdversarialDoseModule(plain.net, plain.loss, plain.optimizer_factory,
                              discriminator=partial(ConstantCritic, 0.0), warmup_epochs=-1)


def test_the_critic_draws_on_its_own_rng_stream():
    net = nn.Conv3d(N_CHANNELS, 1, 1)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    make_critic = partial(PatchDiscriminator, spatial_dims=3, channels=4,
                          in_channels=N_CHANNELS + 1, num_layers_d=2, norm="INSTANCE")
    module = AdversarialDoseModule(net, None, torch.optim.Adam, discriminator=make_critic)
    assert torch.equal(torch.rand(3), expected)  # building the critic drew nothing
    assert isinstance(module.discriminator, PatchDiscriminator)


def test_experiment_config_builds_the_module_on_monai_parts(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=adversarial", f"paths.root_dir={tmp_path}",
                                          f"paths.output_dir={tmp_path}/run"])
    assert cfg.trainer.gradient_clip_val is None  # manual optimisation refuses it
    assert {name: spec.weight for name, spec in cfg.loss.terms.items()} == {"voxel": 1.0}
    module = hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss))
    assert isinstance(module, AdversarialDoseModule) and not module.automatic_optimization
    assert isinstance(module.discriminator, PatchDiscriminator)
    assert module.adversarial_weight == 0.01 and module.warmup_epochs == 1
    logits = module.critic(torch.zeros(1, N_CHANNELS, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32))
    assert logits.shape == (1, 1, 3, 3, 3)
