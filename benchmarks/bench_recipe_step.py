"""Where the time of one ``experiment=openkbp_cpu`` training step goes: the real recipe
(data module, device cache, prior-dose channel, Lightning's fit loop with the recipe's
callbacks and logger) split into phases, against the same network's step in a bare torch
loop on the same batches.

    python benchmarks/bench_recipe_step.py [--steps 40] [--warmup 3] [--threads 2]
                                           [--source DIR] [--name NAME] [hydra overrides]

Phases of each Lightning step, from timestamps taken by a callback, by forward hooks on the
network, by a post-step hook on the optimizer and by wrappers around the device cache's
batch draw and the data module's ``on_after_batch_transfer``:

- fetch: the device cache draws the batch (permutation, flips, stacking, on the device);
- assemble: ``on_after_batch_transfer`` casts the compact batch to float32 and
  concatenates the ``image`` (CT, 10 masks, the prior-dose channel);
- batch-start hooks: callbacks before the step (the channels-last copy of the image);
- forward: the network; loss: masking inside the body, L1, ``self.log``, ``zero_grad``;
- backward; clip + AdamW: Lightning's gradient clipping and the optimizer update;
- loop: what is left of the step's wall time (Lightning's bookkeeping, the other
  callbacks, logging, the progress bar);
- epoch end + validation: whole-epoch work (validation every
  ``trainer.check_val_every_n_epoch`` epochs, checkpoints), spread over the steps.

The bare step (forward, the recipe's loss, backward, gradient clipping, AdamW on a copy of
the network made at the start of training) runs on the batch each Lightning step has just
used, right after it: the two are interleaved step by step, so a change of the machine's
load hits both alike. The prior dose costs nothing per step: it is built once per case with
the cache (the set-up time below) and is one of the batch's channels after that.

Then one more bare step under ``torch.profiler``: the operators that take the most CPU time.

Prints the tables and writes ``benchmarks/results/recipe_step.json``
(``recipe_step-NAME.json`` with ``--name``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmatdose.config import CONFIG_DIR  # noqa: E402
from vmatdose.training.fit import instantiate_dict  # noqa: E402
from vmatdose.training.precision import choose_precision  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "recipe_step.json"
SAMPLE = ROOT.parent / "shared" / "data" / "openkbp-sample"
PHASES = ("fetch", "assemble", "batch-start hooks", "forward", "loss", "backward",
          "clip + AdamW", "loop", "epoch end + validation")
NETWORK_PHASES = ("forward", "loss", "backward", "clip + AdamW")


@dataclass(frozen=True)
class Clock:
    """A point in (or a span of) wall time and this process's CPU time (all threads), in
    seconds. On a shared machine the CPU time is the steadier measure of work done."""

    wall: float
    cpu: float

    @staticmethod
    def now() -> Clock:
        return Clock(time.perf_counter(), time.process_time())

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: Clock) -> Clock:
        return Clock(self.wall - other.wall, self.cpu - other.cpu)


class BareStep:
    """The network's step without Lightning: the crop to the body's box (with
    ``model.body_crop_margin``), forward, the recipe's loss inside the body, backward,
    gradient clipping to ``clip``, the recipe's optimizer, on its own copy of the network."""

    def __init__(self, module: L.LightningModule, clip: float | None):
        self.module = module
        self.net = copy.deepcopy(module.net)
        self.optimizer = module.optimizer_factory(params=self.net.parameters())
        self.clip = clip
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.last_batch: dict | None = None

    def __call__(self, batch: dict) -> None:
        self.last_batch = batch
        start = Clock.now()
        batch = self.module.crop_to_body(batch)  # the body's box, as the recipe's step
        self.optimizer.zero_grad(set_to_none=True)
        pred = self.module.masked_for_loss(self.net(batch["image"]), batch)
        total, _ = self.module.loss(pred, batch)
        total.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.optimizer.step()
        spent = Clock.now() - start
        self.times.append(spent.wall)
        self.cpu_times.append(spent.cpu)


