"""``make bench-openkbp``: train ``experiment=openkbp_cpu`` (or ``--experiment``, e.g.
``openkbp_flow``) from scratch, then score the validation patients (33 with the full set)
with the official OpenKBP formulas, on the predictions as a challenge submission would
carry them.

    python benchmarks/bench_openkbp.py [--experiment E] [--name NAME] [--threads N] [hydra overrides ...]

Prints a table and writes ``benchmarks/results/<E>.json`` (``<E>-NAME.json`` with
``--name``; ``openkbp_cpu.json`` by default): wall time (training and evaluation; the
one-time unpacking and import of the archives is done first and not counted), epochs, steps and steps per second, the
validation dose and DVH scores next to the challenge winner's 2.43 / 1.48 Gy, the gamma
pass rate (3 %/3 mm global, 10 % cut-off) over the body, the targets and the 10-50 % dose
region, and the same scores recomputed from the exported ``pt_N.csv`` files read back by
:func:`vmatdose.data.export.openkbp.read_submission`, which knows only the challenge's
format. ``--threads`` sets torch's threads (default 2, the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmatdose.config import CONFIG_DIR  # noqa: E402
from vmatdose.data.case import Case  # noqa: E402
from vmatdose.data.export.openkbp import read_submission, to_original, write_submission  # noqa: E402
from vmatdose.data.ingest.openkbp import to_canonical  # noqa: E402
from vmatdose.evaluation.openkbp_scores import score_patients  # noqa: E402
from vmatdose.evaluation.regions import dose_regions, region_pass_rates, target_union  # noqa: E402
from vmatdose.inference.predictor import Predictor  # noqa: E402
from vmatdose.metrics.gamma import gamma_index  # noqa: E402

WINNER = {"dose_score_gy": 2.429, "dvh_score_gy": 1.478}
RESULTS = ROOT / "benchmarks" / "results"


def compose_config(run_dir: Path, overrides: list[str], experiment: str = "openkbp_cpu"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[
            f"experiment={experiment}", f"paths.root_dir={ROOT}", f"paths.output_dir={run_dir}",
            "logger=csv", *overrides])


def predict_validation(ckpt: str | Path, paths: list[Path]) -> list[tuple[Case, np.ndarray]]:
    """(case, predicted dose Gy on the case grid) for every case file, through the same
    predictor as ``predict`` and ``evaluate`` (the checkpoint read once; pooling, TTA and
    zeroing outside the possible-dose mask as the model config says)."""
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    return [(p.case, p.dose_gy) for p in predictor.predict_all(paths)]


def gamma_pass_rates(pairs, targets: list[str]) -> dict[str, float]:
    """Mean over patients of the gamma pass rate (%, 3 %/3 mm global, 10 % cut-off) in the
    body (the possible-dose mask), the targets and the 10-50 % dose region."""
    rates: dict[str, list[float]] = {"body": [], "targets": [], "low_dose": []}
    for case, pred in pairs:
        gamma = gamma_index(case.dose, pred.astype(np.float32), case.spacing_mm,
                            dose_percent=3.0, distance_mm=3.0,
                            lower_percent_dose_cutoff=10.0, mask=case.body > 0)
        regions = {"body": case.body > 0, "targets": target_union(case, targets),
                   "low_dose": dose_regions(case)["low_dose"]}
        for name, rate in region_pass_rates(gamma, regions).items():
            rates[name].append(rate)
    return {name: round(float(np.nanmean(v)), 2) for name, v in rates.items()}


def reread_submissions(pairs, folder: Path) -> tuple[list, float]:
    """Export every prediction as ``pt_N.csv``, read it back with the challenge-format
    reader, and return the re-read pairs and the largest voxel difference (Gy)."""
    reread, worst = [], 0.0
    for case, pred in pairs:
        path = write_submission(pred, case, folder)
        original = read_submission(path)
        worst = max(worst, float(np.abs(original - to_original(pred)).max()))
        reread.append((case, to_canonical(original)))
    return reread, worst


def main(argv: list[str]) -> dict:
    import hydra

    from vmatdose.training.fit import best_checkpoint, fit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="openkbp_cpu",
                        help="the recipe (conf/experiment/), e.g. openkbp_flow")
    parser.add_argument("--name", default="", help="result file <experiment>-NAME.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix = (f"-{args.experiment}" if args.experiment != "openkbp_cpu" else "") + (
        f"-{args.name}" if args.name else "")
    run_dir = ROOT / "outputs" / "bench_openkbp" / (stamp + suffix)
    cfg = compose_config(run_dir, overrides, args.experiment)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # one-time unpack + import: not part of the budget
    val_paths = datamodule.paths_of("val")
    start = time.perf_counter()
    trainer, _ = fit(cfg, run_dir)
    train_s = time.perf_counter() - start
    ckpt = best_checkpoint(trainer)
    pairs = predict_validation(ckpt, val_paths)
    scores = score_patients(pairs, list(cfg.data.targets))
    wall_s = time.perf_counter() - start
    gamma = gamma_pass_rates(pairs, list(cfg.data.targets))
    reread, worst = reread_submissions(pairs, run_dir / "submission")
    reread_scores = score_patients(reread, list(cfg.data.targets))
    result = {
        "recipe": f"experiment={args.experiment}", "overrides": overrides,
        "machine": f"{args.threads}-thread CPU (2-core shared machine), no GPU",
        "cpu": cpu_name(), "precision": json.loads(
            (run_dir / "run_record.json").read_text()).get("precision"),
        "source": datamodule.source_dir.name, "n_train": len(datamodule.paths_of("train")),
        # data.split.train_on with val: the validation patients were trained on too
        "train_on": list(cfg.data.split.train_on),
        "val_in_sample": "val" in cfg.data.split.train_on,
        "n_val": len(val_paths), "wall_s": round(wall_s, 1), "train_s": round(train_s, 1),
        "eval_s": round(wall_s - train_s, 1), "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "steps_per_s": round(trainer.global_step / max(train_s, 1e-9), 3),
        # the process's peak resident set (Linux: ru_maxrss in kB)
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "prior_dose": (cfg.data.prior_dose or {}).get("kind", "distance")
        if cfg.data.prior_dose else None, "checkpoint": str(Path(ckpt).relative_to(ROOT)),
        "val_dose_score_gy": round(scores["dose_score_gy"], 4),
        "val_dvh_score_gy": round(scores["dvh_score_gy"], 4),
        "val_d95_error_gy": {t: round(v, 3) for t, v in scores["d95_error_gy"].items()},
        "winner_dose_score_gy": WINNER["dose_score_gy"],
        "winner_dvh_score_gy": WINNER["dvh_score_gy"],
        "gamma_pass_body_pct": gamma["body"], "gamma_pass_targets_pct": gamma["targets"],
        "gamma_pass_10_50pct_dose_pct": gamma["low_dose"],
        "submission_reread_dose_score_gy": round(reread_scores["dose_score_gy"], 4),
        "submission_reread_dvh_score_gy": round(reread_scores["dvh_score_gy"], 4),
        "submission_max_voxel_difference_gy": worst,
        "per_patient": scores["per_patient"],
    }
    print_table(result)
    path = RESULTS / (args.experiment + (f"-{args.name}" if args.name else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")
    return result


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 BF16 (what precision=auto reads)."""
    from vmatdose.training.precision import cpu_flags

    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name + (" with avx512_bf16" if "avx512_bf16" in cpu_flags() else "")


