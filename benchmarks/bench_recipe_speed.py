"""Steps per second of ``experiment=openkbp_cpu`` as a user trains it, against the recipe
as it was when issue 30 opened: each version trains ``--steps`` optimizer steps from
scratch with ``python -m vmatdose.train`` (a fresh process each, one after the other,
``--rounds`` times in alternating order), and the steps per second are read from each
run's ``throughput.json`` (the training loop's wall time; the data set-up before it is
not counted) beside the precision the run chose (``run_record.json``).

    python benchmarks/bench_recipe_speed.py [--steps 240] [--rounds 1] [--name NAME]
                                            [hydra overrides for both versions]

The versions:

- ``issue-start``: fp32 chosen by hand, the default memory layout, whole volumes, the
  24-wide network without the EMA, the per-tensor AdamW (``trainer.precision=32-true
  callbacks.memory_format.format=contiguous model.body_crop_margin=null
  data.divisible_by=16 model.net.channels=[24,48,96,192]
  callbacks.weight_averaging.decay=null model.optimizer.fused=false``);
- ``recipe``: the recipe as committed (``trainer.precision=auto`` picks bf16 on a CPU with
  AVX-512 BF16 or AMX, channels-last on the CPU, the body's box).

Prints a table and writes ``benchmarks/results/recipe_speed.json``
(``recipe_speed-NAME.json`` with ``--name``). Needs the OpenKBP data the recipe reads
(``data.source_dir``); with the full set each run takes 1-3 minutes of set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

VERSIONS = {
    "issue-start": ["trainer.precision=32-true", "callbacks.memory_format.format=contiguous",
                    "model.body_crop_margin=null", "data.divisible_by=16",
                    "model.net.channels=[24,48,96,192]",
                    "callbacks.weight_averaging.decay=null", "model.optimizer.fused=false"],
    "recipe": [],
}


def train(version: str, steps: int, run_dir: Path, overrides: list[str]) -> dict:
    """Train one version for ``steps`` steps in a fresh process; its throughput record and
    the precision it chose."""
    command = [sys.executable, "-m", "vmatdose.train", "experiment=openkbp_cpu",
               f"trainer.max_steps={steps}", "logger=csv", f"hydra.run.dir={run_dir}",
               "callbacks.model_checkpoint=null", *VERSIONS[version], *overrides]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    throughput = json.loads((run_dir / "throughput.json").read_text())
    record = json.loads((run_dir / "run_record.json").read_text())
    return {"version": version, **throughput, "precision": record["precision"]["chosen"],
            "precision_reason": record["precision"].get("reason", "")}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--name", default="", help="result file recipe_speed-NAME.json")
    args, overrides = parser.parse_known_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = ROOT / "outputs" / "bench_recipe_speed" / stamp
    load_before = os.getloadavg()
    runs = []
    for r in range(args.rounds):
        order = list(VERSIONS) if r % 2 == 0 else list(reversed(VERSIONS))
        for version in order:
            runs.append(train(version, args.steps, base / f"{r}-{version}", overrides))
            print(f"round {r}: {version}: {runs[-1]['steps_per_s']:.3f} steps/s", flush=True)
    rate = {v: statistics.median(run["steps_per_s"] for run in runs if run["version"] == v)
            for v in VERSIONS}
    result = {"date": stamp, "steps": args.steps, "rounds": args.rounds, "overrides": overrides,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpus": os.cpu_count(), "runs": runs,
              "median_steps_per_s": rate,
              "speedup": round(rate["recipe"] / rate["issue-start"], 3)}
    print(f"{'version':<14}{'steps/s (median)':>18}{'precision':>12}")
    for version in VERSIONS:
        chosen = next(run["precision"] for run in runs if run["version"] == version)
        print(f"{version:<14}{rate[version]:>18.3f}{chosen:>12}")
    print(f"recipe / issue-start: {result['speedup']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"recipe_speed{'-' + args.name if args.name else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
