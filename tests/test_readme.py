"""Every command in README.md, run as written on tiny data.

Commands are the lines of the README's fenced code blocks (backslash continuations
joined, trailing ``# comments`` dropped) and its inline code spans that start with
``python -m``. Each one must have an entry here: in :data:`SKIPPED` with the reason, or in
:data:`COMMANDS` with how its placeholders are filled; a README command without an entry
(or an entry without its command) fails :func:`test_every_readme_command_has_an_entry`.

How a command is run: in one shared workspace folder (``VMATDOSE_ROOT``, so ``data/``,
``outputs/`` and ``multirun/`` land there), through ``bash -c`` exactly as written after
the placeholders are filled from :data:`PLACEHOLDERS` (the values are workspace paths);
``...`` in a command stands for the command above it (:data:`ELLIPSIS`). Commands whose
documented form trains on the full default data get extra overrides appended (never
replacing a written token) that make the data tiny: :data:`TINY`.

| placeholder | filled with |
| --- | --- |
| ``<ckpt>`` | the ``debug=smoke`` run's ``last.ckpt`` (phantom, prostate_sib); OpenKBP commands: a 2-patient head-and-neck run's |
| ``<run>`` | ``smoke``: ``outputs/train/runs/smoke/`` holds the smoke run's checkpoints |
| ``cases_dir=<dir>`` | the smoke run's 4 phantom case files (OpenKBP: a folder of 2 sample patients) |
| ``output_dir=<dir>``, ``<case dir>`` | a new folder per command |
| ``<patients dir>``, ``<patients>``, ``<dicom root>``, ``input_dir=<dir>`` | DICOM-RT patient folders written by ``tests/data/dicom_builders.py`` (prostate; head and neck for ``protocol=head_neck``) |
| ``<time>`` | the sweep folder of ``-m model.optimizer.lr=...`` |
| ``<sweep dir>`` | the sweep folder of ``-m seed=... experiment=...`` |
| ``<eval dir or study dir>`` | the smoke run's ``eval/`` |

What an entry checks: exit status (0, or the refusal's), no traceback, and what the
command is for: the files it must write (``expect``) and a line it must print
(``prints``, a regular expression); every entry has at least one of the two. ``needs``
names the README commands whose outputs it reads (a comparison, its sweep): they run
first, whatever the order or selection (``-k``, pytest-xdist). Each command runs once
per test session, also across xdist workers: the workspace and each command's result
live in the session's shared folder, and commands of one entry point run one at a time
(their run folders are named by the second they start). ``make test`` (``--dist
loadfile``) keeps this file on one worker.

The sweeps and full-data commands are ``slow`` (still minutes, still CPU); CI runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import REPO_ROOT, openkbp_patients, shared_folder

README = REPO_ROOT / "README.md"
PYTHON_BIN = Path(os.sys.executable).parent


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README, in order, each on one line (whitespace collapsed)."""
    text = README.read_text() if text is None else text
    commands: list[str] = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        if span.startswith("python -m "):
            commands.append(" ".join(span.split()))
    return list(dict.fromkeys(commands))


_PLAN = ("needs the optional planning extra (pyRadPlan pins numpy < 2.4, so CI does not "
         "install it); tests/planning runs the planner when it is installed and checks the "
         "missing-extra message when it is not")
_STUDY = ("the loss study: 12 or 4 runs of 8 minutes on the 202 OpenKBP patients (hours on 2 "
          "cores); its recipe is tested equal to the runs it published (tests/test_config.py), "
          "sweeps by the smaller sweeps here, its W&B keys in tests/tracking/test_wandb_offline.py")
