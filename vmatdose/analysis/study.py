"""Statistics of a multi-seed study: recipes x seeds, compared case by case.

A study is a set of finished runs (``run_record.json`` + ``eval/per_case.csv``), e.g. the
sweep of ``python -m vmatdose.train -m seed=42,123,456 experiment=baseline,combined_uncertainty``.
A run's *recipe* is its command-line overrides other than ``seed`` (and those that are no
experimental choice: ``paths.*``, ``hydra.*``, ...) that are not the same in every run (``experiment=baseline``); its seeds are
repeats. Every run must have been
tested on the same cases (a study whose runs used different test cases is refused: the
comparison is paired by case).

Per metric and recipe (:func:`study_statistics`):

* ``seed_mean``, ``seed_std``: mean and standard deviation (ddof 1) over seeds of the
  run's mean over its test cases;
* the per-case values averaged over seeds (``study_per_case.csv``) and their mean with a
  bootstrap 95 % CI that resamples cases (``scipy.stats.bootstrap``, percentile, fixed
  random state);
* against the baseline recipe, paired by case: the mean difference, the two-sided
  Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``), that p-value corrected by
  Holm-Bonferroni across the compared recipes (per metric), and the paired Cohen's d
  (mean difference / standard deviation of the differences, ``d_z``).

Per recipe, from each run's ``eval/summary.json`` and ``throughput.json``
(:func:`run_level_table`): the challenge-level OpenKBP scores (mean and std over seeds)
and the optimizer steps each run got, which is what an equal wall-clock budget differs in.
Runs without an evaluation (stopped or failed mid-sweep) are listed and left out.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from vmatdose.errors import InputError
from vmatdose.metrics.registry import heading, is_experimental, study_metrics
from vmatdose.plot_style import OKABE_ITO, plt, save_figure

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass
class StudyRun:
    """One finished run: where it is, its recipe label, its seed and per-case table."""

    path: Path
    overrides: list[str]
    seed: int | None
    per_case: pd.DataFrame
    recipe: str = ""
    #: the protocol's targets, highest dose first (from the run's recorded config)
    targets: list[str] = field(default_factory=list)
    #: ``eval/summary.json``'s challenge-level OpenKBP scores (empty without them)
    openkbp: dict = field(default_factory=dict)
    #: ``throughput.json``: steps, epochs, train_s, steps_per_s (empty without it)
    throughput: dict = field(default_factory=dict)


def load_study_run(path: Path) -> StudyRun:
    """Read ``run_record.json`` and ``eval/per_case.csv`` of one run."""
    record_path, table_path = path / "run_record.json", path / "eval" / "per_case.csv"
    if not table_path.is_file():
        raise InputError(f"{path}: no eval/per_case.csv (the run was not evaluated); a "
                         "study needs every run's per-case metrics")
    record = json.loads(record_path.read_text())
    config = record.get("config") or {}
    targets = (config.get("protocol") or {}).get("targets") or \
        (config.get("data") or {}).get("targets") or []
    return StudyRun(path, [str(o) for o in record.get("overrides", [])], record.get("seed"),
                    pd.read_csv(table_path), targets=[str(t) for t in targets],
                    openkbp=_json(path / "eval" / "summary.json").get("openkbp") or {},
                    throughput=read_throughput(path))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


#: The last line of training (:class:`vmatdose.training.throughput.ThroughputCallback`).
THROUGHPUT_LINE = re.compile(r"trained (\d+) steps in (\d+) epochs, ([\d.]+) min: ([\d.]+) steps/s")


def read_throughput(run: Path) -> dict:
    """``throughput.json`` of a run, or for runs that predate it the throughput line of
    its ``train.log``; empty when neither is there."""
    record = _json(run / "throughput.json")
    log_file = run / "train.log"
    if record or not log_file.is_file():
        return record
    found = THROUGHPUT_LINE.findall(log_file.read_text(errors="replace"))
    if not found:
        return {}
    steps, epochs, minutes, rate = found[-1]
    return {"steps": int(steps), "epochs": int(epochs), "train_s": float(minutes) * 60,
            "steps_per_s": float(rate)}


def load_study_runs(run_dirs: Sequence[str | Path]) -> tuple[list[StudyRun], list[Path]]:
    """(the evaluated runs, the run folders without ``eval/per_case.csv``: stopped or
    failed mid-sweep, left out of the study)."""
    runs, unevaluated = [], []
    for folder in map(Path, run_dirs):
        if (folder / "eval" / "per_case.csv").is_file():
            runs.append(load_study_run(folder))
        else:
            unevaluated.append(folder)
    return runs, unevaluated


def run_level_table(runs: Sequence[StudyRun]) -> pd.DataFrame:
    """Per recipe: seeds, the OpenKBP dose and DVH scores (mean, std over seeds) and the
    steps trained (mean, min, max) and steps per second."""
    rows = []
    for recipe in dict.fromkeys(r.recipe for r in runs):
        group = [r for r in runs if r.recipe == recipe]
        row: dict = {"recipe": recipe, "n_seeds": len(group)}
        for key in ("dose_score_gy", "dvh_score_gy"):
            values = np.array([r.openkbp.get(key, np.nan) for r in group], float)
            row[f"openkbp_{key}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() \
                else float("nan")
            row[f"openkbp_{key}_std"] = float(np.nanstd(values, ddof=1)) \
                if np.isfinite(values).sum() > 1 else float("nan")
        steps = np.array([r.throughput.get("steps", np.nan) for r in group], float)
        rates = np.array([r.throughput.get("steps_per_s", np.nan) for r in group], float)
        finite = np.isfinite(steps)
        row.update(steps_mean=float(steps[finite].mean()) if finite.any() else float("nan"),
                   steps_min=float(steps[finite].min()) if finite.any() else float("nan"),
                   steps_max=float(steps[finite].max()) if finite.any() else float("nan"),
                   steps_per_s=float(np.nanmean(rates)) if np.isfinite(rates).any()
                   else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def label_recipes(runs: Sequence[StudyRun]) -> None:
    """Set each run's ``recipe``: its non-seed overrides that not every run shares."""
    def non_seed(run: StudyRun) -> list[str]:
        # seeds are repeats; where a run's files went (paths.*, hydra.*) is no choice
        return [o for o in run.overrides if o.split("=", 1)[0].lstrip("+") != "seed"
                and is_experimental(o)]

    shared = set.intersection(*(set(non_seed(r)) for r in runs)) if runs else set()
    for run in runs:
        run.recipe = " ".join(o for o in non_seed(run) if o not in shared) or "(default)"


