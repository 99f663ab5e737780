"""Configs that say no: a user's own config (through ``hydra.searchpath`` or
``--config-dir``) with an unknown key, and out-of-range values, fail at composition with
the key's name, before a run folder exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vmatdose import evaluate, predict, preprocess, train
from vmatdose.config import CONFIG_DIR
from vmatdose.config_schema import check_values, value_errors

REPO = Path(__file__).resolve().parents[1]
USER_CONFIGS = {
    "data/mine.yaml": "defaults:\n  - phantom\n  - _self_\n\nbatch_sise: 3\n",
    "evaluation/mine.yaml": "defaults:\n  - default\n  - _self_\n\ngama_cutoff: 1\n",
    "my_predict.yaml": "defaults:\n  - predict\n  - _self_\n\nexport_rtdos: true\n",
    "my_preprocess.yaml": "defaults:\n  - preprocess\n  - _self_\n\nnum_worker: 3\n",
    "my_eval.yaml": "defaults:\n  - eval\n  - _self_\n\nsplit_fille: s.json\n",
}


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    """A user's config folder, and a run root (VMATDOSE_ROOT) that must stay empty."""
    conf = tmp_path / "conf"
    for name, text in USER_CONFIGS.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("VMATDOSE_ROOT", str(root))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    return conf, root


def _run_main(module, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run an entry point's Hydra main in this process with ``argv``: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.cli
def test_train_with_misspelt_key_in_users_data_config_fails_naming_it(user_conf):
    """The issue's command, as a user runs it."""
    conf, root = user_conf
    done = subprocess.run(
        [sys.executable, "-m", "vmatdose.train", "data=mine", f"hydra.searchpath=[file://{conf}]"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert "Key 'batch_sise' not in 'PhantomDataConfig'" in done.stderr
    assert "full_key: data.batch_sise" in done.stderr
    assert list(root.iterdir()) == [], "refused before any run folder or data"


@pytest.mark.parametrize("module, argv, message", [
    (evaluate, ["evaluation=mine"], "Key 'gama_cutoff' not in 'EvaluationConfig'"),
    (evaluate, ["data=mine"], "Key 'batch_sise' not in 'PhantomDataConfig'"),
    (preprocess, ["source=phantom", "data=mine"], "Key 'batch_sise' not in 'PhantomDataConfig'"),
    (predict, ["--config-name", "my_predict", "ckpt_path=x.ckpt", "output_dir=out"],
     "Key 'export_rtdos' not in 'PredictConfig'"),
    (preprocess, ["--config-name", "my_preprocess", "source=phantom"],
     "Key 'num_worker' not in 'PreprocessConfig'"),
    (evaluate, ["--config-name", "my_eval"], "Key 'split_fille' not in 'EvalConfig'"),
])
def test_users_config_with_unknown_key_fails_at_composition(user_conf, monkeypatch, capsys,
                                                            module, argv, message):
    conf, root = user_conf
    code, err = _run_main(module, [*argv, "--config-dir", str(conf)], monkeypatch, capsys)
    assert code == 1 and message in err
    assert not (user_conf[0].parent / "out").exists()
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("module, argv, message", [
    (train, ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (train, ["data=openkbp", "data.patch_size=[7,7,7]"],
     "data.patch_size=[7, 7, 7]: must be 3 positive integers divisible by 16"),
    (train, ["model.optimizer.lr=-1"], "model.optimizer.lr=-1: must be > 0"),
    (train, ["trainer.max_epochs=-1"], "trainer.max_epochs=-1: must be an integer >= 1"),
    (train, ["trainer.max_epochs=0"], "trainer.max_epochs=0: must be an integer >= 1"),
    (evaluate, ["evaluation.gamma_cutoff_percent=120"],
     "evaluation.gamma_cutoff_percent=120.0: must be in [0, 100)"),
    (preprocess, ["source=phantom", "data.split.val_fraction=1.5"], "data.split="),
    (evaluate, ["split=tset"], "split=tset: must be one of train, val, test, all"),
    (predict, ["ckpt_path=x.ckpt", "output_dir=out", "spacing_mismatch=resampel"],
     "spacing_mismatch=resampel: must be one of resample, refuse"),
])
def test_out_of_range_value_fails_with_key_and_range(user_conf, monkeypatch, capsys, module,
                                                     argv, message):
    code, _ = _run_main(module, argv, monkeypatch, capsys)
    # SystemExit(message): the interpreter prints it as the one line and exits with 1
    assert isinstance(code, str) and code.startswith("error: bad config value: ")
    assert message in code and "\n" not in code
    assert list(user_conf[1].iterdir()) == [], "no run folder, no data"


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("overrides", [
    [], ["data=openkbp"], ["experiment=openkbp_cpu"], ["experiment=openkbp_gpu"],
    ["debug=smoke"], ["debug=short"], ["experiment=model_comparison"],
    ["model=cascade_unet", "data=openkbp", "data.patch_size=[64,64,64]"]])
def test_shipped_training_configs_pass_the_checks(overrides):
    assert value_errors(_compose("train", overrides)) == []


def test_every_error_is_reported_in_one_line():
    cfg = _compose("train", ["data.batch_size=0", "model.optimizer.lr=0",
                             "evaluation.gamma=[{dose_percent: 0, distance_mm: 3}]"])
    with pytest.raises(ValueError) as err:
        check_values(cfg)
    assert str(err.value) == (
        "bad config value: data.batch_size=0: must be an integer >= 1; "
        "evaluation.gamma[0].dose_percent=0.0: must be > 0; model.optimizer.lr=0: "
        "must be > 0")


def test_data_module_refuses_keys_it_does_not_read():
    from vmatdose.data.datamodule import DoseDataModule

    with pytest.raises(TypeError, match="fractions"):
        DoseDataModule("cases", ["PTV"], ["PTV"], {"PTV": 60.0}, 60.0, fractions=30)


def test_evaluation_defaults_are_the_schemas():
    from vmatdose.evaluation.suite import EvaluationSettings

    cfg = _compose("eval", [])
    settings = EvaluationSettings.from_config(["PTV70"], [], None)
    assert settings.gamma == [dict(c) for c in cfg.evaluation.gamma]
    assert (settings.gamma_cutoff_percent, settings.region_margin_mm, settings.dpi) == (
        cfg.evaluation.gamma_cutoff_percent, cfg.evaluation.region_margin_mm,
        cfg.evaluation.dpi)
