"""Run a trained model over case files and return doses in Gy on each case's grid."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vmatdose.data.case import load_case
from vmatdose.data.conditioning import conditioning_spec
from vmatdose.data.transforms import build_transforms

#: Data-config keys that define a model's input channels; evaluation must use the
#: checkpoint's values, whatever data config it was composed with.
INPUT_CONTRACT_KEYS = ("structures", "signed_distance", "sdf_scale_mm", "ct_window",
                       "prescriptions_gy", "dose_scale_gy", "conditioning")


def checkpoint_config(ckpt_path: str | Path) -> DictConfig:
    """The composed training config stored in a vmatdose checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "vmatdose_config" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a vmatdose checkpoint (no stored run config)")
    return OmegaConf.create(ckpt["vmatdose_config"])


def load_module(ckpt_path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the LightningModule from the checkpoint's own config and load its weights."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    cfg = checkpoint_config(ckpt_path)
    module = hydra.utils.instantiate(cfg.model, loss=None)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    # Loss modules with parameters (a discriminator) are not needed for inference.
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    module.load_state_dict(state, strict=False)
    module.run_config = OmegaConf.to_container(cfg)
    return module.eval().to(device), cfg


def resolve_device(accelerator: str = "auto") -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def predict_cases(module, data_cfg: DictConfig, paths: Sequence[Path], device: torch.device,
                  with_uncertainty: bool = False) -> Iterator[tuple]:
    """Yield ``(case, dose Gy (Z, Y, X) float32)`` for each case file, or
    ``(case, dose, std Gy or None)`` when ``with_uncertainty``."""
    transform = build_transforms(
        list(data_cfg.structures), float(data_cfg.dose_scale_gy), train=False,
        ct_window=list(data_cfg.ct_window), signed_distance=bool(data_cfg.signed_distance),
        sdf_scale_mm=float(data_cfg.get("sdf_scale_mm", 50.0)), with_dose=False,
        conditioning=conditioning_spec(data_cfg.get("conditioning"), list(data_cfg.targets),
                                       data_cfg.get("constraints"),
                                       float(data_cfg.dose_scale_gy)))
    scale = float(data_cfg.dose_scale_gy)
    for path in paths:
        case = load_case(path)
        image = transform({"path": str(path)})["image"][None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            mean, std = module.predict_with_uncertainty(image)
        dose = (mean[0, 0].float().cpu().numpy() * scale).astype(np.float32)
        if not with_uncertainty:
            yield case, dose
            continue
        std_gy = None if std is None else (std[0, 0].float().cpu().numpy() * scale)
        yield case, dose, std_gy