def check_same_test_cases(runs: Sequence[StudyRun]) -> list[str]:
    """The test case ids every run shares; refuses a study whose runs differ."""
    first = sorted(runs[0].per_case["case_id"].astype(str))
    for run in runs[1:]:
        ids = sorted(run.per_case["case_id"].astype(str))
        if ids != first:
            raise InputError(
                f"{run.path}: tested on {ids}, but {runs[0].path} on {first}; a study's runs "
                "must share the split (fix data.split.seed or give data.split.file)")
    return first


def per_case_matrix(runs: Sequence[StudyRun], recipe: str, metric: str,
                    cases: Sequence[str]) -> np.ndarray:
    """(cases, seeds) values of ``metric`` for the runs of ``recipe``."""
    columns = []
    for run in (r for r in runs if r.recipe == recipe):
        if metric not in run.per_case:
            raise InputError(f"{run.path}: eval/per_case.csv has no column {metric!r}")
        column = run.per_case.set_index(run.per_case["case_id"].astype(str))[metric]
        columns.append(column.reindex(list(cases)).to_numpy(dtype=float))
    return np.stack(columns, axis=1)


def holm_bonferroni(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN, not counted)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def bootstrap_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (cases resampled)."""
    values = values[~np.isnan(values)]
    if len(values) < 2 or np.all(values == values[0]):
        mean = float(values.mean()) if len(values) else float("nan")
        return mean, mean
    result = stats.bootstrap((values,), np.mean, confidence_level=confidence,
                             n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                             random_state=np.random.default_rng(BOOTSTRAP_SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_tests(values: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Mean difference, Wilcoxon signed-rank p (two-sided) and Cohen's d_z of paired
    per-case values (cases where either is NaN are dropped)."""
    keep = ~(np.isnan(values) | np.isnan(baseline))
    diff = values[keep] - baseline[keep]
    out = {"diff_vs_baseline": float(diff.mean()) if diff.size else float("nan"),
           "p_wilcoxon": float("nan"), "cohens_d": float("nan")}
    if diff.size and np.all(diff == 0):
        out.update(p_wilcoxon=1.0, cohens_d=0.0)
        return out
    if diff.size >= 2:
        out["p_wilcoxon"] = float(stats.wilcoxon(values[keep], baseline[keep]).pvalue)
        spread = diff.std(ddof=1)
        out["cohens_d"] = float(diff.mean() / spread) if spread > 0 else float("nan")
    return out


