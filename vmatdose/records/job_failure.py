"""A sweep that goes on when one of its jobs fails, and says so at the end.

Hydra's basic launcher stops a whole multirun at the first job that raises: one bad
setting (a missing folder, a diverging loss) would cost every job after it. In a
multirun, :func:`run_sweep_job` records the failure in the job's folder
(``failed.json``: the error type and its one-line message; the traceback in the job's
log) and returns NaN, so the sweep goes on; :class:`SweepFailures` lists the failed jobs
when the multirun ends and exits with status 1. Outside a multirun nothing changes.

Every job of a multirun runs in one process, and Lightning's trainer, module and data
module hold each other in reference cycles, so a finished job's cached data set stays in
memory until Python's next full collection, which seldom comes: on the OpenKBP recipe a
sweep process grew from about 4 GB to 12-14 GB over six jobs, and two such
sweeps side by side were killed for memory. :func:`run_sweep_job`
collects after every job.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from vmatdose.errors import InputError

log = logging.getLogger(__name__)
FAILURE_FILE = "failed.json"


def run_sweep_job(task: Callable[[], float | None], output_dir: str | Path,
                  multirun: bool) -> float | None:
    """``task()``; in a multirun a failure is recorded in ``output_dir/failed.json``,
    said in one line on stderr, and the job returns NaN instead of stopping the sweep; the
    finished job's objects are collected before the next job starts."""
    if not multirun:
        return task()
    try:
        return task()
    except Exception as err:  # noqa: BLE001 - any failure of one job, recorded
        return _record_failure(err, Path(output_dir))
    finally:
        gc.collect()  # free the finished job's data before the next job caches its own


def _record_failure(err: Exception, folder: Path) -> float:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not isinstance(err, InputError):
        log.exception("job failed")  # the traceback, into the job's own log
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILURE_FILE).write_text(json.dumps(
        {"error": type(err).__name__, "message": message}) + "\n")
    print(f"error: {message} (sweep job {folder.name} failed; the sweep goes on)",
          file=sys.stderr, flush=True)
    return float("nan")


class SweepFailures(Callback):
    """Hydra callback: at the end of a multirun, one line listing its failed jobs
    (``failed.json``) and exit status 1; nothing when every job succeeded."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(sweep.glob(f"*/{FAILURE_FILE}"))
        if not failed:
            return
        jobs = [p for p in sweep.iterdir() if p.is_dir()]
        details = "; ".join(f"{p.parent}: {json.loads(p.read_text())['message']}"
                            for p in failed)
        raise SystemExit(f"error: {len(failed)} of {len(jobs)} sweep jobs failed: {details}")
