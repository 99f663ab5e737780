"""Compare finished runs: one table of what differs between them and how they scored.

    python -m vmatdose.compare outputs/train/runs/2026-*          # run folders or globs
    python -m vmatdose.compare multirun/train/2026-11-25_10-00-00 # a sweep
    python -m vmatdose.compare outputs multirun --output experiments \\
        --readme experiments/README.md                            # the experiment index
    python -m vmatdose.compare <sweep dir> --stats --baseline experiment=baseline
                                        # multi-seed study statistics (vmatdose.analysis.study)

A run is any folder holding ``run_record.json`` (written by ``vmatdose.train``); folders
are searched recursively. Writes ``comparison.csv``, ``comparison.md``, a plot of the
sort metric against each swept value and per-case box plots into ``--output``.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from vmatdose.analysis.study import write_study_statistics  # noqa: E402
from vmatdose.evaluation.figures import OKABE_ITO, save_figure  # noqa: E402

DEFAULT_METRIC = "test/mae_body_gy"
SUMMARY_METRICS = ("mae_body_gy", "baseline_mae_body_gy", "gamma_3pct_3mm_pass",
                   "gamma_2pct_2mm_pass", "openkbp_dose_score_gy")
# config keys that differ between any two runs without being an experimental choice
IGNORED_PREFIXES = ("paths.", "hydra.", "ckpt_path", "data.split_output", "logger.",
                    "callbacks.model_checkpoint.dirpath", "trainer.default_root_dir")
HIGHER_IS_BETTER = ("pass", "gamma")


def find_runs(locations: Iterable[str]) -> list[Path]:
    """Run folders (holding ``run_record.json``) at or below each location or glob."""
    runs: list[Path] = []
    for location in locations:
        matches = glob.glob(location) or [location]
        for match in map(Path, matches):
            if not match.exists():
                raise FileNotFoundError(f"{match}: no such run folder")
            records = [match / "run_record.json"] if (match / "run_record.json").is_file() \
                else sorted(match.glob("**/run_record.json"))
            runs += [r.parent for r in records]
    return list(dict.fromkeys(runs))


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config -> ``{"a.b.c": value}`` (lists kept as their string form)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value) if isinstance(value, list) else value
    return flat


def best_validation(run: Path, metric: str = "val/mae_gy") -> float | None:
    """The lowest ``metric`` in the run's CSV log (``csv/metrics.csv``), if any."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    history = pd.read_csv(path)
    return float(history[metric].min()) if metric in history else None


def config_choices(run: Path, overrides: Sequence[str]) -> dict[str, str]:
    """Config-group choices (``model: unet``...): Hydra's record of the run when there is
    one, else the ``group=option`` command-line overrides."""
    hydra_file = run / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        return {str(k): str(v) for k, v in choices.items()
                if not str(k).startswith("hydra/") and v is not None and str(k) != "paths"}
    pairs = (o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    return {k: v for k, v in pairs if "." not in k and "/" not in k}


def run_row(run: Path) -> dict[str, object]:
    """Config choices (``choice.`` prefix), config values (flattened, ``config.``) and
    final metrics of one run."""
    record = json.loads((run / "run_record.json").read_text())
    overrides = list(record.get("overrides", []))
    row: dict[str, object] = {"run": str(run)}
    row.update({f"choice.{k}": v for k, v in config_choices(run, overrides).items()})
    row.update({f"config.{k}": v for k, v in flatten(record.get("config", {})).items()})
    row["overrides"] = " ".join(overrides)
    summary_path = run / "eval" / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for name in SUMMARY_METRICS:
            if name in summary.get("metrics", {}):
                row[f"test/{name}"] = summary["metrics"][name]["mean"]
        for name, value in summary.get("openkbp", {}).items():
            row[f"test/openkbp_{name}"] = value
    row["val/mae_gy_best"] = best_validation(run)
    return row


def _differs(values: pd.Series) -> bool:
    return values.astype(str).nunique(dropna=False) > 1


def differing_columns(table: pd.DataFrame) -> list[str]:
    """Choice and config columns whose values are not the same in every run. A config
    value the differing group choices already imply (constant among runs with the same
    choices: ``model=ddpm`` brings its own ``model.*``, ``debug=short`` its data size) is
    left out, unless a run overrode it on the command line."""
    choices = [c for c in table.columns if c.startswith("choice.") and _differs(table[c])]
    overridden = {o.lstrip("+").split("=", 1)[0]
                  for text in table.get("overrides", pd.Series(dtype=str)).fillna("")
                  for o in str(text).split() if "=" in o}
    keys = table[choices].astype(str) if choices else None
    columns = list(choices)
    for column in table.columns:
        if not column.startswith("config."):
            continue
        key = column[len("config."):]
        if key.startswith(IGNORED_PREFIXES) or not _differs(table[column]):
            continue
        if key not in overridden and keys is not None and _implied(table[column], keys):
            continue
        columns.append(column)
    return columns


def _implied(values: pd.Series, keys: pd.DataFrame) -> bool:
    """True when runs sharing every choice also share this value."""
    return bool((values.astype(str).groupby([keys[c] for c in keys.columns]).nunique() <= 1)
                .all())


def comparison_table(runs: Sequence[Path], metric: str = DEFAULT_METRIC,
                     descending: bool | None = None) -> pd.DataFrame:
    """One row per run: the differing config values and the metrics, sorted by ``metric``."""
    if not runs:
        raise ValueError("no runs found (folders holding run_record.json)")
    full = pd.DataFrame([run_row(r) for r in runs])
    metrics = [c for c in full.columns if c.startswith(("test/", "val/"))]
    if metric not in full:
        raise ValueError(f"metric {metric!r} not in the runs; available: {metrics}")
    if descending is None:
        descending = any(word in metric for word in HIGHER_IS_BETTER)
    table = full[["run", *differing_columns(full), *metrics]]
    table = table.sort_values(metric, ascending=not descending, na_position="last")
    return table.rename(columns=lambda c: c.split(".", 1)[1]
                        if c.startswith(("config.", "choice.")) else c)


def to_markdown(table: pd.DataFrame, root: Path | None = None) -> str:
    """A GitHub markdown table (floats to 3 decimals, run paths relative to ``root``)."""
    shown = table.copy()
    if root is not None:
        shown["run"] = [_relative(Path(r), root) for r in shown["run"]]
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    lines = [header, rule]
    for _, row in shown.iterrows():
        cells = [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN: the run has no such value
            return ""
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.3g}" \
            if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def sweep_figure(table: pd.DataFrame, metric: str) -> plt.Figure | None:
    """``metric`` against each numeric config value that differs between runs."""
    swept = [c for c in table.columns if not c.startswith(("run", "test/", "val/", "overrides"))
             and pd.to_numeric(table[c], errors="coerce").notna().all()]
    if not swept:
        return None
    fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.5),
                             constrained_layout=True, squeeze=False)
    for ax, column in zip(axes[0], swept):
        ax.scatter(pd.to_numeric(table[column]), table[metric], color=OKABE_ITO[0])
        ax.set(xlabel=column, ylabel=metric)
        ax.grid(alpha=0.3)
    return fig


