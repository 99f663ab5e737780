"""Shared fixtures: small analytic cases, composed configs, and the trained runs that many
tests share (built once per session, also across pytest-xdist workers).

Markers: ``cli`` for a test that starts a command (``python -m vmatdose...`` or ``bash -c``
in a subprocess; each pays torch + Hydra start-up), ``slow`` for tests of seconds or more
(optimizer steps, worker processes, the README's sweeps).
``make test-fast`` runs ``-m "not cli and not slow"``; a test without the ``cli`` marker
that starts a command fails (:func:`commands_only_in_cli_tests`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: each (and every command it starts) on one thread, else
    # their OpenMP threads wait for each other's cores.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = "1"

import numpy as np
import pytest
from filelock import FileLock

from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import Case

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENKBP_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "openkbp-sample"
# The DICOM builders (tests/data/dicom_builders.py) serve tests in other folders too.
sys.path.insert(0, str(Path(__file__).parent / "data"))


def smoke_config(root, run_dir, *overrides, return_hydra: bool = False):
    """The composed ``debug=smoke`` training config, data under ``root``, run in ``run_dir``
    (``return_hydra``: with the ``hydra`` node, as a Hydra app sees it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["debug=smoke", f"paths.root_dir={root}",
                                           f"paths.output_dir={run_dir}", *overrides],
                       return_hydra_config=return_hydra)


