"""Ingest raw data into case files: DICOM-RT folders, OpenKBP patients, or phantoms.

    python -m vmatdose.preprocess source=dicom protocol=head_neck input_dir=<dir> output_dir=<dir>
    python -m vmatdose.preprocess source=openkbp input_dir=<openkbp root>
    python -m vmatdose.preprocess source=phantom source.n_cases=8

Parallel over spawned workers (which exit if this process dies), idempotent and resumable
(cases already on disk are kept, every file is written atomically), with a progress bar,
a summary JSON (``summary_path``) and a printed table. The ``source`` config names the
function that runs (:mod:`vmatdose.data.ingest.sources`). The exit status is 1 when any
case failed (the last line names the count and the summary file; ``allow_failures=true``
exits 0) and 2 for a bad configuration (one line saying what to fix).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from vmatdose.cli_hints import with_quoting_hint
from vmatdose.config import CONFIG_DIR
from vmatdose.data.ingest.batch import format_summary
from vmatdose.data.ingest.sources import failure_line, run_preprocess
from vmatdose.data.privacy import SaltError

log = logging.getLogger(__name__)


@with_quoting_hint
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="preprocess")
def main(cfg: DictConfig) -> None:
    log.info("source config:\n%s", OmegaConf.to_yaml(cfg.source))
    try:
        summary = run_preprocess(cfg)
    except (SaltError, FileNotFoundError, ValueError) as err:  # bad input: one line, exit 2
        log.error("preprocess: %s", err)
        sys.exit(2)
    log.info("\n%s", format_summary(summary))
    if cfg.get("summary_path"):
        log.info("summary: %s", cfg.summary_path)
    line = failure_line(summary, cfg.get("summary_path"))
    if line and not cfg.get("allow_failures", False):
        log.error(line)
        sys.exit(1)


if __name__ == "__main__":
    main()
