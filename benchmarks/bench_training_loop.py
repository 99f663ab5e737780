"""The training loop against the bare network, and peak memory with the full OpenKBP set.

    python benchmarks/bench_training_loop.py [--steps 30] [--threads 2] [hydra overrides]

1. ``data=openkbp`` (compact cache, dose-focused 64^3 patches, batch 2) on the full set
   when it is on disk (169 + 33 patients, else the sample): the training and validation
   caches are built and the process's peak resident set (``ru_maxrss``) is recorded.
2. Time per training step of Lightning's loop (data module, loader, batch assembly,
   ``training_step``, backward, AdamW, logging) over ``--steps`` steps after warm-up,
   against the bare network's forward + L1 + backward + AdamW step on a tensor of the
   same size (the ratio's goal: within 10 %).
3. The same with ``experiment=openkbp_cpu`` (64^3 whole volumes held on the device).

Prints a table and writes ``benchmarks/results/training_loop.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmatdose.config import CONFIG_DIR  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "training_loop.json"


class StepTimer(L.Callback):
    """Wall time between successive training-batch ends (loader wait included)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.ends[warmup:], self.ends[warmup + 1:])]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def compose_cfg(run_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={ROOT}",
                                           f"paths.output_dir={run_dir}", "logger=none",
                                           *overrides])


def loop_step_s(cfg, steps: int, warmup: int = 3) -> tuple[float, dict, torch.nn.Module]:
    """Median seconds per step of ``trainer.fit`` on ``cfg`` and the data module facts."""
    L.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    built = time.perf_counter()
    n_train = len(datamodule.dataset("train"))
    n_val = len(datamodule.dataset("val"))
    cache_s = time.perf_counter() - built
    model = hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss))
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup + 1,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], gradient_clip_val=cfg.trainer.gradient_clip_val)
    trainer.fit(model, datamodule=datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    batch = datamodule.on_after_batch_transfer(batch, 0)
    facts = {"n_train": n_train, "n_val": n_val, "cache_build_s": round(cache_s, 1),
             "batch_image_shape": list(batch["image"].shape), "peak_rss_gb": peak_rss_gb()}
    return statistics.median(timer.step_times(warmup)), facts, model.net


def bare_step_s(net: torch.nn.Module, shape: list[int], steps: int, warmup: int = 3) -> float:
    """Median seconds of forward + L1 + backward + AdamW on a random (B, C, Z, Y, X)."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    image, target = torch.rand(shape), torch.rand(shape[0], 1, *shape[2:])
    net.train()
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        loss = (net(image) - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    run_dir = ROOT / "outputs" / "bench_training_loop"
    rows = {}
    recipes = {"data=openkbp (128^3 cache, 64^3 dose patches)": ["data=openkbp"],
               "experiment=openkbp_cpu (64^3 on device)": ["experiment=openkbp_cpu"]}
    for name, recipe in recipes.items():
        cfg = compose_cfg(run_dir, [*recipe, *overrides])
        loop, facts, net = loop_step_s(cfg, args.steps)
        bare = bare_step_s(net, facts["batch_image_shape"], args.steps)
        rows[name] = {"loop_step_s": round(loop, 4), "bare_step_s": round(bare, 4),
                      "ratio": round(loop / bare, 3), **facts}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"CPU, {args.threads} threads (2-core shared machine), no GPU",
              "steps": args.steps, "peak_rss_gb": round(peak_rss_gb(), 2), "recipes": rows}
    print(f"\n{'recipe':48s}{'loop s/step':>12s}{'bare s/step':>12s}{'ratio':>7s}"
          f"{'cases':>7s}{'peak RSS GB':>12s}")
    for name, r in rows.items():
        print(f"{name:48s}{r['loop_step_s']:12.3f}{r['bare_step_s']:12.3f}{r['ratio']:7.2f}"
              f"{r['n_train'] + r['n_val']:7d}{r['peak_rss_gb']:12.2f}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