def make_box_case(shape=(16, 20, 24), spacing=(2.0, 2.5, 3.0), case_id="box",
                  with_dose=True) -> Case:
    """A body block with a PTV70 cube, a PTV56 shell around it and a Rectum bar.

    Dose: 70 Gy in PTV70, 56 Gy in PTV56, 10 Gy elsewhere in the body, 0 outside.
    """
    z, y, x = shape
    body = np.zeros(shape, np.uint8)
    body[1:-1, 2:-2, 2:-2] = 1
    ptv70 = np.zeros(shape, np.uint8)
    ptv70[z // 2 - 3:z // 2 + 3, y // 2 - 3:y // 2 + 3, x // 2 - 3:x // 2 + 3] = 1
    ptv56 = np.zeros(shape, np.uint8)
    ptv56[z // 2 - 5:z // 2 + 5, y // 2 - 5:y // 2 + 5, x // 2 - 5:x // 2 + 5] = 1
    ptv56[ptv70 > 0] = 0
    rectum = np.zeros(shape, np.uint8)
    rectum[:, y // 2 + 6:y // 2 + 8, x // 2 - 1:x // 2 + 1] = 1
    rectum *= body
    dose = np.where(body > 0, 10.0, 0.0).astype(np.float32)
    dose[ptv56 > 0] = 56.0
    dose[ptv70 > 0] = 70.0
    ct = np.where(body > 0, 40, -1000).astype(np.int16)
    return Case(case_id=case_id, ct=ct, masks=np.stack([ptv70, ptv56, rectum]),
                structures=["PTV70", "PTV56", "Rectum"], body=body,
                spacing_mm=np.array(spacing, float), origin_mm=np.zeros(3),
                prescriptions_gy={"PTV70": 70.0, "PTV56": 56.0},
                dose=dose if with_dose else None, meta={"source": "test", "fractions": 28})


@pytest.fixture
def box_case() -> Case:
    return make_box_case()


@pytest.fixture(autouse=True)
def one_torch_thread_for_model_tests(request):
    """Model tests run torch on one CPU thread: they are many small convolutions, and on a
    machine whose cores are shared, OpenMP threads waiting for a busy core make them many
    times slower (a 30-step DDPM run: ~5 s on one thread, 100 s on two under load)."""
    if "models" not in request.node.path.parts:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pytest_runtest_teardown(item):
    """Drop pymedphys' lazy alias modules (``pymedphys._imports.<package>``) from
    ``sys.modules`` after each test. pymedphys (the gamma reference, imported by tests
    only) registers one per optional package; touching one whose package is not installed
    (altair) raises, and Hydra's ``instantiate`` reads every module in ``sys.modules``
    (``vars(module)``), so a later in-process command in the same worker would fail.
    pymedphys keeps its own references to them."""
    for name in [n for n in list(sys.modules) if n.startswith("pymedphys._imports.")]:
        if type(sys.modules[name]).__name__ == "AliasModule":
            del sys.modules[name]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


_COMMAND_STARTERS = ("bash", "sh")


def _is_command(args) -> bool:
    """``python -m vmatdose...``, ``python -c ...`` or ``bash -c ...``: what a cli test runs."""
    words = [str(a) for a in ([args] if isinstance(args, (str, os.PathLike)) else args)]
    if len(words) < 2:
        return False
    program = Path(words[0]).name
    if program in _COMMAND_STARTERS:
        return words[1] == "-c"
    if not program.startswith("python"):
        return False
    return words[1] == "-c" or (words[1] == "-m" and len(words) > 2
                                and words[2].startswith("vmatdose"))


@pytest.fixture(autouse=True)
def commands_only_in_cli_tests(request, monkeypatch):
    """A test that starts a command must be marked ``cli`` (``make test-fast`` leaves
    those out): here it fails at the command instead."""
    if request.node.get_closest_marker("cli"):
        yield
        return
    real = subprocess.Popen

    class UnmarkedCommand(real):
        def __init__(self, args, *more, **kwargs):
            if _is_command(args):
                pytest.fail(f"{request.node.nodeid} starts a command ({args!r}); mark it "
                            "@pytest.mark.cli", pytrace=False)
            super().__init__(args, *more, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", UnmarkedCommand)
    yield


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test session, the folder then shared by every test and,
    under pytest-xdist, by every worker (the session's temporary folder, a file lock): a
    session fixture built this way runs once however many workers need it. A build that
    raised is retried (from an empty folder) by the next test that needs it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, above each worker's popen-gwK/
    folder, done = base / name, base / f"{name}.done"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One ``debug=smoke`` training run, evaluated on its test split (``evaluation=fast``),
    shared by every test that needs a checkpoint: ``(root, run_dir, last.ckpt)``; the
    phantom cases live in ``root/data/phantom_smoke``. Do not modify its files."""
    from vmatdose.workflow import run_training

    root = shared_folder(tmp_path_factory, "trained", lambda root: run_training(
        smoke_config(root, root / "run", "evaluation=fast")))
    run_dir = root / "run"
    return root, run_dir, run_dir / "checkpoints" / "last.ckpt"


def run_main(module: str, *args: str, cwd: Path, tmpdir: Path | None = None,
             env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` run as the module's ``main()`` in this process, as if
    started in ``cwd`` (Hydra's folder there): the same argv parsing, messages and exit
    status as the command, without a process's torch + Hydra start-up. stdout and stderr
    together in ``.stdout`` (``.stderr`` empty); ``tmpdir``: the temporary folder
    (``tempfile``) it uses; ``env``: environment variables set (``None``: unset) while
    it runs. Logging handlers, the working
    folder and Hydra's global state are put back afterwards."""
    import contextlib
    import importlib
    import io
    import logging
    import tempfile

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    entry = importlib.import_module(module)
    argv = [str(entry.__file__), *args, f"hydra.run.dir={Path(cwd) / 'hydra'}"]
    root, output, code = logging.getLogger(), io.StringIO(), 0
    saved = (root.handlers[:], root.level, sys.argv, os.getcwd(), tempfile.tempdir)
    env = {"HYDRA_FULL_ERROR": "0", **(env or {})}
    saved_env = {key: os.environ.get(key) for key in env}
    try:
        sys.argv = argv
        os.chdir(cwd)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if tmpdir is not None:
            tmpdir.mkdir(parents=True, exist_ok=True)
            tempfile.tempdir = str(tmpdir)
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                entry.main()
            except SystemExit as exit_:
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
                code = exit_.code if isinstance(exit_.code, int) else int(bool(exit_.code))
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        sys.argv = saved[2]
        os.chdir(saved[3])
        tempfile.tempdir = saved[4]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # no stale run config for the next test
    return subprocess.CompletedProcess(argv, code, output.getvalue(), "")


def last_line(output: str) -> str:
    """The last non-empty line of a command's output."""
    return [line for line in output.splitlines() if line.strip()][-1]


def openkbp_patients(dest: Path, patients: dict[str, tuple[str, ...]]) -> Path:
    """A small OpenKBP folder at ``dest``: ``{"train-pats": ("pt_1",), ...}`` copied
    from the sample (tests using it skip without the sample)."""
    if not OPENKBP_SAMPLE.is_dir():
        pytest.skip(f"OpenKBP sample not found at {OPENKBP_SAMPLE}")
    for split, names in patients.items():
        for name in names:
            shutil.copytree(OPENKBP_SAMPLE / split / name, dest / split / name)
    return dest


@pytest.fixture(scope="session")
def openkbp_run(tmp_path_factory):
    """One tiny head-and-neck training run on two OpenKBP sample patients (pt_1 to train,
    pt_201 to validate; 32^3 patches, a 4-8-8 U-Net, one step, no evaluation), shared by
    the tests that need a head_neck checkpoint: ``(root, source folder, last.ckpt)``."""
    if not OPENKBP_SAMPLE.is_dir():
        pytest.skip(f"OpenKBP sample not found at {OPENKBP_SAMPLE}")
    root = shared_folder(tmp_path_factory, "openkbp_trained", _train_on_two_openkbp_patients)
    return root, root / "source", root / "run" / "checkpoints" / "last.ckpt"


def _train_on_two_openkbp_patients(root: Path) -> None:
    from hydra import compose, initialize_config_dir

    from vmatdose.workflow import run_training

    source = openkbp_patients(root / "source", {"train-pats": ("pt_1",),
                                                 "validation-pats": ("pt_201",)})
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.root_dir={root}", f"paths.output_dir={root / 'run'}", "data=openkbp",
            f"data.source_dir={source}", "data.import_workers=1", "data.patch_size=[32,32,32]",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "trainer.accelerator=cpu",
            "evaluate_after_training=false", "model.val_gamma=null",
            "model.net.channels=[4,8,8]", "model.net.strides=[2,2]"])
    run_training(cfg)