class PhaseClock(L.Callback):
    """Timestamps of every training step's phases (see the module docstring); after each
    step, the interleaved :class:`BareStep` on the same batch (outside the timed step)."""

    def __init__(self, clip: float | None):
        self.clip = clip
        self.steps: list[dict[str, float]] = []  # wall seconds per phase
        self.cpu_steps: list[dict[str, float]] = []  # process CPU seconds per phase
        self.pending: dict[str, Clock] = {}
        self.resume = Clock(0.0, 0.0)
        self.bare: BareStep | None = None

    def add(self, phase: str, seconds: Clock) -> None:
        self.pending[phase] = self.pending.get(phase, Clock(0.0, 0.0)) + seconds

    def mark(self, name: str) -> None:
        self.pending[f"@{name}"] = Clock.now()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bare = BareStep(pl_module, self.clip)  # copied before the hooks below
        net = pl_module.net
        net.register_forward_pre_hook(lambda *_: self.mark("forward_start"))
        net.register_forward_hook(lambda *_: self.mark("forward_end"))
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.mark("optimizer_end"))
        self.resume = Clock.now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mark("batch_start")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.mark("loss_end")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.mark("backward_end")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.mark("closure_end")

    def on_validation_start(self, trainer, pl_module) -> None:
        self.mark("validation_start")

    def on_validation_end(self, trainer, pl_module) -> None:
        self.add("validation", Clock.now() - self.pending["@validation_start"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = Clock.now()
        p = self.pending
        zero = Clock(0.0, 0.0)
        fetch, assemble = p.get("fetch", zero), p.get("assemble", zero)
        epoch = p.get("validation", zero) + p.get("epoch", zero)
        phases = {
            "fetch": fetch, "assemble": assemble,
            "batch-start hooks": p["@forward_start"] - p["@batch_start"],
            "forward": p["@forward_end"] - p["@forward_start"],
            "loss": p["@loss_end"] - p["@forward_end"],
            "backward": p["@backward_end"] - p["@loss_end"],
            "clip + AdamW": p["@optimizer_end"] - p["@closure_end"],
            "epoch end + validation": epoch}
        total = end - self.resume
        phases["loop"] = total - sum(phases.values(), zero)
        phases["wall"] = total
        self.steps.append({k: v.wall for k, v in phases.items()})
        self.cpu_steps.append({k: v.cpu for k, v in phases.items()})
        self.pending = {}
        self.bare(batch)
        self.resume = Clock.now()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.mark("epoch_end")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if "@epoch_end" in self.pending:  # (validation runs before the epoch's end)
            self.add("epoch", Clock.now() - self.pending.pop("@epoch_end"))


def timed(clock: PhaseClock, phase: str, fn):
    """``fn`` whose wall time is added to the clock's current step under ``phase``."""
    def wrapper(*args, **kwargs):
        start = Clock.now()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add(phase, Clock.now() - start)
    return wrapper


def compose_cfg(run_dir: Path, source: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[
            "experiment=openkbp_cpu", f"paths.root_dir={ROOT}", f"paths.output_dir={run_dir}",
            f"data.source_dir={source}", *overrides])


def profile_recipe(cfg, steps: int, warmup: int) -> tuple[PhaseClock, dict]:
    """Fit the recipe for ``warmup + steps`` optimizer steps with its callbacks and logger,
    clocked; the set-up facts."""
    L.seed_everything(cfg.seed, workers=True)
    start = time.perf_counter()
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = datamodule.device_batches("cpu")  # the cache, each case's prior built here
    setup_s = time.perf_counter() - start
    model = hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss))
    clock = PhaseClock(cfg.trainer.gradient_clip_val)
    batches.batch = timed(clock, "fetch", batches.batch)
    datamodule.on_after_batch_transfer = timed(clock, "assemble",
                                               datamodule.on_after_batch_transfer)
    precision = choose_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    trainer = hydra.utils.instantiate(
        cfg.trainer, precision=precision.chosen, max_steps=warmup + steps,
        callbacks=[clock, *instantiate_dict(cfg.callbacks)],
        logger=instantiate_dict(cfg.get("logger")) or False)
    trainer.fit(model, datamodule=datamodule)
    facts = {"setup_s": round(setup_s, 1), "n_train": len(batches.case_ids),
             "steps_per_epoch": len(batches), "batch_size": batches.batch_size,
             "precision": precision.to_dict(),
             "check_val_every_n_epoch": cfg.trainer.check_val_every_n_epoch,
             "n_val": len(datamodule.dataset("val"))}
    return clock, facts


