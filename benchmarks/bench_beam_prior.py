"""Seconds per case of the prior-dose channel: the beam prior (nine static fields, a
36-point arc) against the distance prior, on 128^3 cases.

Usage: ``python benchmarks/bench_beam_prior.py [--repeats 3] [--threads 2]`` (``make bench``
runs it). Cases: a synthetic head-and-neck-like 128^3 case (an elliptical water body with
a bone ring, three nested targets at 70/63/56 Gy, 2.5 x 3.9 x 3.9 mm) and, when the
OpenKBP sample is on disk (``../shared/data/openkbp-sample``), its first three training
patients. Each prior is computed as the data pipeline does it (``PriorDosed`` on a loaded
sample), once per case when the data set caches it; the target is 2 s per 128^3 case on
2 cores. Prints a table (min / median / max seconds) and writes
``benchmarks/results/beam_prior.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vmatdose.data.prior import PriorDosed  # noqa: E402
from vmatdose.data.transforms import LoadCased  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "beam_prior.json"
SAMPLE = ROOT.parent / "shared" / "data" / "openkbp-sample" / "train-pats"
LEVELS = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
SPACING = (2.5, 3.906, 3.906)
PROFILE = {"distance_mm": [0.0, 10.0, 30.0, 60.0, 120.0],
           "relative_dose": [1.0, 0.73, 0.3, 0.07, 0.01]}
ARRANGEMENTS = {
    "beams, 9 static fields": ({"kind": "beams"}, {"n_beams": 9, "delivery": "static"}),
    "beams, 36-point arc": ({"kind": "beams"}, {"n_beams": 36, "delivery": "arc"}),
    "beams + distance (recipe)": ({"kind": "beams", "distance_weight": 0.5, **PROFILE},
                                  {"n_beams": 9, "delivery": "static"}),
    "recipe + 9 gantry sectors": ({"kind": "beams", "distance_weight": 0.5, **PROFILE,
                                   "beam_sectors": 9}, {"n_beams": 9, "delivery": "static"}),
    "distance": ({"kind": "distance", **PROFILE}, None),
}


def synthetic_sample(n: int = 128) -> dict:
    """A loaded-sample dict (as ``LoadCased(with_geometry=True)`` gives) of a 128^3 case."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for s in SPACING]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    body = (y / 110) ** 2 + (x / 140) ** 2 <= 1
    ring = body & ((y / 100) ** 2 + (x / 128) ** 2 > 1)
    ct = np.where(body, np.where(ring, 900.0, 20.0), -1000.0).astype(np.float32)
    masks = np.stack([
        ((z / 35) ** 2 + ((y + 10) / 18) ** 2 + ((x + 25) / 18) ** 2 <= 1),
        ((z / 40) ** 2 + ((y + 10) / 16) ** 2 + ((x - 30) / 16) ** 2 <= 1),
        ((z / 70) ** 2 + ((y + 10) / 45) ** 2 + (x / 75) ** 2 <= 1)]).astype(np.float32)
    origin = -(np.asarray([n] * 3) - 1) / 2 * np.asarray(SPACING)
    return {"ct": torch.from_numpy(ct[None]), "masks": torch.from_numpy(masks),
            "body": torch.from_numpy(body[None].astype(np.float32)),
            "spacing_mm": np.asarray(SPACING, np.float32), "origin_mm": origin, "beams": None,
            "case_id": "synthetic"}


def openkbp_samples(count: int = 3) -> dict[str, dict]:
    """Loaded samples of the first OpenKBP sample patients (imported in memory)."""
    if not SAMPLE.is_dir():
        return {}
    import tempfile

    from vmatdose.data.case import save_case
    from vmatdose.data.ingest.openkbp import import_openkbp_patient

    loader = LoadCased(list(LEVELS), 70.0, with_geometry=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted(SAMPLE.glob("pt_*"))[:count]:
            path = save_case(import_openkbp_patient(folder), Path(tmp) / f"{folder.name}.npz")
            sample = loader({"path": str(path)})
            sample["beams"] = None  # the protocol's default, as for cases imported before
            out[f"OpenKBP {folder.name}"] = {k: torch.from_numpy(v) if k in (
                "ct", "masks", "body") else v for k, v in sample.items()}
    return out


def time_prior(sample: dict, prior_cfg: dict, beams: dict | None, repeats: int) -> list[float]:
    transform = PriorDosed(list(LEVELS), LEVELS, 70.0, prior_cfg, beams)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        transform(dict(sample))
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"synthetic 128^3": synthetic_sample(), **openkbp_samples()}
    rows = []
    print(f"{'case':22s}{'prior':28s}{'min s':>8s}{'median s':>10s}{'max s':>8s}")
    for case, sample in cases.items():
        for name, (prior_cfg, beams) in ARRANGEMENTS.items():
            seconds = time_prior(sample, prior_cfg, beams, args.repeats)
            row = {"case": case, "prior": name, "min_s": round(min(seconds), 3),
                   "median_s": round(statistics.median(seconds), 3),
                   "max_s": round(max(seconds), 3)}
            rows.append(row)
            print(f"{case:22s}{name:28s}{row['min_s']:8.2f}{row['median_s']:10.2f}"
                  f"{row['max_s']:8.2f}")
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{args.threads} torch threads", "repeats": args.repeats,
              "target_s_per_case": 2.0, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
