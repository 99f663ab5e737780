"""Benchmark every model config: parameters, training-step time and peak memory, inference
time per case, and (generative models) time per sampling step. CPU always; GPU when present.

    python benchmarks/bench_models.py [--models unet ddpm ...] [--train-size 32]
                                      [--infer-size 64] [--repeats 2] [--threads N]

Per model, on synthetic inputs with the phantom's channels (CT + 7 masks):

* **training step** at ``--train-size``^3, batch 1: ``training_step`` (forward, loss, and for
  DDPM/flow the objective at a random time) + backward + AdamW step; median seconds after one
  warm-up step, and the peak memory of those steps (model, gradients, optimizer state and
  activations). CPU: peak resident-set growth of a forked process that builds the model
  (Linux ``VmHWM``); GPU: ``torch.cuda.max_memory_allocated``.
* **inference** at ``--infer-size``^3 (the issue's 64^3), one case: regression models time
  ``predict_dose``; DDPM/flow time a 2-step, 1-sample sampling (Euler for flow) to get seconds
  per network evaluation and per sampling step (Heun: about 2 evaluations per step), and
  seconds per case = s/step x ``sampling_steps`` x ``ensemble_size`` of the config
  ("estimated"); on a GPU the whole ensemble is also measured end to end ("measured").

A table is printed; results merge into ``benchmarks/results/models.json`` under one key
per device ("cpu", "cuda:<name>"), with machine information, so runs on different machines
accumulate. CPU timings use one thread by default (``--threads``): on a CPU shared with other
jobs more threads slow down many-fold while OpenMP threads wait for a busy core (the load
average is recorded with the results). Two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import monai
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmatdose.config import CONFIG_DIR, input_channels  # noqa: E402
from vmatdose.models.flow import network_evaluations  # noqa: E402
from vmatdose.training.generative import (  # noqa: E402
    FlowMatchingDoseModule,
    GenerativeDoseModule,
)

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
DEFAULT_MODELS = ("unet", "unet32", "unet48", "unet96", "unet_founding", "attention_unet",
                  "dynunet", "ddpm", "flow_matching")
MIB = 2 ** 20


# -- building ---------------------------------------------------------------------------


def build(name: str, root: str, device: torch.device, with_loss: bool):
    """Module from ``conf/model/<name>.yaml`` (phantom data; L1 loss when ``with_loss``) on
    ``device``, and its number of input channels."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"paths.root_dir={root}",
                                          f"paths.output_dir={root}/run",
                                          "model.val_gamma=null"])
    loss = hydra.utils.instantiate(cfg.loss) if with_loss else None
    module = hydra.utils.instantiate(cfg.model, loss=loss).to(device)
    return module, input_channels(cfg.protocol.structures, cfg.data.signed_distance)


def synthetic_batch(channels: int, size: int, device: torch.device) -> dict[str, Any]:
    """One case: random (1, C, S, S, S) image and masks, dose in [0, 1], body of ones."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, channels, size, size, size, generator=gen)
    batch = {"image": image, "dose": torch.rand(1, 1, size, size, size, generator=gen),
             "body": torch.ones(1, 1, size, size, size),
             "masks": (image[:, 1:] > 0.5).float(),
             "spacing_mm": torch.tensor([[3.0, 4.0, 4.0]]),
             "dose_scale_gy": torch.tensor([70.0])}
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as training and ``predict_cases`` use), none on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -- measuring --------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def _proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (Linux), else ``None``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory (MiB) of what runs after construction: CUDA allocator peak, or the growth
    of this process's peak resident set over its current size (meaningful in a fresh
    forked process, see :func:`isolated`)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.start = _proc_status_kib("VmRSS")

    def mib(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / MIB
        peak = _proc_status_kib("VmHWM")
        return None if peak is None or self.start is None else (peak - self.start) / 1024


def _child(conn: Any, fn: Callable[..., dict], args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as err:  # report any failure to the parent
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def isolated(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` in a forked process (Linux CPU), so its peak memory is its own; falls
    back to running in this process where fork is unavailable."""
    if "fork" not in mp.get_all_start_methods():
        return fn(*args)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    status, result = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(result)
    return result


# -- the two measurements -----------------------------------------------------------------


