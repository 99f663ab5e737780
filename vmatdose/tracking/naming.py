"""Run names and sweep groups for the trackers, from Hydra's record of the run.

A run is named after its task and the command-line overrides that make it differ
(``train: loss=grad,model=unet32``); runs of one multirun share a group, the sweep folder
relative to the ``multirun`` root (``train/2026-12-01_08-00-00``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from vmatdose.metrics.registry import is_experimental


def describing_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that describe a run (``+``/``~`` prefixes kept), in command order."""
    return [o for o in overrides if is_experimental(o)]


def run_name(task_name: str, overrides: Sequence[str] | None = None) -> str:
    """``<task>: <override>,<override>`` (just ``<task>`` without overrides); the
    overrides default to Hydra's record of the running job."""
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    described = describing_overrides(overrides)
    return f"{task_name}: {','.join(described)}" if described else task_name


def path_safe(name: str) -> str:
    """A run name usable as one folder name (TensorBoard versions)."""
    return name.replace(": ", "-").replace("/", "_").replace(" ", "_")


def sweep_group() -> str | None:
    """The multirun folder of the running job, relative to the ``multirun`` root
    (``train/2026-12-01_08-00-00``); ``None`` outside a multirun."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    folder = Path(hydra_cfg.sweep.dir)
    parts = folder.parts
    if "multirun" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("multirun"):])
    return folder.name
