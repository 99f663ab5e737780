"""Train a dose model, then evaluate its best checkpoint on the test split.

    python -m vmatdose.train                       # phantom data, small U-Net, L1
    python -m vmatdose.train debug=smoke model=... loss=...
    python -m vmatdose.train -m loss.terms.voxel.weight=0.5,1.0

Everything is built from ``conf/`` with ``hydra.utils.instantiate``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from vmatdose.config import CONFIG_DIR
from vmatdose.tracking.evaluation_log import finish_loggers, log_evaluation
from vmatdose.training.run_record import write_run_record

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


def fit(cfg: DictConfig, output_dir: str | Path) -> tuple[L.Trainer, L.LightningModule]:
    """Build data, model, loss, trainer from ``cfg`` and fit."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    # Loss terms with random initialisation (a discriminator) draw from their own RNG
    # stream, so one seed gives the same initial network whatever the loss.
    with torch.random.fork_rng(devices=[]):
        loss = hydra.utils.instantiate(cfg.loss)
    model = hydra.utils.instantiate(cfg.model, loss=loss)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2f M parameters", type(model.net).__name__, n_params / 1e6)
    print(f"model {type(model.net).__name__}: {n_params / 1e6:.2f} M parameters")
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_dict(cfg.callbacks),
                                      logger=instantiate_dict(cfg.get("logger")) or False)
    for logger in trainer.loggers:  # the composed config, for every tracker
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return trainer, model


def evaluate_best(cfg: DictConfig, trainer: L.Trainer, output_dir: Path) -> dict | None:
    """Evaluate the best checkpoint on the test split into ``output_dir/eval`` and send
    the results to the run's loggers; return the summary (``None`` without checkpoint)."""
    from vmatdose.evaluate import run_evaluation

    ckpt = best_checkpoint(trainer)
    if ckpt is None:
        log.warning("no checkpoint was saved; skipping evaluation")
        return None
    eval_cfg = OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                                 "ckpt_path": ckpt, "predictions_dir": None, "split": "test",
                                 "split_file": str(output_dir / "split.json"),
                                 "accelerator": cfg.trainer.get("accelerator", "auto"),
                                 "evaluation": cfg.get("evaluation", {})})
    table, summary = run_evaluation(eval_cfg, output_dir / "eval")
    log_evaluation(trainer.loggers, table, summary)
    return summary


def summary_line(task_name: str, summary: dict, primary_target: str, seconds: float) -> str:
    """``<task>: test MAE x Gy (mean-dose baseline y Gy), PTV70 D95 error z Gy, t s``."""
    m = summary["metrics"]
    baseline = m.get("baseline_mae_body_gy", {}).get("mean", float("nan"))
    d95_abs = m.get(f"d95_{primary_target}_abs_error_gy", {}).get("mean", float("nan"))
    return (f"{task_name}: test MAE {m['mae_body_gy']['mean']:.2f} Gy (mean-dose baseline "
            f"{baseline:.2f} Gy), {primary_target} D95 error {d95_abs:.2f} Gy, {seconds:.0f} s")


def run(cfg: DictConfig) -> float | None:
    """Fit, record, evaluate; return the optimised metric (for sweepers)."""
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if rank_zero_only.rank == 0:  # DDP: only rank zero writes files
        write_run_record(cfg, output_dir, overrides)
    trainer, _ = fit(cfg, output_dir)
    metric = optimized_metric(trainer, cfg.get("optimized_metric"))
    if not trainer.is_global_zero:
        return metric
    if cfg.get("evaluate_after_training", True):
        summary = evaluate_best(cfg, trainer, output_dir)
        if summary is not None:
            prescriptions = cfg.data.prescriptions_gy
            primary = max(prescriptions, key=lambda k: prescriptions[k])
            print(summary_line(cfg.task_name, summary, primary, time.perf_counter() - start))
    finish_loggers(trainer.loggers)
    return metric


def optimized_metric(trainer: L.Trainer, name: str | None) -> float | None:
    """The best value of ``name`` when the checkpoint callback monitors it, else its last."""
    if not name:
        return None
    callback = trainer.checkpoint_callback
    if callback is not None and callback.monitor == name and callback.best_model_score is not None:
        return float(callback.best_model_score)
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return run(cfg)


if __name__ == "__main__":
    main()
