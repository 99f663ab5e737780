"""The work of one training step after the backward pass, for the parameters of
``experiment=openkbp_cpu``'s network: the AdamW update (per-tensor, foreach, fused) and
the EMA of the weights (``callbacks.weight_averaging``: Lightning's per-tensor path against
the callback's one foreach lerp).

    python benchmarks/bench_optimizer_step.py [--rounds 30] [--threads 2] [--name NAME]

Each variant gets its own copy of the network's parameters and the same random gradients;
the variants run interleaved (one call of each per round, after three warm-up calls), so a
change of the machine's load hits all alike; the median of each is reported. The AdamW
variants start from the same state, so their parameters after the timed steps must agree
to float rounding: the largest difference from the per-tensor step's is reported.

Prints a table and writes ``benchmarks/results/optimizer_step.json``
(``optimizer_step-NAME.json`` with ``--name``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_step import recipe_net  # noqa: E402

from vmatdose.training.weight_averaging import EMAWeightAveraging, ema_decay_at  # noqa: E402

ADAMW = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True},
         "fused": {"fused": True}}


def adamw_steps(net: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """One copy of ``net`` per AdamW variant, each with gradients and its optimizer's step."""
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in net.parameters()]
    variants = {}
    for name, kwargs in ADAMW.items():
        copy_ = copy.deepcopy(net)
        for p, g in zip(copy_.parameters(), grads):
            p.grad = g.clone()
        optimizer = torch.optim.AdamW(copy_.parameters(), lr=3e-3, weight_decay=0.2, **kwargs)
        variants[f"AdamW {name}"] = (copy_, optimizer.step)
    return variants


def lightning_avg_fn(averaged: torch.Tensor, current: torch.Tensor,
                     n_averaged: torch.Tensor) -> torch.Tensor:
    """The callback's update as a per-tensor ``avg_fn`` (how it ran before its foreach
    form): one lerp and one copy per tensor, the decay read per tensor."""
    if not averaged.is_floating_point():
        return current
    return averaged.lerp(current.to(averaged.dtype), 1.0 - ema_decay_at(0.999, int(n_averaged)))


def ema_updates(net: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """The EMA update of ``net``'s weights: Lightning's per-tensor path (an ``avg_fn``)
    against the callback's (a ``multi_avg_fn``), the same decay."""
    callback = EMAWeightAveraging(decay=0.999)
    variants = {}
    for name, kwargs in {"EMA per-tensor (avg_fn)": {"avg_fn": lightning_avg_fn},
                         "EMA foreach (the callback)": {"multi_avg_fn": callback._average}
                         }.items():
        average = AveragedModel(net, use_buffers=True, **kwargs)
        average.update_parameters(net)  # the first update copies
        variants[name] = (average, lambda average=average: average.update_parameters(net))
    return variants


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="", help="result file optimizer_step-NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = recipe_net()
    n_params = sum(p.numel() for p in net.parameters())
    variants = {**adamw_steps(net), **ema_updates(net)}
    for _, call in variants.values():
        for _ in range(3):
            call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (_, call) in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    reference = list(variants["AdamW per-tensor"][0].parameters())
    rows = []
    for name, (module, _) in variants.items():
        diff = (max(float((a - b).detach().abs().max()) for a, b in zip(module.parameters(), reference))
                if name.startswith("AdamW") else None)
        rows.append({"variant": name, "median_ms": round(statistics.median(times[name]) * 1e3, 2),
                     "max_param_diff_vs_per_tensor": diff})
    print(f"{'variant':<30}{'median ms':>10}   largest parameter difference")
    for row in rows:
        diff = row["max_param_diff_vs_per_tensor"]
        print(f"{row['variant']:<30}{row['median_ms']:>10.2f}   "
              f"{'' if diff is None else f'{diff:.1e}'}")
    print(f"{n_params / 1e6:.1f} M parameters, {args.rounds} rounds, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "parameters": n_params, "load_average_end": os.getloadavg()[0], "rows": rows}
    name = f"optimizer_step-{args.name}.json" if args.name else "optimizer_step.json"
    path = ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
