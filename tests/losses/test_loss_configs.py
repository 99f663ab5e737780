"""Every loss config and loss experiment composes, instantiates and trains one step."""

import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from torch import nn

from vmatdose.config import CONFIG_DIR

from loss_testing import box_batch

LOSSES = sorted(p.stem for p in (Path(CONFIG_DIR) / "loss").glob("*.yaml"))
RANDOM_VGG = "loss.terms.perceptual.term.random_weights=true"
STEPS = 30  # optimisation steps of the tiny-model tests
#: every loss term -> a loss config that has it
TERM_CONFIGS = {"voxel": "l1", "gradient": "grad", "perceptual": "perceptual", "dvh": "dvh",
                "dvh_match": "dvh_match", "structure_weighted": "structure_weighted",
                "asymmetric_ptv": "asymmetric_ptv"}
#: experiment -> loss terms and weights it must select
EXPERIMENTS = {
    "baseline": {"voxel": 1.0},
    "grad_loss": {"voxel": 1.0, "gradient": 0.1},
    "grad_vgg": {"voxel": 1.0, "gradient": 0.1, "perceptual": 0.001},
    "dvh_aware": {"voxel": 1.0, "dvh_match": 0.1},
    "structure_weighted": {"structure_weighted": 1.0},
    "adversarial": {"voxel": 1.0},  # + the critic's term, in the model (AdversarialDoseModule)
    "combined_uncertainty": {"voxel": 1.0, "gradient": 0.1, "dvh_match": 0.1,
                             "structure_weighted": 1.0, "asymmetric_ptv": 1.0},
}


def compose_train(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp_path}",
                                           f"paths.output_dir={tmp_path}/run", *overrides])


def needs_vgg(cfg) -> bool:
    return "perceptual" in cfg.loss.terms


def build_loss(tmp_path, name: str):
    """The composed ``loss=<name>`` config and its instantiated loss (random VGG weights
    where a perceptual term needs them)."""
    cfg = compose_train(tmp_path, f"loss={name}")
    if needs_vgg(cfg):
        cfg = compose_train(tmp_path, f"loss={name}", RANDOM_VGG)
    loss = hydra.utils.instantiate(cfg.loss)
    return cfg, loss


@pytest.mark.parametrize("name", LOSSES)
def test_loss_config_gives_finite_values_and_gradients(tmp_path, name):
    cfg, loss = build_loss(tmp_path, name)
    batch = box_batch(n_cases=2, size=16)
    perfect, _ = loss(batch["dose"], batch)
    pred = (batch["dose"] * 0.8 + 0.02).requires_grad_()
    total, terms = loss(pred, batch)
    total.backward()
    assert set(terms) == set(cfg.loss.terms)
    assert set(terms) <= set(TERM_CONFIGS)  # every term has its own tiny-model test
    assert all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # learned weights (L / (2 sigma^2) + log sigma) leave the log sigmas at a perfect match
    floor = sum(math.log(float(s)) for s in loss.sigmas().values())
    assert perfect.item() == pytest.approx(floor, abs=1e-5)
    assert total.item() > floor + 1e-3


def test_combined_uncertainty_learns_one_sigma_per_term_from_calibrated_values(tmp_path):
    cfg = compose_train(tmp_path, "experiment=combined_uncertainty")
    loss = hydra.utils.instantiate(cfg.loss)
    assert loss.weighting == "uncertainty"
    assert loss.sigmas() == pytest.approx(dict(cfg.loss.initial_sigmas), rel=1e-6)
    assert set(loss.sigmas()) == set(EXPERIMENTS["combined_uncertainty"])


@pytest.mark.parametrize("name", ["l1", "grad_dvh", "structure_weighted", "asymmetric_ptv"])
def test_any_loss_config_takes_uncertainty_weighting(tmp_path, name):
    cfg = compose_train(tmp_path, f"loss={name}", "loss.weighting=uncertainty")
    loss = hydra.utils.instantiate(cfg.loss)
    assert set(loss.sigmas()) == set(cfg.loss.terms)
    values = train_tiny_model(lambda pred, batch: loss(pred, batch)[0])
    assert values[-1] < 0.5 * values[0], values


def test_perceptual_config_without_weights_refuses_with_the_override_to_use(tmp_path):
    cfg = compose_train(tmp_path, "loss=perceptual")
    with pytest.raises(InstantiationException, match="weights_path=/path/to/vgg16.pth"):
        hydra.utils.instantiate(cfg.loss)


def test_command_line_weight_override(tmp_path):
    cfg = compose_train(tmp_path, "loss=grad_dvh", "loss.terms.gradient.weight=0.2")
    loss = hydra.utils.instantiate(cfg.loss)
    assert loss.weights == {"voxel": 1.0, "gradient": 0.2, "dvh": 0.1}
    assert [o.label for o in loss.terms["dvh"].objectives][:2] == [
        "PTV70 D95% >= 70 Gy", "PTV70 D2% <= 74.9 Gy"]
    assert len(loss.terms["dvh"].objectives) == 4 + len(cfg.data.constraints)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_selects_its_loss(tmp_path, experiment):
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    weights = {name: spec.weight for name, spec in cfg.loss.terms.items()}
    assert weights == EXPERIMENTS[experiment]


def test_loss_weights_search_space_names_existing_terms(monkeypatch):
    monkeypatch.delenv("VMATDOSE_ROOT", raising=False)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=loss_weights"],
                      return_hydra_config=True)
    # Sweepers resolve the sweep folder before any job runs (no runtime hydra config yet).
    assert cfg.hydra.sweep.dir.startswith("./multirun/train/")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/gamma_pass"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"loss.terms.gradient.weight", "loss.terms.dvh.weight"}
    assert set(cfg.loss.terms) == {"voxel", "gradient", "dvh"}


def train_tiny_model(objective, steps: int = STEPS) -> list[float]:
    """Adam on a two-layer conv net mapping the box batch's inputs to dose; the value of
    ``objective(pred, batch) -> scalar`` at every step."""
    torch.manual_seed(0)
    batch = box_batch(n_cases=2, size=16)
    net = nn.Sequential(nn.Conv3d(batch["image"].shape[1], 8, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(8, 1, 3, padding=1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = objective(net(batch["image"]), batch)
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert all(math.isfinite(v) for v in values)
    return values


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_a_few_steps_of_a_tiny_model_lower_the_loss(tmp_path, name):
    _, loss = build_loss(tmp_path, name)
    loss.eval()  # deterministic perceptual slices
    values = train_tiny_model(lambda pred, batch: loss(pred, batch)[0])
    assert values[-1] < 0.5 * values[0], values


@pytest.mark.slow
@pytest.mark.parametrize("term_name, config", sorted(TERM_CONFIGS.items()))
def test_each_term_alone_is_lowered_by_a_few_steps(tmp_path, term_name, config):
    # Not carried by the voxel term: every term on its own pulls a tiny model toward the
    # reference.
    _, loss = build_loss(tmp_path, config)
    term = loss.terms[term_name].eval()
    values = train_tiny_model(term)
    assert values[-1] < 0.5 * values[0], values
