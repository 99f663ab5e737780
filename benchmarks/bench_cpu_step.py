"""One training step of the CPU recipe's network by memory format and precision, and its
FLOP rate against the CPU's peak.

    python benchmarks/bench_cpu_step.py [--rounds 6] [--threads 2] [--batch 2] [--size 64]
                                        [--modes fp32,channels_last,bf16,channels_last-bf16]
                                        [--name NAME]

The network is ``experiment=openkbp_cpu``'s (composed from the configs, so it follows the
recipe): one AdamW step (forward, L1, backward, optimizer) on a batch of ``--batch``
volumes of ``--size``^3 with the recipe's input channels. The modes are run **interleaved**
(one step of each per round, after two warm-up steps each), so a change of the machine's
load hits every mode alike; each mode's median is reported. bf16 modes are left out on a
CPU without AVX-512 BF16 or AMX (emulated: ~55x slower), unless named in ``--modes``.
Modes ending in ``-compile`` (e.g. ``channels_last-compile``) compile the network with
``torch.compile`` (inductor) first; they run only when named in ``--modes`` (the compile
takes minutes) and their compile time (first step less an eager step) is reported. Every
mode starts from the same initial weights and sees the same batch, so the losses of their
steps must agree to float rounding; the largest difference from the first mode's is
reported. Times are wall and this process's CPU time (steadier on a shared machine).

FLOPs per step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions
and matrix products, forward and backward; norms and activations are not counted, so the
achieved rate is a lower bound). The peak is cores x clock x FLOPs per cycle and core for
fp32 FMA: 32 with AVX2 (two 256-bit FMA units), 64 with AVX-512 (two 512-bit units; Zen 4
double-pumps one, so its real peak is 32). The clock is /proc/cpuinfo's ``cpu MHz``.

Prints a table and writes ``benchmarks/results/cpu_step.json`` (``cpu_step-NAME.json``
with ``--name``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmatdose.config import CONFIG_DIR  # noqa: E402
from vmatdose.training.precision import BF16_CPU_FLAGS, cpu_flags  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "cpu_step.json"
ALL_MODES = ("fp32", "channels_last", "bf16", "channels_last-bf16", "channels_last-compile")


def recipe_net() -> torch.nn.Module:
    """The network of ``experiment=openkbp_cpu`` with the recipe's input channels."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=openkbp_cpu", f"paths.root_dir={ROOT}"])
    return hydra.utils.instantiate(cfg.model.net)


class ModeStep:
    """One AdamW step of its own copy of the network in one memory format and precision."""

    def __init__(self, mode: str, net: torch.nn.Module, batch: int, size: int):
        self.mode = mode
        self.bf16 = "bf16" in mode
        fmt = torch.channels_last_3d if "channels_last" in mode else torch.contiguous_format
        torch.manual_seed(0)
        self.net = net.to(memory_format=fmt)
        if mode.endswith("-compile"):
            self.net.compile()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)
        self.x = torch.randn(batch, net.in_channels, size, size, size).to(memory_format=fmt)
        self.y = torch.randn(batch, 1, size, size, size)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        self.first_s = 0.0

    def step(self, timed: bool = True) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(self.x)
        loss = (out.float() - self.y).abs().mean()
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))
        if timed:
            self.times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu)
        elif not self.first_s:
            self.first_s = time.perf_counter() - start


def flops_per_step(net: torch.nn.Module, batch: int, size: int) -> int:
    x = torch.randn(batch, net.in_channels, size, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x).abs().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_gflops(threads: int, flags: set[str]) -> tuple[float, str]:
    """fp32 FMA peak of ``threads`` cores in GFLOP/s, and how it was computed."""
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    return (threads * mhz / 1e3 * per_cycle,
            f"{threads} cores x {mhz / 1e3:.2f} GHz x {per_cycle} fp32 FLOP/cycle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated, of {', '.join(ALL_MODES)}")
    parser.add_argument("--name", default=None, help="results file cpu_step-NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    native_bf16 = bool(set(BF16_CPU_FLAGS) & flags)
    modes = (args.modes.split(",") if args.modes
             else [m for m in ALL_MODES if (native_bf16 or "bf16" not in m)
                   and "compile" not in m])
    template = recipe_net()
    flops = flops_per_step(template, args.batch, args.size)
    steps = [ModeStep(m, copy.deepcopy(template), args.batch, args.size) for m in modes]
    for s in steps:
        s.step(timed=False)
        s.step(timed=False)
    for _ in range(args.rounds):
        for s in steps:
            s.step()
    peak, peak_rule = peak_gflops(args.threads, flags)
    rows = []
    base = statistics.median(steps[0].times)
    base_cpu = statistics.median(steps[0].cpu_times)
    for s in steps:
        med = statistics.median(s.times)
        cpu = statistics.median(s.cpu_times)
        rows.append({"mode": s.mode, "s_per_step": med, "steps_per_s": 1 / med,
                     "vs_first": base / med, "cpu_s_per_step": cpu,
                     "cpu_vs_first": base_cpu / cpu, "gflops": flops / med / 1e9,
                     "fraction_of_peak": flops / med / 1e9 / peak if peak else None,
                     "first_step_s": s.first_s,
                     "compile_s": (s.first_s - steps[0].first_s
                                   if s.mode.endswith("-compile") else None),
                     "max_loss_diff_vs_first": max(abs(a - b) for a, b in
                                                   zip(s.losses, steps[0].losses)),
                     "losses": s.losses, "times": s.times, "cpu_times": s.cpu_times})
    print(f"{'mode':<24}{'s/step':>8}{'steps/s':>9}{'x':>6}{'CPU s':>7}{'x CPU':>7}"
          f"{'GFLOP/s':>9}{'of peak':>9}{'loss diff':>11}")
    for r in rows:
        print(f"{r['mode']:<24}{r['s_per_step']:>8.3f}{r['steps_per_s']:>9.2f}"
              f"{r['vs_first']:>6.2f}{r['cpu_s_per_step']:>7.3f}{r['cpu_vs_first']:>7.2f}"
              f"{r['gflops']:>9.1f}{r['fraction_of_peak']:>9.1%}"
              f"{r['max_loss_diff_vs_first']:>11.1e}")
        if r["compile_s"] is not None:
            print(f"  {r['mode']}: compile {r['compile_s']:.0f} s (first step less eager's)")
    print(f"{flops / 1e9:.1f} GFLOP per step (conv/matmul fwd+bwd); peak {peak:.0f} GFLOP/s "
          f"= {peak_rule}; load average {os.getloadavg()[0]:.2f}")
    result = RESULT.with_name(f"cpu_step-{args.name}.json") if args.name else RESULT
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "bf16_flags": sorted(set(BF16_CPU_FLAGS) & flags), "avx512f": "avx512f" in flags,
        "gflop_per_step": flops / 1e9, "peak_gflops": peak, "peak_rule": peak_rule,
        "load_average_end": os.getloadavg()[0], "modes": rows}, indent=2))


if __name__ == "__main__":
    main()
