"""Benchmark vmatdose's gamma index against ``pymedphys.gamma`` on a phantom-like plan.

Usage: ``python benchmarks/bench_gamma.py [--sizes 48 64 128] [--criteria 3/3 2/2]
[--subset N]`` (``make bench`` runs it without arguments: 48^3, 64^3 and the OpenKBP grid
128^3 at 2.5 mm, 3 %/3 mm and 2 %/2 mm, about two minutes on 2 cores). Prints a table
(method, seconds, pass rate, speed-up) and writes ``benchmarks/results/gamma.json``.

The case: a synthetic plan on an N^3 grid (2.5 mm isotropic): a two-lobe target at 70 Gy
with a sigmoid fall-off (scale 2.5 mm), a low-dose bath of up to ~45 % decaying over
~45 mm, inside an elliptical body, slightly blurred. The evaluated dose is that plan
shifted by (1.2, -0.9, 1.5) mm, scaled by 1.5 % plus a smooth +-4 % field, with mild
spatially correlated noise (0.7 Gy): roughly a good prediction against the clinical dose.
Both sides use the same settings: 10 % lower cutoff, interp_fraction 10, max_gamma 2.

With ``--subset N`` (automatic for grids above 64^3) pymedphys scores only random
reference points (its ``random_subset``); its full time is extrapolated with a line
``a + b * points`` fitted on a 200-point and an N-point run, so the fixed per-shell cost is
not multiplied up. The output says when a time is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmatdose.metrics.gamma import gamma_index, pass_rate_from_gamma  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gamma.json"
SPACING = (2.5, 2.5, 2.5)
OPTIONS = {"lower_percent_dose_cutoff": 10.0, "interp_fraction": 10, "max_gamma": 2.0}
TARGET_SPEEDUP = 50.0
FULL_PYMEDPHYS_MAX_SIZE = 64  # above this, --subset defaults to 20000 points


def clinical_pair(n: int, spacing=SPACING, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, evaluated) float32 doses in Gy on an (n, n, n) grid."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    axes = [(np.arange(n) - (n - 1) / 2) * s for s in sp]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    body = (z / 200) ** 2 + (y / 120) ** 2 + (x / 170) ** 2 <= 1
    target = ((z / 40) ** 2 + (y / 30) ** 2 + ((x - 8) / 38) ** 2 <= 1) | \
        (((z - 20) / 22) ** 2 + ((y + 18) / 18) ** 2 + ((x + 25) / 20) ** 2 <= 1)
    signed = (ndimage.distance_transform_edt(~target, sampling=sp)
              - ndimage.distance_transform_edt(target, sampling=sp))
    high = 1 / (1 + np.exp(signed / 2.5))
    bath = 0.45 * np.exp(-np.clip(signed, 0, None) / 45) * (1 + 0.3 * np.cos(4 * np.arctan2(y, x)))
    reference = ndimage.gaussian_filter(70 * (high + (1 - high) * bath) * body, 2.0 / sp)
    evaluated = ndimage.shift(reference, np.array([1.2, -0.9, 1.5]) / sp, order=1,
                              mode="nearest")
    smooth = ndimage.gaussian_filter(rng.normal(size=reference.shape), 8 / sp)
    noise = ndimage.gaussian_filter(rng.normal(size=reference.shape), 0.7)
    evaluated = (evaluated * (1.015 + 0.04 * smooth / np.abs(smooth).max())
                 + 0.7 * noise / noise.std() * (evaluated > 1))
    return reference.astype(np.float32), np.clip(evaluated, 0, None).astype(np.float32)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Wall times (s) of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if isinstance(result, torch.Tensor) and result.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, result


def run_pymedphys(ref: np.ndarray, ev: np.ndarray, dose_percent: float, distance_mm: float,
                  subset: int | None = None, seed: int = 0) -> tuple[float, np.ndarray]:
    """One timed ``pymedphys.gamma`` call (s) and its gamma (NaN where not scored)."""
    import pymedphys

    axes = tuple(np.arange(k) * s for k, s in zip(ref.shape, SPACING))
    np.random.seed(seed)  # random_subset shuffles with numpy's global generator
    times, gamma = timed(lambda: pymedphys.gamma(axes, ref, axes, ev, dose_percent,
                                                 distance_mm, random_subset=subset,
                                                 **OPTIONS), 1)
    return times[0], gamma


def run_ours(ref, ev, dose_percent: float, distance_mm: float, repeats: int
             ) -> tuple[list[float], np.ndarray | torch.Tensor]:
    gamma_index(ref, ev, SPACING, dose_percent, distance_mm, **OPTIONS)  # warm-up (JIT)
    return timed(lambda: gamma_index(ref, ev, SPACING, dose_percent, distance_mm, **OPTIONS),
                 repeats)


def pymedphys_entry(ref: np.ndarray, ev: np.ndarray, dose_percent: float, distance_mm: float,
                    subset: int | None, n_scored: int) -> tuple[dict, np.ndarray]:
    """pymedphys' time (measured or extrapolated) and its gamma on the scored points."""
    if subset is None or subset >= n_scored:
        seconds, gamma = run_pymedphys(ref, ev, dose_percent, distance_mm)
        return {"seconds": seconds, "extrapolated": False, "points": n_scored}, gamma
    small = min(200, subset // 2)
    t_small, _ = run_pymedphys(ref, ev, dose_percent, distance_mm, small, seed=1)
    t_subset, gamma = run_pymedphys(ref, ev, dose_percent, distance_mm, subset)
    per_point = max((t_subset - t_small) / (subset - small), 0.0)
    fixed = max(t_small - small * per_point, 0.0)
    return {"seconds": fixed + per_point * n_scored, "extrapolated": True, "points": subset,
            "subset_seconds": t_subset, "small_subset_points": small,
            "small_subset_seconds": t_small, "fixed_seconds": fixed,
            "seconds_per_point": per_point}, gamma


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Agreement on the voxels pymedphys scored (all, or its random subset)."""
    valid = ~np.isnan(theirs)
    both = valid & (ours < OPTIONS["max_gamma"]) & (theirs < OPTIONS["max_gamma"])
    return {
        "compared_voxels": int(valid.sum()),
        "ours_scored_them": bool(np.all(~np.isnan(ours[valid]))),
        "max_abs_gamma_diff": float(np.abs(ours[both] - theirs[both]).max()),
        "pass_rate_pymedphys": 100.0 * float(np.mean(theirs[valid] <= 1)),
        "pass_rate_ours_same_voxels": 100.0 * float(np.mean(ours[valid] <= 1)),
    }


def benchmark_criterion(ref: np.ndarray, ev: np.ndarray, dose_percent: float,
                        distance_mm: float, subset: int | None, repeats: int) -> dict:
    ours_times, ours = run_ours(ref, ev, dose_percent, distance_mm, repeats)
    n_scored = int(np.count_nonzero(~np.isnan(ours)))
    theirs, theirs_gamma = pymedphys_entry(ref, ev, dose_percent, distance_mm, subset,
                                           n_scored)
    row = {"criterion": f"{dose_percent:g}%/{distance_mm:g}mm", "scored_voxels": n_scored,
           "pymedphys": theirs, "ours_cpu_s": ours_times,
           "ours_cpu_median_s": statistics.median(ours_times),
           "pass_rate_ours": pass_rate_from_gamma(ours), **compare(ours, theirs_gamma)}
    row["speedup"] = theirs["seconds"] / row["ours_cpu_median_s"]
    row["pass_rate_diff_pp"] = row["pass_rate_ours_same_voxels"] - row["pass_rate_pymedphys"]
    if torch.cuda.is_available():
        cuda_times, _ = run_ours(torch.from_numpy(ref).cuda(), torch.from_numpy(ev).cuda(),
                                 dose_percent, distance_mm, repeats)
        row["ours_cuda_median_s"] = statistics.median(cuda_times)
    return row


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_average_at_start": list(os.getloadavg()),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for module in ("numba", "pymedphys", "scipy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def table(rows: list[dict], size: int) -> str:
    """Markdown table: method, seconds, pass rate, speed-up."""
    lines = ["| method | criterion | seconds | pass rate (%) | speed-up |",
             "|---|---|---|---|---|"]
    for r in rows:
        p = r["pymedphys"]
        note = f" (extrapolated from {p['points']} random points)" if p["extrapolated"] else ""
        lines.append(f"| pymedphys.gamma{note} | {r['criterion']} | {p['seconds']:.2f} | "
                     f"{r['pass_rate_pymedphys']:.3f} | 1x |")
        lines.append(f"| vmatdose gamma_index (CPU, numba) | {r['criterion']} | "
                     f"{r['ours_cpu_median_s']:.3f} | {r['pass_rate_ours']:.3f} | "
                     f"{r['speedup']:.0f}x |")
        if "ours_cuda_median_s" in r:
            lines.append(f"| vmatdose gamma_index (CUDA, torch) | {r['criterion']} | "
                         f"{r['ours_cuda_median_s']:.3f} | {r['pass_rate_ours']:.3f} | "
                         f"{p['seconds'] / r['ours_cuda_median_s']:.0f}x |")
    lines.append(f"\n{size}^3 grid at {SPACING[0]:g} mm; ours: median of the timed runs after "
                 "a warm-up call; pass rate = % of scored voxels with gamma <= 1 (pymedphys: on "
                 "the voxels it scored).")
    return "\n".join(lines)


def parse_criteria(values: list[str]) -> list[tuple[float, float]]:
    try:
        return [tuple(float(v) for v in text.split("/")) for text in values]  # type: ignore
    except ValueError as err:
        raise SystemExit(f"criteria look like 3/3 (percent/mm), got {values}") from err


def benchmark_size(size: int, criteria: list[tuple[float, float]], subset: int | None,
                   repeats: int) -> list[dict]:
    if subset is None and size > FULL_PYMEDPHYS_MAX_SIZE:
        subset = 20_000
    ref, ev = clinical_pair(size)
    rows = []
    for dose_percent, distance_mm in criteria:
        row = benchmark_criterion(ref, ev, dose_percent, distance_mm, subset, repeats)
        rows.append({"size": size, "pymedphys_subset": subset, **row})
        print(f"  {size}^3 {row['criterion']}: {row['speedup']:.0f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 128],
                        help="grid sizes N (N^3 voxels)")
    parser.add_argument("--criteria", nargs="+", default=["3/3", "2/2"],
                        help="dose percent / DTA mm pairs")
    parser.add_argument("--subset", type=int, default=None,
                        help="pymedphys random_subset points (default: all voxels up to "
                        f"{FULL_PYMEDPHYS_MAX_SIZE}^3, else 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.WARNING)
    info = machine_info()
    print(f"gamma benchmark: {info['platform']}, {info['cpu_count']} CPUs, torch "
          f"{info['torch']}, numpy {info['numpy']}, numba {info['numba']}, pymedphys "
          f"{info['pymedphys']}", flush=True)
    run_pymedphys(*clinical_pair(16), 3.0, 3.0)  # imports and JIT outside the timings
    criteria = parse_criteria(args.criteria)
    rows = [row for size in args.sizes
            for row in benchmark_size(size, criteria, args.subset, args.repeats)]
    text = "\n\n".join(f"### {size}^3\n" + table([r for r in rows if r["size"] == size], size)
                       for size in args.sizes)
    print(text)
    worst = min(r["speedup"] for r in rows)
    agree = all(abs(r["pass_rate_diff_pp"]) <= 0.2 for r in rows)
    print(f"slowest speed-up {worst:.0f}x (target >= {TARGET_SPEEDUP:g}x: "
          f"{'met' if worst >= TARGET_SPEEDUP else 'NOT met'}); pass rates within 0.2 pp of "
          f"pymedphys: {'yes' if agree else 'NO'}")
    info["load_average_at_end"] = list(os.getloadavg())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": info, "case": {"sizes": args.sizes, "spacing_mm": SPACING},
        "options": OPTIONS, "results": rows, "min_speedup": worst,
        "target_speedup": TARGET_SPEEDUP, "pass_rates_agree_within_0.2pp": agree,
        "table_markdown": text}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
