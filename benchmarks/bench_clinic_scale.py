"""How a clinic's DICOM scales: N synthetic clinical-grid patients, preprocess, train, predict.

    python benchmarks/bench_clinic_scale.py --patients N [--workers 2] [--steps 20]
        [--work-dir DIR]   # resumable: rerun the same command to go on where it stopped
    python benchmarks/bench_clinic_scale.py --patients N --estimate   # duration only

Writes N head-and-neck patients with the project's own DICOM builders
(tests/data/dicom_builders.py), each its own patient: its own anatomy size (the phantom's
head and neck scaled by 1.15-1.35), CT pixel size (0.98-1.17 mm), slice spacing (2.0 /
2.5 / 3.0 mm, cycled), table position (ImagePositionPatient shifted by up to +-20 mm
across and +-10 mm along the patient), name, ID and UIDs; a 512 x 512 CT over 240 mm,
RTSTRUCT, a 2.5 mm RTDOSE over the body, an RTPLAN of two VMAT arcs with a control point
every 2 degrees. They are written in chunks of ``--chunk`` patients: each chunk is
written, preprocessed (``python -m vmatdose.preprocess source=dicom protocol=head_neck``,
the training grid chosen from the first chunk's fingerprint and kept for the rest) and
its DICOM deleted, except the first ``--predict-patients`` patients, kept to predict. So
N = 200 never holds more than one chunk of DICOM on disk and one patient in memory. Then

* trains ``data=clinic`` for ``--steps`` steps (``python -m vmatdose.train data=clinic
  data.cases_dir=<cases> protocol=head_neck``, one epoch, one validation case), and
* predicts the kept patients from their DICOM (``python -m vmatdose.predict
  dicom_dir=<patients>``: on-the-fly ingest at the training spacing, RTDOSE on each
  patient's own dose grid).

Each command runs as its own process under GNU time: wall seconds and peak RSS of its
largest process; a sampler adds the peak of the whole process tree's memory (the sum of
each process's PSS, so pages shared between processes count once). Each finished chunk
and stage is recorded in ``<work dir>/state.json`` (printed as it goes, with the time left
estimated from the chunks done): the same command resumes after an interruption. At the
start the whole run's duration is estimated from the per-case costs of the largest
smaller N in ``benchmarks/results/`` (none: no estimate). Prints a table and writes
``benchmarks/results/bench_clinic_scale_n<N>.json`` with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from dicom_builders import HEAD_NECK_SCENE, GridSpec, head_neck_spec, write_patient  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SLICES_MM = (2.0, 2.5, 3.0)  # cycled over the patients: the clinic
PIXEL_MM = (0.98, 1.17)  # range of the CT pixel size
SCALE = (1.15, 1.35)  # range of the anatomy's size factor (1.25: about 180 x 150 mm across)
SHIFT_XY_MM, SHIFT_Z_MM = 20.0, 10.0  # table position: +- this across / along the patient
LENGTH_MM = 240.0
DOSE_MM = 2.5
SAMPLE_S = 0.5  # memory sampling period of a stage's process tree
BATCH = 2  # data=clinic's batch_size: an epoch of T training cases has ceil(T / 2) steps


def patient_spec(index: int):
    """Patient ``index`` (the same for the same index): a 512 x 512 CT of its own pixel
    size, slice spacing and table position, its own anatomy size, its 2.5 mm RTDOSE over
    the body + 10 mm, two arcs (181 -> 179 clockwise, back counter-clockwise, 2 degree
    control points) around its PTV70."""
    rng = np.random.default_rng(1000 + index)
    dz = SLICES_MM[index % len(SLICES_MM)]
    pixel = round(float(rng.uniform(*PIXEL_MM)), 2)
    scale = round(float(rng.uniform(*SCALE)), 3)
    shift_x, shift_y = (float(v) for v in rng.uniform(-SHIFT_XY_MM, SHIFT_XY_MM, 2))
    shift_z = float(rng.uniform(-SHIFT_Z_MM, SHIFT_Z_MM))
    clockwise = [float(a % 360) for a in np.arange(181, 181 + 358 + 1, 2)]
    arcs = ({"gantry_deg": clockwise, "rotation": "CW"},
            {"gantry_deg": clockwise[::-1], "rotation": "CC"})
    return clinic_patient_spec(dz, pixel, scale, (shift_x, shift_y, shift_z), arcs,
                               f"Bench^Patient{index:04d}", f"BENCH-{index:04d}")


def clinic_patient_spec(dz: float, pixel: float, scale: float,
                        shift_mm: tuple[float, float, float], beams: tuple[dict, ...],
                        name: str, patient_id: str):
    """A head-and-neck patient on a 512 x 512 CT of ``pixel`` mm with ``dz`` mm slices over
    240 mm, the anatomy scaled by ``scale``, the table moved by ``shift_mm`` (x, y, z), a
    2.5 mm RTDOSE over the body + 10 mm, and ``beams`` (RTPLAN beam dicts without the
    isocentre: it is put at the PTV70's centre)."""
    shift_x, shift_y, shift_z = shift_mm
    slices = int(round(LENGTH_MM / dz))
    half = 256 * pixel
    ct = GridSpec((slices, 512, 512), (dz, pixel, pixel),
                  (round(-LENGTH_MM / 2 + shift_z, 2), round(-half + pixel / 2 + shift_y, 2),
                   round(-half + pixel / 2 + shift_x, 2)))
    cx, cy = ct.centre_xy()
    (bx, by, ax, ay), = HEAD_NECK_SCENE["Body"][1]
    half_x, half_y = ax * scale + 10.0, ay * scale + 10.0
    z0 = ct.origin[0] - 1.0
    dose = GridSpec((int(np.ceil((slices - 1) * dz / DOSE_MM)) + 2,
                     int(2 * half_y / DOSE_MM) + 1, int(2 * half_x / DOSE_MM) + 1),
                    (DOSE_MM,) * 3, (z0, cy + by * scale - half_y, cx + bx * scale - half_x))
    (px, py, _, _), = HEAD_NECK_SCENE["PTV70"][1]
    isocentre = (cx + px * scale, cy + py * scale, ct.origin[0] + (slices - 1) * dz / 2)
    beams = tuple({**beam, "isocentre_xyz": isocentre} for beam in beams)
    return head_neck_spec(ct=ct, dose_grid=dose, scale=scale, vertices=160, beams=beams,
                          beam_weights=(1.0,), patient_name=name, patient_id=patient_id)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pss_gb(root: int) -> float:
    """Memory of ``root`` and its descendants: the sum of their PSS (GB)."""
    tree, stack, total_kb = _children(), [root], 0
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total_kb / 1e6


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``command`` under GNU time: ``{"seconds", "cpu_seconds", "peak_rss_gb"}`` (wall,
    user + system of the whole tree, its largest process) and ``peak_tree_gb`` (its whole
    process tree, sampled every 0.5 s)."""
    stats = log.with_suffix(".time")
    peak = [0.0]
    with open(log, "w") as out:
        process = subprocess.Popen(["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(stats),
                                    *command], cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], tree_pss_gb(process.pid))
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = process.wait()
        sampler.join()
    if returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({returncode}), log "
                           f"{log}:\n{tail}")
    seconds, kb, user, system = stats.read_text().split()[-4:]
    return {"seconds": float(seconds), "cpu_seconds": round(float(user) + float(system), 1),
            "peak_rss_gb": round(int(kb) / 1e6, 3),
            "peak_tree_gb": round(peak[0], 3)}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


class State:
    """``<work dir>/state.json``: what is done (chunks, training, prediction) and the wall
    time spent up to the last thing done (over every session), so that the same command
    resumes."""

    def __init__(self, work: Path, patients: int) -> None:
        self.path = work / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {
            "patients": patients, "chunks": {}, "wall_seconds": 0.0,
            "load_average_at_start": list(os.getloadavg())}
        self.mark = time.perf_counter()
        if self.data["patients"] != patients:
            raise SystemExit(f"error: {work} holds a run of --patients "
                             f"{self.data['patients']}, not {patients}: give another --work-dir")

    def save(self) -> None:
        now = time.perf_counter()
        self.data["wall_seconds"] += now - self.mark
        self.mark = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def preprocess_chunks(args, work: Path, env: dict, state: State) -> dict:
    """Write, preprocess and (but for the kept ones) delete the patients chunk by chunk."""
    cases, keep = work / "cases", work / "keep"
    keep.mkdir(exist_ok=True)
    starts = list(range(0, args.patients, args.chunk))
    for number, start in enumerate(starts, start=1):
        key = str(start)
        if key in state.data["chunks"]:
            continue
        chunk = work / "dicom" / f"chunk_{start // args.chunk}"
        # an interrupted chunk starts again: its DICOM (new UIDs, so new case ids) and the
        # case files it left go
        shutil.rmtree(chunk, ignore_errors=True)
        known = {c for done in state.data["chunks"].values() for c in done["case_ids"]}
        for path in cases.glob("*.npz"):
            if path.stem not in known:
                path.unlink()
        began, began_cpu = time.perf_counter(), time.process_time()
        indices = range(start, min(args.patients, start + args.chunk))
        dicom_mb = []
        for i in indices:
            write_patient(chunk / f"patient_{i:04d}", patient_spec(i))
            dicom_mb.append(folder_mb(chunk / f"patient_{i:04d}"))
        write_s, write_cpu = time.perf_counter() - began, time.process_time() - began_cpu
        command = [sys.executable, "-m", "vmatdose.preprocess", "source=dicom",
                   "protocol=head_neck", f"input_dir={chunk}", f"output_dir={cases}",
                   f"num_workers={args.workers}", "progress=false",
                   f"hydra.run.dir={work / 'hydra' / chunk.name}"]
        run = timed(command, work, env, work / f"preprocess_{chunk.name}.log")
        for patient in sorted(chunk.iterdir()):
            if len(list(keep.iterdir())) < args.predict_patients:
                shutil.move(str(patient), keep / patient.name)
        shutil.rmtree(chunk)
        new = sorted(p.stem for p in cases.glob("*.npz") if p.stem not in known)
        state.data["chunks"][key] = {**run, "patients": len(indices), "case_ids": new,
                                     "write_seconds": round(write_s, 1),
                                     "write_cpu_seconds": round(write_cpu, 1),
                                     "dicom_mb": round(float(np.sum(dicom_mb)), 1)}
        state.save()
        done = state.data["chunks"].values()
        per_patient = sum(c["seconds"] + c["write_seconds"] for c in done) / sum(
            c["patients"] for c in done)
        left = per_patient * (args.patients - sum(c["patients"] for c in done))
        print(f"chunk {number}/{len(starts)}: patients {start}-{indices[-1]} written in "
              f"{write_s:.0f} s, preprocessed in {run['seconds']:.0f} s (peak RSS "
              f"{run['peak_rss_gb']} GB, tree {run['peak_tree_gb']} GB); preprocessing "
              f"left ~{_minutes(left)}; load {os.getloadavg()[0]:.1f}", flush=True)
    return preprocess_summary(cases, list(state.data["chunks"].values()))


def preprocess_summary(cases: Path, runs: list[dict]) -> dict:
    files = sorted(cases.glob("*.npz"))
    fingerprint = json.loads((cases / "dataset_fingerprint.json").read_text())
    seconds = sum(r["seconds"] for r in runs)
    patients = sum(r["patients"] for r in runs)
    cpu = sum(r["cpu_seconds"] for r in runs)
    return {"cases": len(files), "cpu_seconds_per_case": round(cpu / len(files), 2),
            "write_seconds": round(sum(r["write_seconds"] for r in runs), 1),
            "write_seconds_per_patient": round(sum(r["write_seconds"] for r in runs)
                                               / patients, 2),
            "write_cpu_seconds_per_patient": round(sum(r["write_cpu_seconds"] for r in runs)
                                                   / patients, 2),
            "dicom_mb_per_patient": round(sum(r["dicom_mb"] for r in runs) / patients, 1),
            "seconds": round(seconds, 1), "seconds_per_case": round(seconds / len(files), 2),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "peak_tree_gb": max(r["peak_tree_gb"] for r in runs),
            "case_mb": round(float(np.mean([p.stat().st_size for p in files])) / 1e6, 2),
            "target_spacing_mm": fingerprint["target_spacing_mm"],
            "case_shape_max": fingerprint["shape"]["max"],
            "case_voxels_mean": int(np.mean([np.prod(c["shape"])
                                             for c in fingerprint["per_case"].values()])),
            "chunks": [{k: v for k, v in r.items() if k != "case_ids"} for r in runs]}


def train(args, work: Path, env: dict) -> dict:
    run_dir = work / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "vmatdose.train", "data=clinic",
               f"data.cases_dir={work / 'cases'}", "protocol=head_neck", "trainer.max_epochs=1",
               f"++trainer.limit_train_batches={args.steps}", "++trainer.limit_val_batches=1",
               "evaluate_after_training=false", "logger=csv", f"hydra.run.dir={run_dir}"]
    run = timed(command, work, env, work / "train.log")
    throughput = json.loads((run_dir / "throughput.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    return {**run, "steps": throughput["steps"],
            "train_cases": len(split["train"]), "val_cases": len(split["val"]),
            "fit_loop_seconds": throughput["train_s"],
            "setup_seconds": round(run["seconds"] - throughput["train_s"], 1),
            "steps_per_s": round(throughput["steps"] / run["seconds"], 4),
            "fit_steps_per_s": round(float(throughput["steps_per_s"]), 4),
            "checkpoint": str(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1])}


def predict(args, work: Path, env: dict, ckpt: str) -> dict:
    kept = len(list((work / "keep").iterdir()))
    shutil.rmtree(work / "predictions", ignore_errors=True)
    command = [sys.executable, "-m", "vmatdose.predict", f"ckpt_path={ckpt}",
               f"dicom_dir={work / 'keep'}", f"output_dir={work / 'predictions'}",
               "accelerator=cpu", f"hydra.run.dir={work / 'hydra' / 'predict'}"]
    run = timed(command, work, env, work / "predict.log")
    rtdose_mb = np.mean([p.stat().st_size for p in (work / "predictions").glob("*.dcm")]) / 1e6
    return {**run, "patients": kept, "seconds_per_patient": round(run["seconds"] / kept, 1),
            "rtdose_mb": round(float(rtdose_mb), 2)}


def estimate(args) -> str | None:
    """The run's duration from the largest smaller N measured: its per-case costs (wall, at
    its load) and, for a quiet machine, its CPU seconds spread over the cores."""
    done = [json.loads(p.read_text()) for p in RESULTS.glob("bench_clinic_scale_n*.json")]
    done = [r for r in done if r["patients"] < args.patients and "cpu_seconds" in r["train"]]
    if not done:
        return None
    ref = max(done, key=lambda r: r["patients"])
    prep, fit, pred = ref["preprocess"], ref["train"], ref["predict"]
    n, cores = args.patients, min(2, os.cpu_count() or 1)
    steps = min(args.steps, -(-round(n * fit["train_cases"] / ref["patients"]) // BATCH))
    per_step = fit["fit_loop_seconds"] / fit["steps"]
    per_step_cpu = fit["cpu_seconds"] * fit["fit_loop_seconds"] / fit["seconds"] / fit["steps"]
    setup_cpu = fit["cpu_seconds"] - per_step_cpu * fit["steps"]
    wall = (n * (prep["write_seconds_per_patient"] + prep["seconds_per_case"])
            + fit["setup_seconds"] * n / ref["patients"] + per_step * steps
            + pred["seconds_per_patient"] * min(n, args.predict_patients))
    # quiet: writing is one process; the rest runs on all the cores at best, one at worst
    cpu = (n * prep["cpu_seconds_per_case"] + setup_cpu * n / ref["patients"]
           + per_step_cpu * steps
           + pred["cpu_seconds"] / pred["patients"] * min(n, args.predict_patients))
    write = n * prep["write_cpu_seconds_per_patient"]
    load = ref["machine"]["load_average_at_start"][0]
    return (f"estimated duration ~{_minutes(wall)} at the load of N = {ref['patients']} "
            f"(load average {load:.1f}); on a quiet machine ~{_minutes(write + cpu / cores)} "
            f"to {_minutes(write + cpu)} (its CPU seconds over {cores} cores .. one core); "
            f"{steps} training steps")


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                               1)}


def print_table(result: dict, path: Path) -> None:
    prep, fit, pred = result["preprocess"], result["train"], result["predict"]
    print(f"clinic scale, N = {result['patients']} head-and-neck patients (512 x 512 CT, "
          f"2.5 mm RTDOSE, two arcs); training grid {prep['target_spacing_mm']} mm, largest "
          f"case {prep['case_shape_max']}")
    print(f"{'stage':<44}{'value':>12}")
    rows = [("DICOM per patient (MB)", prep["dicom_mb_per_patient"]),
            ("writing DICOM s per patient (wall / CPU)",
             f"{prep['write_seconds_per_patient']} / {prep['write_cpu_seconds_per_patient']}"),
            ("preprocess s per case (wall / CPU)",
             f"{prep['seconds_per_case']} / {prep['cpu_seconds_per_case']}"),
            ("preprocess peak RSS / tree (GB)",
             f"{prep['peak_rss_gb']} / {prep['peak_tree_gb']}"),
            ("case file (MB)", prep["case_mb"]),
            (f"train setup s ({fit['train_cases']}+{fit['val_cases']} cases)",
             fit["setup_seconds"]),
            ("train CPU s (whole command)", fit["cpu_seconds"]),
            (f"train steps/s ({fit['steps']} steps, wall)", fit["steps_per_s"]),
            ("train steps/s (fit loop)", fit["fit_steps_per_s"]),
            ("train peak RSS / tree (GB)", f"{fit['peak_rss_gb']} / {fit['peak_tree_gb']}"),
            (f"predict s per patient ({pred['patients']})", pred["seconds_per_patient"]),
            ("predict CPU s per patient", round(pred["cpu_seconds"] / pred["patients"], 1)),
            ("predict peak RSS / tree (GB)",
             f"{pred['peak_rss_gb']} / {pred['peak_tree_gb']}"),
            ("RTDOSE file (MB)", pred["rtdose_mb"]),
            ("total wall (min)", round(result["wall_seconds"] / 60, 1))]
    for name, value in rows:
        print(f"{name:<44}{value:>12}")
    machine = result["machine"]
    print(f"load average {machine['load_average_at_start']} -> "
          f"{machine['load_average_at_end']} ({machine['cpu_count']} cores); results -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=4, help="N (default 4)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=10,
                        help="patients written as DICOM at a time")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--predict-patients", type=int, default=2)
    parser.add_argument("--work-dir", default=None,
                        help="where the run works and records its progress (default: "
                             "<tmp>/bench_clinic_scale_n<N>); the same command resumes there")
    parser.add_argument("--keep", action="store_true", help="keep the work dir at the end")
    parser.add_argument("--estimate", action="store_true",
                        help="only print the estimated duration")
    args = parser.parse_args()
    if args.patients < 3:
        parser.error("--patients: at least 3 (a training, a validation and a test case)")
    if args.estimate:
        print(estimate(args) or "no smaller N measured yet: no duration estimate")
        return
    work = Path(args.work_dir or Path(tempfile.gettempdir())
                / f"bench_clinic_scale_n{args.patients}")
    work.mkdir(parents=True, exist_ok=True)
    state = State(work, args.patients)
    resumed = bool(state.data["chunks"])
    print(f"clinic scale, N = {args.patients}: work dir {work}"
          f"{' (resuming)' if resumed else ''}; load average {os.getloadavg()}", flush=True)
    print(estimate(args) or "no smaller N measured yet: no duration estimate", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMATDOSE_ID_SALT": "bench-clinic",
           "VMATDOSE_ROOT": str(work)}
    prep = preprocess_chunks(args, work, env, state)
    if "train" not in state.data:
        state.data["train"] = train(args, work, env)
        state.save()
    fit = state.data["train"]
    print(f"trained {fit['steps']} steps in {fit['seconds']:.0f} s (setup "
          f"{fit['setup_seconds']:.0f} s), peak RSS {fit['peak_rss_gb']} GB", flush=True)
    if "predict" not in state.data:
        state.data["predict"] = predict(args, work, env, fit["checkpoint"])
        state.save()
    result = {"patients": args.patients, "workers": args.workers, "chunk": args.chunk,
              "ct": "512 x 512, 0.98-1.17 mm, 2.0/2.5/3.0 mm slices, 240 mm; anatomy x "
                    "1.15-1.35, table shifts, one per patient",
              "resumed": resumed, "wall_seconds": round(state.data["wall_seconds"], 1),
              "preprocess": prep, "train": {k: v for k, v in fit.items() if k != "checkpoint"},
              "predict": state.data["predict"],
              "machine": {**machine_info(),
                          "load_average_at_start": state.data["load_average_at_start"]}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_clinic_scale_n{args.patients}.json"
    path.write_text(json.dumps(result, indent=2))
    print_table(result, path)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