def top_ops(bare: BareStep, n: int = 12) -> list[dict]:
    """The ``n`` operators of one more bare step (on the last batch) that take the most CPU
    time themselves (``torch.profiler``; forward and backward operators apart)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bare(bare.last_batch)
    bare.times.pop()
    bare.cpu_times.pop()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:n]]


def summarise_clock(steps: list[dict[str, float]], bare: list[float]) -> dict:
    """Mean seconds per phase (they add up to the mean step), the network's share and the
    Lightning step against the bare one, over one clock's timed steps."""
    mean = {k: statistics.fmean(s[k] for s in steps) for k in ("wall", *PHASES)}
    network = sum(mean[k] for k in NETWORK_PHASES)
    return {"mean_s": mean, "median_step_s": statistics.median(s["wall"] for s in steps),
            "mean_bare_s": statistics.fmean(bare), "median_bare_s": statistics.median(bare),
            "network_s": network, "outside_network_fraction": 1 - network / mean["wall"],
            "lightning_over_bare": mean["wall"] / statistics.fmean(bare),
            "per_step": steps, "bare_per_step": bare}


def summarise(clock: PhaseClock, warmup: int) -> dict:
    return {"steps": len(clock.steps) - warmup,
            "wall": summarise_clock(clock.steps[warmup:], clock.bare.times[warmup:]),
            "cpu": summarise_clock(clock.cpu_steps[warmup:], clock.bare.cpu_times[warmup:])}


def print_table(summary: dict, facts: dict) -> None:
    wall, cpu = summary["wall"], summary["cpu"]
    print(f"{'phase':<26}{'wall ms':>9}{'share':>8}{'CPU ms':>9}{'share':>8}")
    for phase in (*PHASES, "wall"):
        name = "Lightning step" if phase == "wall" else phase
        print(f"{name:<26}" + "".join(
            f"{c['mean_s'][phase] * 1e3:>9.1f}{c['mean_s'][phase] / c['mean_s']['wall']:>8.1%}"
            for c in (wall, cpu)))
    print(f"{'bare torch step':<26}" + "".join(
        f"{c['mean_bare_s'] * 1e3:>9.1f}{c['mean_bare_s'] / c['mean_s']['wall']:>8.1%}"
        for c in (wall, cpu)))
    print(f"outside the network (fetch, assemble, hooks, loop, epoch end): "
          f"{wall['outside_network_fraction']:.1%} of wall, "
          f"{cpu['outside_network_fraction']:.1%} of CPU time; Lightning / bare "
          f"{wall['lightning_over_bare']:.3f} wall, {cpu['lightning_over_bare']:.3f} CPU (means), "
          f"{wall['median_step_s'] / wall['median_bare_s']:.3f} wall (medians)")
    print(f"{summary['steps']} steps timed (means); {facts['n_train']} training cases, "
          f"{facts['steps_per_epoch']} steps per epoch, validation every "
          f"{facts['check_val_every_n_epoch']} epochs on {facts['n_val']} cases; set-up "
          f"(cache + priors) {facts['setup_s']} s; precision {facts['precision']['chosen']}; "
          f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None, help="results file recipe_step-NAME.json")
    parser.add_argument("--source", type=Path, default=SAMPLE,
                        help="OpenKBP folder (default: the 17 + 4 patient sample)")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    cfg = compose_cfg(ROOT / "outputs" / "bench_recipe_step", args.source, overrides)
    clock, facts = profile_recipe(cfg, args.steps, args.warmup)
    summary = summarise(clock, args.warmup)
    print_table(summary, facts)
    ops = top_ops(clock.bare)
    print(f"{'operator (one bare step, torch.profiler)':<48}{'calls':>6}{'self CPU ms':>12}"
          f"{'share':>8}")
    for op in ops:
        print(f"{op['op'][:47]:<48}{op['calls']:>6}{op['self_cpu_ms']:>12.1f}{op['share']:>8.1%}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "args": {**vars(args), "source": str(args.source)}, "overrides": overrides,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "interop_threads": torch.get_num_interop_threads(),
              "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
              **facts, **summary, "top_ops": ops}
    path = RESULT.with_name(f"recipe_step-{args.name}.json") if args.name else RESULT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
