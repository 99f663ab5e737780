"""A Weights & Biases logger that never prompts: online with an API key, else offline.

Offline runs are plain files under ``<save_dir>/wandb/offline-run-*`` that
``wandb sync <folder>`` uploads later.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from vmatdose.tracking.naming import run_name, sweep_group

log = logging.getLogger(__name__)
_announced = False


def wandb_credentials_available() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_wandb_logger(project: str, save_dir: str, name: str | None = None,
                      offline: bool | None = None, log_model: bool | str = False,
                      tags: list[str] | None = None, group: str | None = None,
                      entity: str | None = None, task_name: str = "train") -> WandbLogger:
    """Build a :class:`WandbLogger`; ``offline=None`` decides from ``WANDB_MODE`` and the
    credentials, and says once where offline files go. ``name=None`` names the run from
    ``task_name`` and the overrides, ``group=None`` groups a multirun's jobs by their sweep
    folder (:mod:`vmatdose.tracking.naming`)."""
    global _announced
    if offline is None:
        offline = (os.environ.get("WANDB_MODE") in ("offline", "dryrun")
                   or not wandb_credentials_available())
    os.environ.setdefault("WANDB_SILENT", "true")
    if offline:
        os.environ["WANDB_MODE"] = "offline"  # also covers wandb's own prompts
        if not _announced:
            log.warning("W&B: no API key (or WANDB_MODE=offline): logging offline to "
                        "%s/wandb; upload later with `wandb sync <that folder>/offline-run-*`",
                        save_dir)
            _announced = True
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name or run_name(task_name),
                       offline=offline, log_model=log_model, tags=list(tags or []),
                       group=group or sweep_group(), job_type=task_name, entity=entity)