SKIPPED = {
    'pip install -e ".[plan]"': "installs the optional planning extra (network, ~1.2 GB)",
    "python -m vmatdose.plan predictions_dir=<dir> cases_dir=<dir> output_dir=<dir> "
    "protocol=head_neck": _PLAN,
    "python -m vmatdose.plan ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir> "
    "protocol=head_neck": _PLAN,
    "python -m vmatdose.plan": _PLAN,
    "python -m vmatdose.evaluate predictions_dir=<output_dir>": "scores a planning run's "
        "deliverable doses, " + _PLAN,
    "make demo": "installs into .venv (network) and trains the full demo; CI runs it as "
                 "its own job",
    "make test": "installs into .venv (network) and runs this suite",
    "make experiments": "installs into .venv (network) first; its command is "
                        "`python -m vmatdose.compare` (tested here) over outputs/ and multirun/",
    "python -m vmatdose.train model=unet_founding trainer=gpu": "needs a GPU (trainer=gpu)",
    "wandb sync outputs/train/runs/<run>/wandb/offline-run-*": "uploads to W&B (network)",
    "wandb sync multirun/train/*/*/wandb/offline-run-*": "uploads to W&B (network)",
    "python -m vmatdose.train -m experiment=openkbp_loss_study logger=many seed=1,2 "
    "loss=l1,grad,dvh_match,structure_weighted,asymmetric_ptv,combined_uncertainty": _STUDY,
    "python -m vmatdose.train -m experiment=openkbp_loss_study logger=many seed=1,2 "
    "loss=grad loss.terms.gradient.weight=0.05,0.2": _STUDY,
    "python -m vmatdose.compare multirun/train/<losses> multirun/train/<weights> --stats "
    "--baseline loss=l1": "needs the loss study's 16 runs; `compare --stats` runs on the "
        "prostate study sweep above, its OpenKBP additions in tests/analysis/test_study.py",
    "tensorboard --logdir outputs": "starts a web server that runs until stopped",
    "python -m vmatdose.train -m hydra/launcher=slurm trainer=gpu "
    "hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 "
    "hydra.launcher.timeout_min=600 hydra.launcher.mem_gb=64 loss=l1,grad_dvh":
        "needs a SLURM cluster with GPUs",
    "python -m vmatdose.train trainer=ddp trainer.devices=4": "needs 4 GPUs (trainer=ddp)",
    "python -m vmatdose.train -m hydra/launcher=slurm trainer=ddp trainer.devices=4 "
    "trainer.num_nodes=2 hydra.launcher.gpus_per_node=4 hydra.launcher.nodes=2":
        "needs a SLURM cluster with 2 nodes of 4 GPUs",
}

#: Appended to commands that train on the full default phantom set: its smoke copy, one
#: epoch, the fast evaluation.
TINY = "data.cases_dir={smoke_cases} trainer.max_epochs=1 evaluation=fast"
#: Appended to ``data=openkbp`` commands: the 2-patient OpenKBP folder.
TINY_OPENKBP = "data.source_dir={openkbp_src} data.import_workers=1"

#: Placeholder -> workspace value (``str.format`` fields of :func:`workspace`).
PLACEHOLDERS = {
    "ckpt_path=<ckpt>": "ckpt_path={smoke_ckpt}",
    "cases_dir=<dir>": "cases_dir={smoke_cases}",
    "output_dir=<dir>": "output_dir={out}",
    "output_dir=<case dir>": "output_dir={out}",
    "source_dicom=<patients dir>": "source_dicom={dicom_prostate}",
    "dicom_dir=<patients>": "dicom_dir={dicom_prostate}",
    "input_dir=<dicom root>": "input_dir={dicom_prostate}",
    "input_dir=<dir>": "input_dir={dicom_prostate}",
    "<run>": "smoke",
    "multirun/train/<time>": "{lr_sweep}",
    "<sweep dir>": "{study_sweep}",
    "<eval dir or study dir>": "{smoke_eval}",
}
#: The README's quick check; the workspace runs it first and reuses its run.
SMOKE = "python -m vmatdose.train debug=smoke"
#: ``python -m vmatdose.predict ...``: the documented predict command it continues.
ELLIPSIS = "python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir>"


