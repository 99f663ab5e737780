"""Compare finished runs (library: :mod:`vmatdose.tracking.compare`).

    python -m vmatdose.compare outputs/train/runs/2026-*          # run folders or globs
    python -m vmatdose.compare multirun/train/2026-11-25_10-00-00 # a sweep
    python -m vmatdose.compare outputs multirun --output experiments/comparison \\
        --index experiments/runs_index.md --exclude '*/debug/*'   # `make experiments`
    python -m vmatdose.compare <sweep dir> --stats --baseline experiment=baseline
                                        # multi-seed study statistics (vmatdose.analysis.study)

Writes into ``<compared folder>/comparison`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from vmatdose.analysis.study import write_study_statistics
from vmatdose.errors import exit_on_input_error
from vmatdose.plot_style import use_file_backend
from vmatdose.tracking import compare


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vmatdose-compare``."""
    parser = argparse.ArgumentParser(description="Compare finished vmatdose runs.")
    parser.add_argument("locations", nargs="+", help="run folders, sweep folders or globs")
    parser.add_argument("--metric", default=compare.DEFAULT_METRIC,
                        help="sort by this metric; also the per-case plot's metric")
    parser.add_argument("--descending", action="store_true", default=None,
                        help="higher is better (default: from the metric registry)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for comparison.csv/.md and plots "
                             "(default: <compared folder>/comparison)")
    parser.add_argument("--index", type=Path, default=None,
                        help="also write this index of the runs (e.g. experiments/runs_index.md)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="skip runs whose path matches this pattern (e.g. '*/debug/*')")
    parser.add_argument("--stats", action="store_true",
                        help="also write multi-seed study statistics: CIs, Wilcoxon p "
                             "(Holm-corrected) and Cohen's d against --baseline")
    parser.add_argument("--baseline", default="experiment=baseline",
                        help="the baseline recipe of --stats (its overrides)")
    return parser


def run_compare(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Parse ``argv``, write the comparison (and index), print and return the table."""
    args = build_parser().parse_args(argv)
    runs = compare.find_runs(args.locations, args.exclude)
    table, failed = compare.comparison_tables(runs, args.metric, args.descending)
    output = args.output or compare.default_output(args.locations, runs)
    for path in compare.write_comparison(table, failed, output, args.metric):
        print(f"wrote {path}")
    if args.stats:
        for path in write_study_statistics(runs, args.baseline, output_dir=output):
            print(f"wrote {path}")
    if args.index:
        command = "python -m vmatdose.compare " + shlex.join(argv or sys.argv[1:])
        print(f"wrote {compare.write_index(table, failed, args.index, args.metric, command)}")
    print(compare.markdown_report(table, failed, Path.cwd()))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """``vmatdose-compare`` / ``python -m vmatdose.compare`` (returns nothing: a console
    script's return value becomes its exit status)."""
    use_file_backend()
    with exit_on_input_error():
        run_compare(argv)


if __name__ == "__main__":
    main()