def bench_training(name: str, size: int, device: torch.device, repeats: int,
                   root: str) -> dict:
    """Parameters, median seconds and peak MiB of one training step at ``size``^3."""
    peak = PeakMemory(device)
    module, channels = build(name, root, device, with_loss=True)
    module.train()
    batch = synthetic_batch(channels, size, device)
    optimizer = module.optimizer_factory(params=module.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        seconds = timed(step, device, repeats)
    return {"module": type(module).__name__, "net": type(module.net).__name__,
            "parameters": sum(p.numel() for p in module.parameters()),
            "train_size": size, "train_step_s": seconds, "train_peak_mib": peak.mib()}


def bench_inference(name: str, size: int, device: torch.device, repeats: int,
                    root: str) -> dict:
    """Seconds per case at ``size``^3 (and per sampling step for generative models)."""
    peak = PeakMemory(device)
    module, channels = build(name, root, device, with_loss=False)
    image = synthetic_batch(channels, size, device)["image"]
    row: dict[str, Any] = {"infer_size": size}
    with torch.no_grad(), autocast(device):
        if isinstance(module, GenerativeDoseModule):
            row.update(sampling_times(module, image, device, repeats))
        else:
            row["infer_s_per_case"] = timed(lambda: module.predict_dose(image), device,
                                            repeats)
            row["infer_method"] = "measured"
    row["infer_peak_mib"] = peak.mib()
    return row


def sampling_times(module: GenerativeDoseModule, image: torch.Tensor, device: torch.device,
                   repeats: int) -> dict:
    """Seconds per network evaluation (2-step, 1-sample Euler/DDIM runs), per sampling step
    of the configured sampler, and per case (estimated on the CPU, measured on a GPU)."""
    solver = getattr(module, "solver", None)
    if isinstance(module, FlowMatchingDoseModule):
        module.solver = "euler"
    per_eval = timed(lambda: module.sample_doses(image, 2, 1), device, repeats) / 2
    if isinstance(module, FlowMatchingDoseModule):
        module.solver = solver
        per_step = per_eval * network_evaluations(module.sampling_steps, solver) \
            / module.sampling_steps
    else:
        per_step = per_eval
    row = {"s_per_network_evaluation": per_eval, "s_per_sampling_step": per_step,
           "sampling_steps": module.sampling_steps, "ensemble_size": module.ensemble_size,
           "solver": solver or "ddim",
           "infer_s_per_case": per_step * module.sampling_steps * module.ensemble_size,
           "infer_method": "estimated: s/step x steps x ensemble"}
    if device.type == "cuda":
        row["infer_s_per_case"] = timed(lambda: module.predict_dose(image), device, 1)
        row["infer_method"] = "measured"
    return row


def bench_model(name: str, device: torch.device, args: argparse.Namespace,
                root: str) -> dict:
    """Both measurements for one model; CPU ones in forked processes."""
    run = isolated if device.type == "cpu" else (lambda fn, *a: fn(*a))
    row = {"model": name, "device": device.type}
    row.update(run(bench_training, name, args.train_size, device, args.repeats, root))
    row.update(run(bench_inference, name, args.infer_size, device, args.repeats, root))
    print(f"  {name}: done", flush=True)
    return row


# -- reporting ----------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def device_key(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def save(entries: dict[str, dict], path: Path) -> None:
    """Merge ``{device key: entry}`` into the results file (other devices are kept)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("devices", {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'model':<15}{'dev':>5}{'params M':>9}{'train s':>9}{'train MiB':>10}"
            f"{'infer s':>9}{'infer MiB':>10}{'s/step':>8}{'steps x N':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        runs = f"{r['sampling_steps']}x{r['ensemble_size']}" if "sampling_steps" in r else "-"
        est = "*" if r["infer_method"].startswith("estimated") else " "
        lines.append(
            f"{r['model']:<15}{r['device']:>5}{r['parameters'] / 1e6:>9.2f}"
            f"{r['train_step_s']:>9.3f}{_fmt(r['train_peak_mib'], '.0f'):>10}"
            f"{r['infer_s_per_case']:>8.2f}{est}{_fmt(r['infer_peak_mib'], '.0f'):>10}"
            f"{_fmt(r.get('s_per_sampling_step'), '.3f'):>8}{runs:>10}")
    lines.append("train: fwd+bwd+AdamW at train_size^3; infer: one case at infer_size^3; "
                 "* estimated = s/step x steps x N")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--train-size", type=int, default=32, help="training cube side")
    parser.add_argument("--infer-size", type=int, default=64, help="inference cube side")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steady on a shared machine and "
                             "comparable across machines; 0 keeps torch's default)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "cpu_only")}
    start = time.perf_counter()
    entries, rows = {}, []
    with tempfile.TemporaryDirectory() as root:
        # The CPU first, in forked processes, before anything touches CUDA in this process.
        devices = [torch.device("cpu")]
        for device in devices:
            print(f"{device_key(device)}:", flush=True)
            device_rows = [bench_model(name, device, args, root) for name in args.models]
            entries[device_key(device)] = {"machine": machine_info(device),
                                           "settings": settings, "results": device_rows}
            rows += device_rows
            if device.type == "cpu" and not args.cpu_only and torch.cuda.is_available():
                devices.append(torch.device("cuda"))
    save(entries, args.output)
    print(table(rows))
    print(f"{time.perf_counter() - start:.0f} s -> {args.output}")


if __name__ == "__main__":
    main()
