"""What a run needs to be reproduced: config, overrides, code version, packages, seed, device."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

PACKAGES = ("vmatdose", "torch", "lightning", "monai", "hydra-core", "omegaconf", "numpy",
            "scipy", "pydicom", "SimpleITK", "numba", "pandas", "matplotlib", "wandb")


def git_state(repo_dir: str | Path | None = None) -> dict[str, Any]:
    """Commit hash and dirty flag of the repository holding vmatdose (``None`` if not a repo)."""
    cwd = Path(repo_dir or Path(__file__).resolve().parents[2])

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": torch.get_num_threads(),
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def build_run_record(cfg: DictConfig, overrides: list[str] | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce a run, as a JSON-serialisable dict; ``extra`` adds
    what the run decided at start (e.g. the ``precision`` chosen for ``auto``)."""
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": list(overrides or []),
        "command": sys.argv,
        "seed": cfg.get("seed"),
        "git": git_state(),
        "packages": package_versions(),
        "device": device_info(),
        **(extra or {}),
    }


def write_run_record(cfg: DictConfig, output_dir: str | Path,
                     overrides: list[str] | None = None,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write ``run_record.json`` (and the resolved ``config.yaml``) into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = build_run_record(cfg, overrides, extra)
    path = output_dir / "run_record.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path
