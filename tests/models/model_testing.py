"""Helpers of the model tests: composed model configs and a small synthetic batch."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vmatdose.config import CONFIG_DIR

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
GENERATIVE = ("ddpm", "flow_matching")
#: Phantom data config: CT + 7 structure masks.
N_CHANNELS = 8


def model_config(name: str, root: Path, *overrides: str) -> DictConfig:
    """The training config composed with ``model=<name>`` (phantom data, L1 loss)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"model={name}", f"paths.root_dir={root}",
                                           f"paths.output_dir={root}/run", *overrides])


def build_model(name: str, root: Path, *overrides: str):
    """(module with the config's loss, composed config)."""
    cfg = model_config(name, root, *overrides)
    return hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss)), cfg


def synthetic_batch(n_cases: int = 2, size: int = 16, seed: int = 0) -> dict:
    """A collated batch of spherical 'patients' with the keys of vmatdose.data.pipeline.

    Each case: body ball, PTV70 ball (dose 1.0), PTV56 shell (0.8) around it at a random
    centre, an organ slab; dose falls off exponentially outside the targets, 0 outside the
    body. image = [CT, 7 masks] (N_CHANNELS), dose in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3,
                                      indexing="ij"))
    images, doses, bodies, masks = [], [], [], []
    for _ in range(n_cases):
        centre = size / 2 + (torch.rand(3, generator=gen) - 0.5) * size / 4
        dist = (grid - centre.reshape(3, 1, 1, 1)).norm(dim=0)
        body = ((grid - size / 2).norm(dim=0) < size * 0.45).float()
        ptv70 = (dist < size * 0.15).float()
        ptv56 = ((dist < size * 0.25).float() - ptv70).clamp_min(0)
        organ = ((grid[2] > centre[2] + size * 0.3).float() * body)
        zeros = torch.zeros_like(body)
        structures = torch.stack([ptv70, ptv56, organ, zeros, zeros, zeros, zeros])
        dose = torch.exp(-(dist - size * 0.25).clamp_min(0) / (size * 0.15)) * 0.8
        dose = torch.maximum(dose, ptv70) * body
        ct = body * 0.4 + organ * 0.1
        images.append(torch.cat([ct[None], structures]))
        doses.append(dose[None])
        bodies.append(body[None])
        masks.append(structures)
    return {"image": torch.stack(images), "dose": torch.stack(doses),
            "body": torch.stack(bodies), "masks": torch.stack(masks),
            "spacing_mm": torch.tensor([[3.0, 4.0, 4.0]] * n_cases),
            "dose_scale_gy": torch.full((n_cases,), 70.0),
            "case_id": [f"synthetic_{i}" for i in range(n_cases)]}


def as_samples(batch: dict) -> list[dict]:
    """Split a collated batch back into per-case samples (for a DataLoader)."""
    n = batch["image"].shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]