@dataclass
class Entry:
    """How one README command runs and what it must do.

    ``extra``: overrides appended; ``fill``: placeholders that differ from
    :data:`PLACEHOLDERS`; ``then``: a shell line run after it in the same shell (for a
    command whose effect is on the shell); ``expect``: paths (globs, format fields) it
    must write; ``prints``: regular expressions (format fields, ``re.M``) its output
    must match; ``exit_code``: 0, or a refusal's; ``needs``: README commands whose
    outputs it reads; ``slow`` for the sweeps."""

    extra: str = ""
    fill: dict[str, str] = field(default_factory=dict)
    then: str = ""
    expect: tuple[str, ...] = ()
    prints: str | tuple[str, ...] = ()
    exit_code: int = 0
    needs: tuple[str, ...] = ()
    slow: bool = False


OPENKBP_FILL = {"ckpt_path=<ckpt>": "ckpt_path={openkbp_ckpt}",
                "cases_dir=<dir>": "cases_dir={openkbp_src}"}
#: The last line of a training run that evaluated its test split.
TRAINED = r"^train: test MAE \d+\.\d+ Gy \(mean-dose baseline \d+\.\d+ Gy\)"
#: ``evaluate``'s metric means (YAML).
EVALUATED = r"^mae_body_gy: \d+\.\d+$"
LR_SWEEP = "python -m vmatdose.train -m model.optimizer.lr=1e-3,3e-3 loss=l1,mse"
STUDY = "python -m vmatdose.train -m seed=42,123,456 experiment=baseline,combined_uncertainty"