def print_table(r: dict) -> None:
    print(f"\nOpenKBP {r['recipe']} on {r['source']} ({r['n_train']} train, "
          f"{r['n_val']} validation patients), {r['machine']}")
    print(f"wall {r['wall_s'] / 60:.1f} min (train {r['train_s'] / 60:.1f}, eval "
          f"{r['eval_s'] / 60:.1f}), {r['epochs']} epochs, {r['steps']} steps, "
          f"{r['steps_per_s']:.2f} steps/s, peak RSS {r.get('peak_rss_gb', float('nan')):.1f} GB; "
          f"prior: {r['prior_dose']}")
    precision = (r.get("precision") or {}).get("chosen", "?")
    print(f"{r.get('cpu', 'unknown CPU')}, precision {precision}")
    print(f"gamma 3 %/3 mm pass rate: body {r['gamma_pass_body_pct']:.1f} %, targets "
          f"{r['gamma_pass_targets_pct']:.1f} %, 10-50 % dose {r['gamma_pass_10_50pct_dose_pct']:.1f} %")
    print(f"{'':28s}{'dose score (Gy)':>16s}{'DVH score (Gy)':>16s}")
    if r.get("val_in_sample"):
        print("the validation patients were trained on (data.split.train_on="
              f"{r['train_on']}): their scores below are in-sample, not held out")
    label = "validation (in-sample)" if r.get("val_in_sample") else "validation, this recipe"
    print(f"{label:28s}{r['val_dose_score_gy']:16.3f}"
          f"{r['val_dvh_score_gy']:16.3f}")
    print(f"{'  re-read from pt_N.csv':28s}{r['submission_reread_dose_score_gy']:16.3f}"
          f"{r['submission_reread_dvh_score_gy']:16.3f}")
    print("mean signed D95 error (Gy): " + ", ".join(
        f"{t} {v:+.2f}" for t, v in r["val_d95_error_gy"].items()))
    print(f"{'challenge winner (test)':28s}{r['winner_dose_score_gy']:16.3f}"
          f"{r['winner_dvh_score_gy']:16.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
