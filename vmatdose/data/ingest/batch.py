"""The batch engine: jobs -> case files, parallel, idempotent and resumable.

    summary = convert_cases([(case_id, source), ...], convert, "data/cases", num_workers=2)

``convert(source, case_id)`` returns a :class:`~vmatdose.data.case.Case` or raises
:class:`SkipCase` (the reason is recorded); any other exception fails that case only (the
error is recorded and the batch goes on). Workers write their case with the atomic
:func:`~vmatdose.data.case.save_case`, so a killed run leaves complete files or nothing, and
a restarted run skips the cases already on disk: every case is written exactly once.
``convert`` must be picklable (a module-level function or a ``functools.partial`` of one)
when ``num_workers > 1``: workers are *spawned*, never forked, and exit when the parent
process dies (even by ``kill -9``): see :func:`exit_with_parent`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from vmatdose.data.atomic import write_json_atomic
from vmatdose.data.case import Case, save_case

log = logging.getLogger(__name__)

Convert = Callable[[object, str], Case]
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CASE_KEYS = ("ct", "masks", "structures", "body", "spacing_mm", "origin_mm", "meta")
LOCK_NAME = ".convert.lock"


class SkipCase(Exception):
    """Raised by a converter for a case that is valid input but not wanted (the reason is
    recorded in the summary), e.g. a non-SIB plan."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def convert_cases(jobs: list[tuple[str, object]], convert: Convert,
                  output_dir: str | os.PathLike, num_workers: int = 2, progress: bool | str = True,
                  summary_path: str | os.PathLike | None = None,
                  record_sources: bool = True) -> dict:
    """Convert every ``(case_id, source)`` job into ``output_dir/<case_id>.npz``.

    Args:
        jobs: ``(case_id, source)`` pairs; ``source`` is passed to ``convert`` as is.
        convert: ``convert(source, case_id) -> Case`` or raise :class:`SkipCase`.
        output_dir: folder of the case files (created).
        num_workers: worker processes (spawned); ``<= 1`` runs in this process.
        progress: show a tqdm progress bar (a string: labelled with it).
        summary_path: also write the summary there as JSON (atomically).
        record_sources: put ``str(source)`` into skipped / failed entries (turn off when
            source paths may name patients).

    Returns:
        The summary: ``counts`` and the lists ``processed`` (case id, seconds),
        ``already_done`` (case ids whose file exists and loads), ``skipped`` (case id,
        reason), ``failed`` (case id, error, file) and ``warnings`` (case id, message).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = _empty_summary(output_dir, num_workers)
    with _exclusive(output_dir):
        pending = _pending_jobs(jobs, output_dir, summary, record_sources)
        results = (_run_serial(convert, pending) if num_workers <= 1 or len(pending) <= 1
                   else _run_parallel(convert, pending, num_workers))
        _collect(results, pending, summary, progress, record_sources)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["counts"] = {key: len(summary[key]) for key in
                         ("processed", "already_done", "skipped", "failed", "warnings")}
    summary["counts"]["jobs"] = len(jobs)
    if summary_path is not None:
        write_json_atomic(summary, summary_path)
    return summary


def _empty_summary(output_dir: Path, num_workers: int) -> dict:
    return {"output_dir": str(output_dir), "num_workers": int(num_workers),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "processed": [], "already_done": [], "skipped": [], "failed": [], "warnings": []}


def _pending_jobs(jobs: list[tuple[str, object]], output_dir: Path, summary: dict,
                  record_sources: bool) -> list[tuple[str, object, Path]]:
    """Jobs still to run; done, duplicate and badly named ones go straight to the summary."""
    pending, seen = [], set()
    for case_id, source in jobs:
        problem = None
        if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
            problem = f"invalid case id {case_id!r} (letters, digits, '.', '_', '-' only)"
        elif case_id in seen:
            problem = "duplicate case id: another job of this batch has the same id"
        if problem:
            summary["failed"].append(_entry(str(case_id), source, record_sources,
                                            error=problem, file=None))
            continue
        seen.add(case_id)
        path = output_dir / f"{case_id}.npz"
        if is_complete_case_file(path):
            summary["already_done"].append(case_id)
            continue
        for stale in output_dir.glob(f".{case_id}.*.npz.tmp"):
            stale.unlink(missing_ok=True)  # left by a killed worker; we hold the lock
        pending.append((case_id, source, path))
    return pending


def is_complete_case_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a case file that opens with all its keys and readable meta.

    Case files are only ever renamed into place complete (atomic writes), so this quick
    check (no decompression of the volumes) is enough to tell a finished case.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            if not set(_CASE_KEYS) <= set(data.files):
                return False
            json.loads(str(data["meta"]))
        return True
    except Exception:  # unreadable leftovers are converted again
        return False


def _run_job(convert: Convert, case_id: str, source: object, path: str) -> dict:
    """Convert and save one case (in a worker); exceptions become a result record.

    ``KeyboardInterrupt`` and ``SystemExit`` are not caught: they stop the batch.
    """
    started = time.perf_counter()
    try:
        case = convert(source, case_id)
        if not isinstance(case, Case):
            raise TypeError(f"converter returned {type(case).__name__}, not a Case")
        case.case_id = case_id
        save_case(case, path)
    except SkipCase as skip:
        return {"case_id": case_id, "status": "skipped", "reason": skip.reason}
    except Exception as err:
        return {"case_id": case_id, "status": "failed", "error": f"{type(err).__name__}: {err}",
                "file": getattr(err, "path", None)}
    return {"case_id": case_id, "status": "processed",
            "seconds": round(time.perf_counter() - started, 3),
            "warnings": [str(w) for w in case.meta.get("warnings", [])]}


def _run_serial(convert: Convert, pending: list) -> Iterator[dict]:
    for case_id, source, path in pending:
        yield _run_job(convert, case_id, source, str(path))


#: Seconds between two checks of the parent in :func:`exit_with_parent`'s polling thread.
PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process when ``parent_pid`` dies.

    A pool worker blocks forever on its job queue when the parent is killed (every worker
    holds the queue's write end, so it never sees end-of-file). On Linux the kernel sends
    SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread
    also polls ``os.getppid()`` and exits when the process has been re-parented.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the polling thread still works
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_poll_parent, args=(parent_pid,), name="parent-watchdog",
                     daemon=True).start()


def _poll_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _run_parallel(convert: Convert, pending: list, num_workers: int) -> Iterator[dict]:
    """Results in completion order from spawned workers; a crashed worker fails its cases."""
    pool = ProcessPoolExecutor(min(num_workers, len(pending)), mp_context=get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_run_job, convert, case_id, source, str(path)): case_id
                   for case_id, source, path in pending}
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool as err:
                yield {"case_id": futures[future], "status": "failed", "file": None,
                       "error": f"worker process died ({err}); out of memory?"}
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _collect(results: Iterator[dict], pending: list, summary: dict, progress: bool | str,
             record_sources: bool) -> None:
    """Fold the job results into ``summary``, with a progress bar."""
    from tqdm.auto import tqdm

    sources = {case_id: source for case_id, source, _ in pending}
    label = progress if isinstance(progress, str) else "preprocess"  # a str labels the bar
    with tqdm(total=len(pending), desc=label, unit="case", disable=not progress) as bar:
        for result in results:
            case_id, status = result["case_id"], result["status"]
            if status == "processed":
                summary["processed"].append({"case_id": case_id, "seconds": result["seconds"]})
                summary["warnings"] += [{"case_id": case_id, "message": w}
                                        for w in result["warnings"]]
            elif status == "skipped":
                summary["skipped"].append(_entry(case_id, sources[case_id], record_sources,
                                                 reason=result["reason"]))
                log.info("skipped %s: %s", case_id, result["reason"])
            else:
                summary["failed"].append(_entry(case_id, sources[case_id], record_sources,
                                                error=result["error"], file=result["file"]))
                log.warning("failed %s: %s", case_id, result["error"])
                # The folder may name the patient: on the console only (not logged, not in
                # the summary), so the user can find the broken one.
                bar.write(f"failed {case_id}: source {sources[case_id]}")
            bar.update()
            bar.set_postfix(ok=len(summary["processed"]), skip=len(summary["skipped"]),
                            fail=len(summary["failed"]))


def _entry(case_id: str, source: object, record_sources: bool, **fields) -> dict:
    entry = {"case_id": case_id, **fields}
    if record_sources:
        entry["source"] = str(source)
    return entry


@contextmanager
def _exclusive(output_dir: Path):
    """Hold an exclusive lock on ``output_dir`` (two batches must not share a folder)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(output_dir / LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise RuntimeError(f"{output_dir}: another conversion is writing into this "
                               "folder") from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def format_summary(summary: dict, max_rows: int = 20) -> str:
    """The summary as a small text table plus the skipped / failed cases."""
    counts = summary["counts"]
    lines = [f"preprocess -> {summary['output_dir']} ({summary['seconds']:.1f} s)",
             f"  {'status':<14}{'cases':>6}"]
    for key in ("jobs", "processed", "already_done", "skipped", "failed", "warnings"):
        lines.append(f"  {key.replace('_', ' '):<14}{counts[key]:>6}")
    times = [p["seconds"] for p in summary["processed"] if p.get("seconds") is not None]
    if times:
        lines.append(f"  {'s per case':<14}{np.mean(times):>6.1f}")
    for key, field in (("skipped", "reason"), ("failed", "error")):
        if summary[key]:
            lines.append(f"{key}:")
            lines += [f"  {e['case_id']}: {e[field]}" for e in summary[key][:max_rows]]
            if len(summary[key]) > max_rows:
                lines.append(f"  ... {len(summary[key]) - max_rows} more (see the JSON)")
    return "\n".join(lines)