COMMANDS: dict[str, Entry] = {
    "python -m vmatdose.train": Entry(
        TINY, expect=("outputs/train/runs/*/checkpoints/last.ckpt",), prints=TRAINED,
        slow=True),
    SMOKE: Entry(expect=("outputs/debug/train/runs/*/checkpoints/last.ckpt",),
                 prints=TRAINED),
    "python -m vmatdose.train data=openkbp debug=fdr": Entry(
        TINY_OPENKBP, expect=("data/openkbp/*/openkbp_pt_1.npz",
                              "data/openkbp/*/openkbp_pt_201.npz"),
        prints=(r"will run the requested loop using 1 batch\(es\)",
                r"importing OpenKBP patients:")),
    "python -m vmatdose.train ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt":
        Entry("debug=smoke trainer.max_epochs=2 evaluation=fast",
              expect=("outputs/debug/train/runs/*/checkpoints/epoch_001.ckpt",),
              prints=r"Restoring states from the checkpoint path at "
                     r"\S*outputs/train/runs/smoke/checkpoints/last.ckpt"),
    "python -m vmatdose.evaluate ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt":
        Entry("evaluation=fast", expect=("outputs/eval/runs/*/summary.json",),
              prints=EVALUATED),
    "python -m vmatdose.evaluate ckpt_path=<ckpt>": Entry(
        "evaluation=fast", expect=("outputs/eval/runs/*/summary.json",), prints=EVALUATED),
    "python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir> "
    "export_rtdose=true": Entry(expect=("{out}/phantom_000_rtdose.dcm",),
                                prints=r"^{out}/phantom_000_rtdose.dcm$"),
    "python -m vmatdose.predict ... export_rtdose=true source_dicom=<patients dir>":
        Entry(fill={"cases_dir=<dir>": "cases_dir={dicom_cases}"},
              expect=("{out}/*_rtdose.dcm",), prints=r"^{out}/\w+_rtdose.dcm$"),
    "python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir> "
    "export_rtdose=true source_dicom=<patients dir>":
        Entry(fill={"cases_dir=<dir>": "cases_dir={dicom_cases}"},
              expect=("{out}/*_rtdose.dcm",), prints=r"^{out}/\w+_rtdose.dcm$"),
    "python -m vmatdose.predict ... export_openkbp=true":
        Entry(fill=OPENKBP_FILL, expect=("{out}/pt_1.csv", "{out}/pt_201.csv"),
              prints=r"^{out}/pt_201.csv$"),
    "python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir> "
    "export_openkbp=true":
        Entry(fill=OPENKBP_FILL, expect=("{out}/pt_1.csv", "{out}/pt_201.csv"),
              prints=r"^{out}/pt_201.csv$"),
    "python -m vmatdose.predict ckpt_path=<ckpt> dicom_dir=<patients> output_dir=<dir>":
        Entry(expect=("{out}/*_rtdose.dcm",), prints=r"^{out}/\w+_rtdose.dcm$"),
    "python -m vmatdose.preprocess source=dicom input_dir=<dicom root> output_dir=<case dir>":
        Entry(expect=("{out}/preprocess_summary.json",), prints=r"^\s*processed\s+2$"),
    # its effect is on the shell it runs in: the salt the commands after it use
    'export VMATDOSE_ID_SALT=$(python -c "import secrets; print(secrets.token_hex(16))")':
        Entry(then="printenv VMATDOSE_ID_SALT", prints=r"\A[0-9a-f]{{32}}\n\Z"),
    "python -m vmatdose.preprocess source=dicom protocol=head_neck input_dir=<dir> "
    "output_dir=<dir>": Entry(fill={"input_dir=<dir>": "input_dir={dicom_head_neck}"},
                              expect=("{out}/preprocess_summary.json",),
                              prints=r"^\s*processed\s+1$"),
    "python -m vmatdose.preprocess source=dicom protocol=prostate_sib input_dir=<dir> "
    "output_dir=data/clinic": Entry(expect=("data/clinic/preprocess_summary.json",),
                                    prints=r"^\s*processed\s+2$"),
    "python -m vmatdose.train data=clinic data.cases_dir=<dir> protocol=<site>":
        Entry("trainer.max_epochs=1 evaluation=fast",
              fill={"protocol=<site>": "protocol=prostate_sib"},
              expect=("outputs/train/runs/*/checkpoints/last.ckpt",), prints=TRAINED),
    "python -m vmatdose.train logger=wandb logger.wandb.project=my-project":
        Entry(TINY, expect=("outputs/train/runs/*/wandb/offline-run-*",), prints=TRAINED,
              slow=True),
    LR_SWEEP: Entry(TINY + " hydra.sweep.dir=multirun/train/lr_sweep",
                    expect=tuple(f"multirun/train/lr_sweep/{job}/checkpoints/last.ckpt"
                                 for job in range(4)), slow=True),
    "python -m vmatdose.train -m hparams_search=loss_weights hydra.sweeper.n_trials=20":
        Entry(TINY + " hydra.sweeper.n_trials=2 hydra.sweep.dir=multirun/train/hparams",
              expect=("multirun/train/hparams/optimization_results.yaml",), slow=True),
    "python -m vmatdose.compare multirun/train/<time> --metric test/gamma_3pct_3mm_pass":
        Entry(needs=(LR_SWEEP,), prints=(r"^wrote \S*comparison\.csv$", r"\bmse\b"),
              slow=True),
    "python -m vmatdose.train debug=smoke model.conditioning=film loss=asymmetric_ptv "
    "loss.weighting=uncertainty": Entry("evaluation=fast", prints=TRAINED),
    "python -m vmatdose.calibrate_loss experiment=combined_uncertainty":
        Entry("data.cases_dir={smoke_cases}",
              expect=("conf/loss/initial_sigmas/calibrated.yaml",),
              prints=r"^wrote \S*conf/loss/initial_sigmas/calibrated.yaml; train with "),
    STUDY: Entry(TINY + " hydra.sweep.dir=multirun/train/study",
                 expect=tuple(f"multirun/train/study/{job}/checkpoints/last.ckpt"
                              for job in range(6)), slow=True),
    "python -m vmatdose.compare <sweep dir> --stats --baseline experiment=baseline":
        Entry(needs=(STUDY,), prints=(r"^wrote \S*study_stats\.csv$", r"combined_uncertainty"),
              slow=True),
    "python -m vmatdose.analyze anatomy <eval dir or study dir>": Entry(
        expect=("{smoke_eval}/anatomy/*",), prints=r"^wrote {smoke_eval}/anatomy/"),
}


def test_every_readme_command_has_an_entry():
    commands = readme_commands()
    assert len(commands) > 20
    missing = [c for c in commands if c not in COMMANDS and c not in SKIPPED]
    assert not missing, f"README commands without a test entry: {missing}"
    stale = [c for c in [*COMMANDS, *SKIPPED] if c not in commands]
    assert not stale, f"entries for commands the README no longer has: {stale}"


