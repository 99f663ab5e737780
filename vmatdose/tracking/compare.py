"""Compare finished runs: one table of what differs between them and how they scored.

A run is any folder holding ``run_record.json`` (written by ``vmatdose.train``); folders
are searched recursively. A run without ``eval/summary.json`` (it crashed, or was
stopped before its evaluation) is listed apart, not ranked. Outputs
(``comparison.csv``, ``comparison.md``, a plot of the sort metric against each swept
choice, per-case box plots of the sort metric) go into ``--output``, by default
``<compared folder>/comparison``; never into the current directory.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from vmatdose.metrics import registry
from vmatdose.plot_style import FONT, OKABE_ITO, plt, save_figure

DEFAULT_METRIC = "test/mae_body_gy"
_NOT_CHOICES = ("run", "label", "overrides", "test/", "val/")


def find_runs(locations: Iterable[str], exclude: Sequence[str] = ()) -> list[Path]:
    """Run folders (holding ``run_record.json``) at or below each location or glob, except
    those whose path matches an ``exclude`` pattern (fnmatch, e.g. ``*/debug/*``)."""
    runs: list[Path] = []
    for location in locations:
        matches = glob.glob(location) or [location]
        for match in map(Path, matches):
            if not match.exists():
                raise FileNotFoundError(f"{match}: no such run folder")
            records = [match / "run_record.json"] if (match / "run_record.json").is_file() \
                else sorted(match.glob("**/run_record.json"))
            runs += [r.parent for r in records]
    runs = [r for r in runs if not any(fnmatch.fnmatch(r.as_posix(), p) for p in exclude)]
    return list(dict.fromkeys(runs))


def default_output(locations: Sequence[str], runs: Sequence[Path]) -> Path:
    """``<folder>/comparison`` for the one folder holding every compared run; an error
    when that folder would be the current directory (give ``--output``)."""
    folders = [Path(p).resolve() for p in locations if Path(p).is_dir()]
    common = Path(folders[0]) if len(folders) == 1 else Path(
        os.path.commonpath([r.resolve() for r in runs]))
    if common == Path.cwd().resolve() or common == Path(common.anchor):
        raise ValueError("the compared runs share no folder below the current directory; "
                         "give --output <folder>")
    return common / "comparison"


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
    final metrics of one run; ``finished`` says whether it has an evaluation summary."""
    record = json.loads((run / "run_record.json").read_text())
    overrides = list(record.get("overrides", []))
    row: dict[str, object] = {"run": str(run)}
    row.update({f"choice.{k}": v for k, v in config_choices(run, overrides).items()})
    row.update({f"config.{k}": v for k, v in flatten(record.get("config", {})).items()})
    row["overrides"] = " ".join(overrides)
    summary_path = run / "eval" / "summary.json"
    row["finished"] = summary_path.is_file()
    if row["finished"]:
        summary = json.loads(summary_path.read_text())
        for name in registry.HEADLINE:
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
        if not registry.is_experimental(key) or not _differs(table[column]):
            continue
        if key not in overridden and keys is not None and _implied(table[column], keys):
            continue
        columns.append(column)
    return columns


def _implied(values: pd.Series, keys: pd.DataFrame) -> bool:
    """True when runs sharing every choice also share this value."""
    return bool((values.astype(str).groupby([keys[c] for c in keys.columns]).nunique() <= 1)
                .all())


def run_labels(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """``loss=grad, model=unet32`` per run from its differing values (the run folder's
    name when nothing differs)."""
    labels = []
    for _, row in table.iterrows():
        parts = [f"{c}={_cell(row[c])}" for c in columns if _cell(row[c])]
        labels.append(", ".join(parts) or Path(str(row["run"])).name)
    return labels


def comparison_tables(runs: Sequence[Path], metric: str = DEFAULT_METRIC,
                      descending: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(finished, unfinished): one row per run with a ``label``, the differing config
    values and the metrics; finished runs sorted by ``metric`` (direction from the
    metric registry unless ``descending`` is given), unfinished ones (no evaluation
    summary: crashed or stopped) apart."""
    if not runs:
        raise ValueError("no runs found (folders holding run_record.json)")
    full = pd.DataFrame([run_row(r) for r in runs])
    metrics = [c for c in full.columns if c.startswith(("test/", "val/"))]
    if metric not in full:
        raise ValueError(f"metric {metric!r} not in the runs; available: {metrics}")
    if descending is None:
        descending = registry.higher_is_better(metric)
    columns = differing_columns(full)
    renamed = [c.split(".", 1)[1] for c in columns]
    table = full[["run", *columns, *metrics]].rename(columns=dict(zip(columns, renamed)))
    table.insert(1, "label", run_labels(table, renamed))
    finished = full["finished"].astype(bool).to_numpy()
    done = table[finished].sort_values(metric, ascending=not descending, na_position="last")
    failed = table[~finished][["run", "label", *renamed]]
    return done.reset_index(drop=True), failed.reset_index(drop=True)


def comparison_table(runs: Sequence[Path], metric: str = DEFAULT_METRIC,
                     descending: bool | None = None) -> pd.DataFrame:
    """The finished runs of :func:`comparison_tables`."""
    return comparison_tables(runs, metric, descending)[0]


def to_markdown(table: pd.DataFrame, root: Path | None = None) -> str:
    """A GitHub markdown table (floats to 3 decimals, run paths relative to ``root``,
    metric columns headed by their readable names)."""
    shown = table.copy()
    if root is not None:
        shown["run"] = [_relative(Path(r), root) for r in shown["run"]]
    headers = [registry.heading(c) if c.startswith(("test/", "val/")) else c
               for c in shown.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(shown.columns)]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return ""
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


def _swept(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if not c.startswith(_NOT_CHOICES)]


def per_case_values(run: Path, metric: str) -> list[float] | None:
    """The per-case values of a ``test/<name>`` metric (``eval/per_case.csv``)."""
    column = metric.split("/", 1)[1] if metric.startswith("test/") else None
    path = Path(run) / "eval" / "per_case.csv"
    if column is None or not path.is_file():
        return None
    frame = pd.read_csv(path)
    return frame[column].dropna().tolist() if column in frame else None


def sweep_figure(table: pd.DataFrame, metric: str) -> plt.Figure | None:
    """``metric`` against each swept value: a scatter for a numeric one, boxes grouped by
    option for a categorical one (``loss=l1,mse``: per-case values of every run with
    that option)."""
    swept = _swept(table)
    if not swept:
        return None
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(1, len(swept), figsize=(4.5 * len(swept), 3.8),
                                 constrained_layout=True, squeeze=False)
        for ax, column in zip(axes[0], swept):
            numeric = pd.to_numeric(table[column], errors="coerce")
            if numeric.notna().all():
                ax.scatter(numeric, table[metric], color=OKABE_ITO[0])
            else:
                _grouped_boxes(ax, table, column, metric)
            ax.set(xlabel=column, ylabel=registry.heading(metric))
            ax.grid(alpha=0.3)
    return fig


def _grouped_boxes(ax: plt.Axes, table: pd.DataFrame, column: str, metric: str) -> None:
    options = list(dict.fromkeys(table[column].astype(str)))
    data = []
    for option in options:
        rows = table[table[column].astype(str) == option]
        values = [v for run in rows["run"] for v in (per_case_values(run, metric) or [])]
        data.append(values or rows[metric].dropna().tolist())
    box = ax.boxplot(data, tick_labels=options, patch_artist=True)
    for patch, colour in zip(box["boxes"], OKABE_ITO * 4):
        patch.set_facecolor(colour)
        patch.set_alpha(0.6)
    ax.tick_params(axis="x", rotation=20)


def per_case_figure(table: pd.DataFrame, metric: str) -> plt.Figure | None:
    """Box plots of ``metric``'s per-case values (``eval/per_case.csv``), one per run,
    labelled by the run's differing choices."""
    data, labels = [], []
    for run, label in zip(table["run"], table["label"]):
        values = per_case_values(run, metric)
        if values:
            data.append(values)
            labels.append(label)
    if not data:
        return None
    with plt.rc_context(FONT):
        # one row per run, labels beside it: readable for a sweep of many runs
        fig, ax = plt.subplots(figsize=(8.0, max(3.0, 0.32 * len(data) + 1.3)),
                               constrained_layout=True)
        ax.boxplot(data[::-1], tick_labels=labels[::-1], orientation="horizontal")
        ax.set(xlabel=registry.heading(metric),
               title=f"per-case {registry.label(metric)} (table order, top first)")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    return fig


def write_comparison(table: pd.DataFrame, failed: pd.DataFrame, output_dir: Path,
                     metric: str) -> list[Path]:
    """``comparison.csv`` (finished runs), ``comparison.md`` (both tables) and the
    figures into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_dir / "comparison.csv", index=False)
    (output_dir / "comparison.md").write_text(markdown_report(table, failed, output_dir))
    written = [output_dir / "comparison.csv", output_dir / "comparison.md"]
    for name, fig in (("sweep", sweep_figure(table, metric)),
                      ("per_case", per_case_figure(table, metric))):
        if fig is not None:
            written += save_figure(fig, output_dir / f"comparison_{name}", dpi=150)
    return written


def markdown_report(table: pd.DataFrame, failed: pd.DataFrame, root: Path) -> str:
    """The ranked table, then the unfinished runs (if any)."""
    text = to_markdown(table, root) + "\n"
    if len(failed):
        text += ("\nUnfinished runs (no `eval/summary.json`: crashed or stopped before "
                 f"their evaluation):\n\n{to_markdown(failed, root)}\n")
    return text


def write_index(table: pd.DataFrame, failed: pd.DataFrame, index: Path, metric: str,
                command: str) -> Path:
    """The index of the runs on disk (``experiments/runs_index.md``), regenerated."""
    index.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Runs on disk\n\n"
        f"Generated by `make experiments` (`{command}`); do not edit by hand. The "
        "committed history of experiments is [README.md](README.md).\n"
        f"Runs sorted by {registry.label(metric)}; only config values that differ between "
        "runs are shown. Test metrics are means over the test split of the run's "
        "evaluation.\n\n" + markdown_report(table, failed, index.parent.parent))
    index.write_text(text)
    return index
