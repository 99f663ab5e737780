"""A failed sweep job is recorded and the sweep goes on; outside a sweep nothing changes."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from vmatdose.errors import InputError
from vmatdose.records.job_failure import SweepFailures, run_sweep_job


def fail(err: Exception):
    def task():
        raise err
    return task


def test_a_failed_multirun_job_is_recorded_and_returns_nan(tmp_path, capsys):
    value = run_sweep_job(fail(InputError("/data/x: no case files\nmore")), tmp_path / "3",
                          multirun=True)
    assert math.isnan(value)
    assert json.loads((tmp_path / "3" / "failed.json").read_text()) == {
        "error": "InputError", "message": "/data/x: no case files"}
    assert "error: /data/x: no case files (sweep job 3 failed; the sweep goes on)" in \
        capsys.readouterr().err
    assert run_sweep_job(lambda: 0.5, tmp_path / "4", multirun=True) == 0.5
    assert not (tmp_path / "4").exists()


def test_outside_a_multirun_the_error_is_raised(tmp_path):
    with pytest.raises(RuntimeError, match="diverged"):
        run_sweep_job(fail(RuntimeError("diverged")), tmp_path, multirun=False)
    assert not (tmp_path / "failed.json").exists()


def test_the_end_of_a_sweep_lists_its_failed_jobs(tmp_path):
    for job in ("0", "1", "2"):
        (tmp_path / job).mkdir()
    run_sweep_job(fail(ValueError("loss is NaN")), tmp_path / "1", multirun=True)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as stop:
        SweepFailures().on_multirun_end(config)
    assert str(stop.value.code) == f"error: 1 of 3 sweep jobs failed: {tmp_path / '1'}: loss is NaN"
    (tmp_path / "1" / "failed.json").unlink()
    SweepFailures().on_multirun_end(config)  # nothing failed: no exit


def test_a_finished_jobs_reference_cycles_are_collected(tmp_path):
    """Lightning's trainer, module and data module hold each other; without a collection
    a finished job's cached data would wait for Python's next full collection."""
    import gc
    import weakref

    class Cached:  # stands for a data module holding its cached cases
        pass

    refs = []

    def job():
        data = Cached()
        data.self = data  # a cycle, as trainer <-> data module
        refs.append(weakref.ref(data))
        return 1.0

    enabled = gc.isenabled()
    gc.disable()
    try:
        run_sweep_job(job, tmp_path, multirun=True)
        assert refs[0]() is None
        run_sweep_job(job, tmp_path, multirun=False)
        assert refs[1]() is not None  # a single run exits anyway; nothing to collect for
    finally:
        if enabled:
            gc.enable()