def test_every_entry_checks_what_its_command_is_for():
    unchecked = [c for c, entry in COMMANDS.items() if not (entry.expect or entry.prints)]
    assert not unchecked, f"entries that check only the exit status: {unchecked}"
    unknown = [n for entry in COMMANDS.values() for n in entry.needs if n not in COMMANDS]
    assert not unknown, f"needs that are not README commands with an entry: {unknown}"


def test_extraction_joins_continuations_and_drops_comments():
    text = ("x\n```bash\n# a comment\npython -m a \\\n    b=1   # note\nmake c\n```\n"
            "Prose `python -m d e=<f>` and `not a command`.\n")
    assert readme_commands(text) == ["python -m a b=1", "make c", "python -m d e=<f>"]


def fill(command: str, entry: Entry, values: dict[str, str]) -> str:
    """The command with ``...`` expanded, placeholders filled and ``extra`` appended."""
    line = command.replace("python -m vmatdose.predict ...", ELLIPSIS)
    for token, value in sorted({**PLACEHOLDERS, **entry.fill}.items(), key=lambda kv:
                               -len(kv[0])):
        line = line.replace(token, value)
    line = f"{line} {entry.extra}".strip().format(**values)
    assert "<" not in line and "..." not in line, f"unfilled placeholder in {line!r}"
    return line


def test_fill_expands_the_ellipsis_and_appends_the_extra_overrides():
    entry = Entry("evaluation=fast", fill={"cases_dir=<dir>": "cases_dir={dicom_cases}"})
    values = {"smoke_ckpt": "/w/last.ckpt", "dicom_cases": "/w/dc", "out": "/w/o",
              "dicom_prostate": "/w/dp"}
    assert fill("python -m vmatdose.predict ... source_dicom=<patients dir>", entry,
                values) == ("python -m vmatdose.predict ckpt_path=/w/last.ckpt "
                            "cases_dir=/w/dc output_dir=/w/o source_dicom=/w/dp "
                            "evaluation=fast")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, openkbp_run):
    """The folder every README command runs in, with the inputs they name: the smoke run
    (the README's own ``python -m vmatdose.train debug=smoke``, copied to
    ``outputs/train/runs/smoke``), DICOM patients and their case files, the OpenKBP
    folder and head-and-neck checkpoint. Built once per session, shared by xdist workers:
    ``(root, env, format values)``."""
    def build(root: Path) -> None:
        from dicom_builders import PatientSpec, head_neck_spec, write_patient

        env = command_env(root)
        done = run_shell(SMOKE, root, env)
        _record(root, SMOKE, SMOKE, done)
        assert done.returncode == 0, done.stdout[-3000:]
        smoke_run = sorted((root / "outputs" / "debug" / "train" / "runs").iterdir())[-1]
        shutil.copytree(smoke_run / "checkpoints",
                        root / "outputs/train/runs/smoke/checkpoints")
        for i in range(2):
            write_patient(root / "dicom_prostate" / f"patient_{i}", PatientSpec())
        write_patient(root / "dicom_head_neck" / "hn_0", head_neck_spec())
        dicom_cases = root / "dicom_cases"
        done = run_shell(f"python -m vmatdose.preprocess source=dicom input_dir="
                         f"{root / 'dicom_prostate'} output_dir={dicom_cases}", root, env)
        assert done.returncode == 0, done.stdout[-3000:]
        values = {"smoke_ckpt": str(smoke_run / "checkpoints" / "last.ckpt"),
                  "smoke_cases": str(root / "data" / "phantom_smoke"),
                  "smoke_eval": str(smoke_run / "eval"),
                  "dicom_prostate": str(root / "dicom_prostate"),
                  "dicom_head_neck": str(root / "dicom_head_neck"),
                  "dicom_cases": str(dicom_cases),
                  "openkbp_src": str(openkbp_patients(root / "openkbp", {
                      "train-pats": ("pt_1",), "validation-pats": ("pt_201",)})),
                  "openkbp_ckpt": str(openkbp_run[2]),
                  "lr_sweep": str(root / "multirun/train/lr_sweep"),
                  "study_sweep": str(root / "multirun/train/study")}
        (root / "values.json").write_text(json.dumps(values))

    root = shared_folder(tmp_path_factory, "readme", build)
    return root, command_env(root), json.loads((root / "values.json").read_text())


