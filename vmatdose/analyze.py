"""Research analyses of finished runs.

    python -m vmatdose.analyze anatomy <eval dir or study dir> [--output DIR] [--cases-dir DIR]

``anatomy``: per-case anatomy features (structure volumes, PTV z-extent, PTV-OAR minimum
distances and overlap volumes) and their Spearman correlation with the per-case errors,
as CSV, markdown and a heat map (see :mod:`vmatdose.analysis.anatomy`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vmatdose.analysis.anatomy import write_anatomy_analysis
from vmatdose.plot_style import use_file_backend


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Analyses of finished vmatdose runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    anatomy = commands.add_parser("anatomy", help="anatomy features vs per-case errors")
    anatomy.add_argument("location", type=Path, help="an eval folder, a run or a study")
    anatomy.add_argument("--output", type=Path, default=None,
                         help="output folder (default: <location>/anatomy)")
    anatomy.add_argument("--cases-dir", type=Path, default=None,
                         help="case files (default: the runs' data.cases_dir)")
    anatomy.add_argument("--errors", nargs="+", default=None, help="per-case error columns")
    args = parser.parse_args(argv)
    use_file_backend()
    for path in write_anatomy_analysis(args.location, args.output, args.cases_dir,
                                       args.errors):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