def per_case_figure(runs: Sequence[Path], column: str = "mae_body_gy") -> plt.Figure | None:
    """Box plots of a per-case metric (``eval/per_case.csv``) for each run."""
    data, labels = [], []
    for i, run in enumerate(runs):
        path = run / "eval" / "per_case.csv"
        if path.is_file() and column in (frame := pd.read_csv(path)):
            data.append(frame[column].dropna().to_numpy())
            labels.append(f"#{i + 1}")
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(data) + 2), 3.8), constrained_layout=True)
    ax.boxplot(data, tick_labels=labels)
    ax.set(xlabel="run (table order)", ylabel=column, title=f"per-case {column}")
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_comparison(table: pd.DataFrame, output_dir: Path, metric: str) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_dir / "comparison.csv", index=False)
    (output_dir / "comparison.md").write_text(to_markdown(table, Path.cwd()) + "\n")
    written = [output_dir / "comparison.csv", output_dir / "comparison.md"]
    runs = [Path(r) for r in table["run"]]
    for name, fig in (("sweep", sweep_figure(table, metric)),
                      ("per_case", per_case_figure(runs))):
        if fig is not None:
            written += save_figure(fig, output_dir / f"comparison_{name}", dpi=150)
    return written


def write_index(table: pd.DataFrame, readme: Path, metric: str, sources: Sequence[str]) -> Path:
    """The experiment index (``experiments/README.md``), regenerated from the runs."""
    readme.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Experiments\n\n"
        "Generated by `make experiments` (`python -m vmatdose.compare "
        f"{' '.join(sources)} --readme {readme.as_posix()}`); do not edit by hand.\n"
        f"Runs sorted by `{metric}`; only config values that differ between runs are "
        "shown. Metrics: `test/*` are means over the test split of the run's evaluation "
        "(Gy, gamma in %), `val/mae_gy_best` the best validation MAE.\n\n"
        f"{to_markdown(table, readme.parent.parent)}\n")
    notes = readme.parent / "NOTES.md"
    if notes.is_file():
        text += "\nHand-written notes and GPU records: [NOTES.md](NOTES.md).\n"
    readme.write_text(text)
    return readme


def main(argv: Sequence[str] | None = None) -> None:
    """``vmatdose-compare`` / ``python -m vmatdose.compare`` (returns nothing: a console
    script's return value becomes its exit status)."""
    run_compare(argv)


def run_compare(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Parse ``argv``, write the comparison (and index), print and return the table."""
    parser = argparse.ArgumentParser(description="Compare finished vmatdose runs.")
    parser.add_argument("locations", nargs="+", help="run folders, sweep folders or globs")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="sort by this metric")
    parser.add_argument("--descending", action="store_true", default=None,
                        help="higher is better (default: guessed from the metric name)")
    parser.add_argument("--output", type=Path, default=Path("comparison"),
                        help="folder for comparison.csv/.md and plots")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also write this experiment index (e.g. experiments/README.md)")
    parser.add_argument("--stats", action="store_true",
                        help="also write multi-seed study statistics: CIs, Wilcoxon p "
                             "(Holm-corrected) and Cohen's d against --baseline")
    parser.add_argument("--baseline", default="experiment=baseline",
                        help="the baseline recipe of --stats (its overrides)")
    args = parser.parse_args(argv)
    runs = find_runs(args.locations)
    table = comparison_table(runs, args.metric, args.descending)
    for path in write_comparison(table, args.output, args.metric):
        print(f"wrote {path}")
    if args.stats:
        for path in write_study_statistics(runs, args.baseline, output_dir=args.output):
            print(f"wrote {path}")
    if args.readme:
        print(f"wrote {write_index(table, args.readme, args.metric, args.locations)}")
    print(to_markdown(table, Path.cwd()))
    return table


if __name__ == "__main__":
    main()