def command_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VMATDOSE_ROOT": str(root),
            "VMATDOSE_ID_SALT": "readme-test-salt", "WANDB_MODE": "offline",
            "HYDRA_FULL_ERROR": "0", "PATH": f"{PYTHON_BIN}:{os.environ.get('PATH', '')}"}


def run_shell(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)


@dataclass
class Ran:
    """A README command as run: the shell line, its exit status and output, and the
    format values of its checks (``out``: its own output folder)."""

    line: str
    returncode: int
    stdout: str
    values: dict[str, str]


def _record_path(root: Path, template: str) -> Path:
    return root / "ran" / f"{hashlib.sha1(template.encode()).hexdigest()[:12]}.json"


def _record(root: Path, template: str, line: str, done: subprocess.CompletedProcess) -> None:
    path = _record_path(root, template)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"line": line, "returncode": done.returncode,
                                "stdout": done.stdout}))


def run_once(command: str, workspace) -> Ran:
    """Run a README command (after the ones it ``needs``) once per session: a command
    written twice (a code block and the prose, or with ``...``) runs once, and so does
    one another worker already ran. One command of each entry point at a time."""
    root, env, values = workspace
    entry = COMMANDS[command]
    for need in entry.needs:
        before = run_once(need, workspace)
        assert before.returncode == 0, f"{need} (needed by {command}) failed:\n" \
            f"{before.stdout[-3000:]}"
    template = fill(command, entry, {**values, "out": "{out}"})
    values = {**values, "out": str(root / "out" / _record_path(root, template).stem)}
    record = _record_path(root, template)
    record.parent.mkdir(exist_ok=True)
    with FileLock(str(root / "ran" / f"{entry_point(command)}.lock")):
        if not record.exists():
            line = template.replace("{out}", values["out"])
            shell = f"{line}\n{entry.then}" if entry.then else line
            _record(root, template, line, run_shell(shell, root, env))
    return Ran(**json.loads(record.read_text()), values=values)


def entry_point(command: str) -> str:
    """``vmatdose.train`` for ``python -m vmatdose.train ...``; ``shell`` for the rest."""
    words = command.split()
    return words[2] if words[:2] == ["python", "-m"] else "shell"


def _params():
    """Every README command: skipped ones with their reason, slow ones marked."""
    for command in readme_commands():
        if command in SKIPPED:
            yield pytest.param(command, marks=pytest.mark.skip(reason=SKIPPED[command]),
                               id=command[:70])
        else:
            entry = COMMANDS.get(command, Entry())
            yield pytest.param(command, marks=[pytest.mark.slow] if entry.slow else [],
                               id=command[:70])


@pytest.mark.cli
@pytest.mark.parametrize("command", list(_params()))
def test_readme_command_runs_as_written(command, workspace):
    if command not in COMMANDS:
        pytest.fail(f"README command without a test entry: {command}")
    entry = COMMANDS[command]
    ran = run_once(command, workspace)
    root = workspace[0]
    assert ran.returncode == entry.exit_code, f"{ran.line}\n{ran.stdout[-4000:]}"
    assert "Traceback" not in ran.stdout, ran.stdout[-4000:]
    escaped = {key: re.escape(value) for key, value in ran.values.items()}
    for pattern in (entry.prints,) if isinstance(entry.prints, str) else entry.prints:
        assert re.search(pattern.format(**escaped), ran.stdout, re.M), \
            f"{ran.line}: printed nothing matching {pattern!r}:\n{ran.stdout[-3000:]}"
    for pattern in entry.expect:
        assert list(root.glob(pattern.format(**ran.values).removeprefix(f"{root}/"))), \
            f"{ran.line}: wrote no {pattern}"