def study_statistics(runs: Sequence[StudyRun], baseline: str,
                     metrics: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(statistics table, per-case table averaged over seeds, test case ids)."""
    if not runs:
        raise InputError("no runs found (folders holding run_record.json)")
    label_recipes(runs)
    cases = check_same_test_cases(runs)
    recipes = list(dict.fromkeys(r.recipe for r in runs))
    base = baseline_recipe(recipes, baseline)
    recipes = [base] + [r for r in recipes if r != base]  # the baseline first
    rows, per_case = [], {"case_id": cases}
    for metric in metrics:
        base_values = per_case_matrix(runs, base, metric, cases).mean(axis=1)
        metric_rows = []
        for recipe in recipes:
            matrix = per_case_matrix(runs, recipe, metric, cases)
            averaged = np.nanmean(matrix, axis=1)
            per_case[f"{metric} [{recipe}]"] = averaged
            seed_means = np.nanmean(matrix, axis=0)
            low, high = bootstrap_ci(averaged)
            row = {"metric": metric, "recipe": recipe, "baseline": recipe == base,
                   "n_seeds": matrix.shape[1], "n_cases": len(cases),
                   "seed_mean": float(seed_means.mean()),
                   "seed_std": float(seed_means.std(ddof=1)) if len(seed_means) > 1
                   else float("nan"),
                   "mean": float(np.nanmean(averaged)), "ci_low": low, "ci_high": high}
            row.update(paired_tests(averaged, base_values) if recipe != base else
                       {"diff_vs_baseline": 0.0, "p_wilcoxon": float("nan"),
                        "cohens_d": float("nan")})
            metric_rows.append(row)
        adjusted = holm_bonferroni([r["p_wilcoxon"] for r in metric_rows])
        for row, p in zip(metric_rows, adjusted):
            row["p_holm"] = float(p)
        rows += metric_rows
    return pd.DataFrame(rows), pd.DataFrame(per_case), cases


def baseline_recipe(recipes: Sequence[str], baseline: str) -> str:
    """The recipe whose label holds every token of ``baseline`` (exactly one)."""
    tokens = baseline.split()
    matches = [r for r in recipes if all(t in r.split() for t in tokens)]
    if len(matches) != 1:
        raise InputError(f"--baseline {baseline!r} matches {len(matches)} of the study's "
                         f"recipes {list(recipes)}; name exactly one")
    return matches[0]


def available_metrics(runs: Sequence[StudyRun], metrics: Sequence[str] | None) -> list[str]:
    """``metrics``, or the registry's study metrics every run's table has (the D95 errors
    of the runs' shared protocol's first target; none when the runs do not share it)."""
    if metrics:
        return list(metrics)
    firsts = {r.targets[0] if r.targets else "" for r in runs}
    default = study_metrics(firsts.pop() if len(firsts) == 1 else None)
    present = [m for m in default if all(m in r.per_case for r in runs)]
    if not present:
        raise InputError(f"none of the default metrics {default} is in every run's "
                         "eval/per_case.csv; name them with metrics=")
    return present


def to_markdown(table: pd.DataFrame, cases: Sequence[str], n_runs: int,
                baseline: str) -> str:
    """The study table as GitHub markdown, with the shared split stated."""
    lines = [f"Study of {n_runs} runs; every run was tested on the same {len(cases)} cases "
             f"(shared split): {', '.join(cases)}.",
             f"Baseline: `{baseline}`. Mean over cases of the per-case values averaged over "
             "seeds, with bootstrap 95 % CI (cases resampled); seed mean +- std of the "
             "run means; paired Wilcoxon signed-rank p vs the baseline, Holm-corrected "
             "across recipes; paired Cohen's d (d_z).", "",
             "| metric | recipe | seeds | mean [95 % CI] | seed mean +- std | diff vs "
             "baseline | p (Wilcoxon) | p (Holm) | Cohen's d |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r.metric} | {r.recipe} | {r.n_seeds} | {r['mean']:.3f} "
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}] | {r.seed_mean:.3f} +- {r.seed_std:.3f} | "
            f"{_num(r.diff_vs_baseline)} | {_num(r.p_wilcoxon)} | {_num(r.p_holm)} | "
            f"{_num(r.cohens_d)} |")
    return "\n".join(lines) + "\n"


def run_level_markdown(table: pd.DataFrame) -> str:
    """The per-recipe OpenKBP scores and steps as GitHub markdown."""
    lines = ["Per recipe, challenge-level OpenKBP scores (each run's pooled score; mean +- "
             "std over seeds) and the optimizer steps each run trained:", "",
             "| recipe | seeds | dose score Gy | DVH score Gy | steps (min-max) | steps/s |",
             "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r.recipe} | {r.n_seeds} | {_num(r.openkbp_dose_score_gy_mean)} +- "
            f"{_num(r.openkbp_dose_score_gy_std)} | {_num(r.openkbp_dvh_score_gy_mean)} +- "
            f"{_num(r.openkbp_dvh_score_gy_std)} | {_num(r.steps_mean)} "
            f"({_num(r.steps_min)}-{_num(r.steps_max)}) | {_num(r.steps_per_s)} |")
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return "" if value != value else f"{value:.3g}"


def study_figure(table: pd.DataFrame, per_case: pd.DataFrame) -> plt.Figure:
    """Per metric: each recipe's per-case values (dots) and mean with its 95 % CI."""
    metrics = list(dict.fromkeys(table["metric"]))
    n_recipes = table["recipe"].nunique()
    ncols = min(len(metrics), 3)
    nrows = -(-len(metrics) // ncols)
    width = max(3.2, 0.45 * n_recipes + 1.0)  # room for every recipe's column of dots
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.8 * nrows),
                             constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        rows = table[table["metric"] == metric].reset_index(drop=True)
        for i, r in rows.iterrows():
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            values = per_case[f"{metric} [{r.recipe}]"].to_numpy()
            ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)),
                       values, s=10, color=colour, alpha=0.5)
            ax.errorbar(i, r["mean"], yerr=[[r["mean"] - r.ci_low], [r.ci_high - r["mean"]]],
                        fmt="o", color="black", capsize=4)
        ax.set_xticks(range(len(rows)), [r.replace(" ", "\n") for r in rows["recipe"]],
                      fontsize=6, rotation=60 if n_recipes > 5 else 0,
                      ha="right" if n_recipes > 5 else "center")
        ax.set_title(heading(metric), fontsize=8, wrap=True)
        ax.grid(axis="y", alpha=0.3)
    return fig


