"""One training run as library functions: check the cases, build data, model, loss and
trainer from the config, fit; the best checkpoint and the optimised metric.

Evaluating the best checkpoint afterwards is a workflow above training and evaluation
(:mod:`vmatdose.workflow`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vmatdose.data.body_region import body_kinds
from vmatdose.data.datamodule import SPLITS
from vmatdose.data.grid_rule import training_grid_rule
from vmatdose.data.validation import check_training_cases
from vmatdose.inference.checkpoint import training_contract
from vmatdose.protocol import Protocol
from vmatdose.records.run_choices import run_choices
from vmatdose.records.run_record import write_run_record
from vmatdose.training.compile import accelerator_device_type, choose_compile
from vmatdose.training.memory_format import choose_memory_format
from vmatdose.training.precision import PrecisionChoice, choose_precision

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every non-null entry of a name -> config mapping (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.best_model_path or callback.last_model_path or None


def checked_datamodule(cfg: DictConfig) -> tuple[L.LightningDataModule, dict]:
    """The data module of ``cfg.data`` with every case file of every split checked
    against the protocol (before any model is built), and the checkpoint contract."""
    protocol = Protocol.from_dict(cfg.protocol)  # a bad protocol: refused before any work
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    paths = {name: datamodule.paths_of(name) for name in SPLITS}
    spacing = check_training_cases(paths, protocol, datamodule.structures,
                                   cfg.spacing_mismatch)
    every = [p for name in SPLITS for p in paths[name]]
    contract = training_contract(cfg, spacing, datamodule.cases_dir, datamodule.ensure_split(),
                                 body_kinds(every), training_grid_rule(every))
    return datamodule, contract.to_dict()


def machine_choices(cfg: DictConfig) -> tuple[PrecisionChoice, dict]:
    """The precision, and the run record's entries for it, the compile choice (a machine
    that cannot compile is refused here) and the memory format, for the trainer's device."""
    precision = choose_precision(cfg.trainer.get("precision", "auto"),
                                 cfg.trainer.get("accelerator", "auto"))
    log.info("precision %s (%s)", precision.chosen, precision.reason)
    device_type = accelerator_device_type(cfg.trainer.get("accelerator", "auto"))
    extra = {"precision": precision.to_dict()}
    callbacks = cfg.get("callbacks") or {}
    if callbacks.get("compile") is not None:
        extra["compile"] = choose_compile(callbacks.compile.get("mode", "auto"),
                                          device_type).to_dict()
    if callbacks.get("memory_format") is not None:
        extra["memory_format"] = choose_memory_format(
            callbacks.memory_format.get("format", "auto"), device_type,
            precision.chosen).to_dict()
    return precision, extra


def fit(cfg: DictConfig, output_dir: str | Path, overrides: list[str] | None = None
        ) -> tuple[L.Trainer, L.LightningModule]:
    """Resolve the precision, the compile and the memory-format choices (a machine that
    cannot compile is refused first), check every case file, write the run record (config,
    commit, versions, seed, ``overrides``, the choices) into ``output_dir``, build data, model,
    loss, trainer from ``cfg`` and fit. A refused case leaves ``output_dir`` without any file of the run."""
    L.seed_everything(cfg.seed, workers=True)
    precision, extra = machine_choices(cfg)
    datamodule, contract = checked_datamodule(cfg)
    if rank_zero_only.rank == 0:  # DDP: only rank zero writes files
        write_run_record(cfg, Path(output_dir), overrides, extra=extra)
    # Loss terms with random initialisation draw from their own RNG stream, so one seed
    # gives the same initial network whatever the loss.
    with torch.random.fork_rng(devices=[]):
        loss = hydra.utils.instantiate(cfg.loss)
    model = hydra.utils.instantiate(cfg.model, loss=loss)
    model.contract = contract
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2f M parameters", type(model.net).__name__, n_params / 1e6)
    trainer = hydra.utils.instantiate(cfg.trainer, precision=precision.chosen,
                                      callbacks=instantiate_dict(cfg.callbacks),
                                      logger=instantiate_dict(cfg.get("logger")) or False)
    # The composed config for every tracker, with the run's choices as flat top-level keys
    hparams = {**run_choices(cfg), **OmegaConf.to_container(cfg, resolve=True)}
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return trainer, model


def optimized_metric(trainer: L.Trainer, name: str | None) -> float | None:
    """The best value of ``name`` when the checkpoint callback monitors it, else its last."""
    if not name:
        return None
    callback = trainer.checkpoint_callback
    if callback is not None and callback.monitor == name and callback.best_model_score is not None:
        return float(callback.best_model_score)
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None