def write_study_statistics(run_dirs: Sequence[str | Path], baseline: str = "experiment=baseline",
                           metrics: Sequence[str] | None = None,
                           output_dir: str | Path = "comparison") -> list[Path]:
    """Compute the study statistics of ``run_dirs`` and write ``study_stats.csv``,
    ``study_per_case.csv``, ``study_stats.md`` and ``study_stats.png/.pdf`` into
    ``output_dir``; return the paths."""
    runs, unevaluated = load_study_runs(run_dirs)
    for folder in unevaluated:
        log.warning("left out of the study: %s: no eval/per_case.csv (not evaluated: "
                    "stopped or failed)", folder)
    if len(runs) < 2:
        raise InputError(f"a study needs at least two evaluated runs; found {len(runs)} "
                         f"among {len(runs) + len(unevaluated)} run folders")
    table, per_case, cases = study_statistics(runs, baseline, available_metrics(runs, metrics))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "study_stats.csv", index=False)
    per_case.to_csv(out / "study_per_case.csv", index=False)
    order = list(dict.fromkeys(table["recipe"]))  # as the statistics: the baseline first
    levels = run_level_table(runs).set_index("recipe").loc[order].reset_index()
    levels.to_csv(out / "study_runs.csv", index=False)
    base = baseline_recipe(list(dict.fromkeys(r.recipe for r in runs)), baseline)
    (out / "study_stats.md").write_text(to_markdown(table, cases, len(runs), base) + "\n"
                                        + run_level_markdown(levels))
    figure = save_figure(study_figure(table, per_case), out / "study_stats", dpi=150)
    return [out / "study_stats.csv", out / "study_per_case.csv", out / "study_runs.csv",
            out / "study_stats.md", *figure]
