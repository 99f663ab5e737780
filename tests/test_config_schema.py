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
from omegaconf import OmegaConf

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
    "model/mine.yaml": "defaults:\n  - unet\n  - _self_\n\nchanels: [8, 16]\n",
    "loss/mine.yaml": ("defaults:\n  - l1\n  - _self_\n\nterms:\n  voxel:\n    term:\n"
                       "      knid: mse\n"),
    "trainer/mine.yaml": "defaults:\n  - default\n  - _self_\n\nmax_epoch: 3\n",
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
    (train, ["data=clinic"], "data.cases_dir=???: give the folder of your case files"),
    (train, ["model.optimizer.lr=-1"], "model.optimizer.lr=-1: must be > 0"),
    (train, ["trainer.max_epochs=-1"], "trainer.max_epochs=-1: must be an integer >= 1"),
    (train, ["trainer.max_epochs=0"], "trainer.max_epochs=0: must be an integer >= 1"),
    (evaluate, ["evaluation.gamma_cutoff_percent=120"],
     "evaluation.gamma_cutoff_percent=120.0: must be in [0, 100)"),
    (preprocess, ["source=phantom", "data.split.val_fraction=1.5"], "data.split="),
    (train, ["data.split.train_on=[val]"],
     "data.split.train_on=['val']: must list train and any of val, test, each once"),
    (train, ["data.split.train_on=[train,tset]"], "data.split.train_on=['train', 'tset']"),
    (evaluate, ["split=tset"], "split=tset: must be one of train, val, test, all"),
    (predict, ["ckpt_path=x.ckpt", "output_dir=out", "spacing_mismatch=resampel"],
     "spacing_mismatch=resampel: must be one of resample, refuse"),
    (predict, ["ckpt_path=x.ckpt", "output_dir=out", "target_dose_floor=2"],
     "target_dose_floor=2.0: must be a fraction of the prescription in (0, 1.2], or null"),
    (evaluate, ["target_dose_floor=0"], "target_dose_floor=0.0: must be a fraction"),
    (train, ["experiment=openkbp_cpu", "model.target_dose_floor=-0.5"],
     "model.target_dose_floor=-0.5: must be a fraction of the prescription"),
    (predict, ["ckpt_path=x.ckpt", "output_dir=out", "oar_dose_ceiling=2"],
     "oar_dose_ceiling=2.0: must be a fraction of the organs' maximum-dose limits"),
    (train, ["experiment=openkbp_cpu", "model.oar_dose_ceiling=0"],
     "model.oar_dose_ceiling=0: must be a fraction of the organs' maximum-dose limits"),
    (evaluate, ["oar_dose_scale=1.5"],
     "oar_dose_scale=1.5: must be a fraction of the organs' predicted dose in (0, 1.2]"),
    (train, ["experiment=openkbp_cpu", "model.oar_dose_scale=0"],
     "model.oar_dose_scale=0: must be a fraction of the organs' predicted dose"),
    (train, ["experiment=openkbp_cpu", "model.oar_dose_scale.Mandible=2"],
     "'Mandible': 2}: must be a fraction of the organs' predicted dose in (0, 1.2] (one, or "
     "one per organ: {organ: fraction})"),
    (train, ["experiment=openkbp_cpu", "+model.oar_dose_scale.Parotid=0.9"],
     "Parotid: not an organ at risk of the protocol (Brainstem, SpinalCord, RightParotid"),
    (train, ["experiment=openkbp_cpu", "model.body_crop_margin=-1"],
     "model.body_crop_margin=-1: must be an integer >= 0"),
    (train, ["model.tta_pool_grids=2"],
     "model.tta_pool_grids=2: pooling grids need a network at a coarser grid"),
    (train, ["experiment=openkbp_cpu", "model.tta_pool_grids=9"],
     "model.tta_pool_grids=9: pooling by 2 has 8 grids"),
    (predict, ["ckpt_path=x.ckpt", "output_dir=out", "tta_pool_grids=0"],
     "tta_pool_grids=0: must be a whole number of pooling grids >= 1 (1 = grid 0 only), or null"),
    (train, ["model.body_crop_margin=2"],
     "model.body_crop_margin=2: needs model.loss_in_body=true and model.zero_outside_body"),
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


@pytest.mark.parametrize("argv, message", [
    (["model=mine"], "model.chanels: unknown key, not an argument of "
                     "vmatdose.training.module.DoseModule"),
    (["loss=mine"], "loss.terms.voxel.term.knid: unknown key, not an argument of "
                    "vmatdose.losses.VoxelLoss; did you mean 'kind'?"),
    (["trainer=mine"], "trainer.max_epoch: unknown key, not an argument of "
                       "lightning.pytorch.Trainer; did you mean 'max_epochs'?"),
    (["+model.net.chanels=[8]"], "model.net.chanels: unknown key, not an argument of "
                                 "monai.networks.nets.UNet; did you mean 'channels'?"),
    (["model=ddpm", "+model.ensemble=2"], "model.ensemble: unknown key, not an argument of "
     "vmatdose.training.generative.DiffusionDoseModule; did you mean 'ensemble_size'?"),
])
def test_users_model_loss_or_trainer_config_with_unknown_key_is_refused_by_name(
        user_conf, monkeypatch, capsys, argv, message):
    conf, root = user_conf
    code, _ = _run_main(train, [*argv, "--config-dir", str(conf)], monkeypatch, capsys)
    assert isinstance(code, str) and code.startswith("error: bad config value: ")
    assert message in code and "\n" not in code
    assert list(root.iterdir()) == [], "no run folder, no data"


def test_the_model_works_on_the_grid_the_data_is_pooled_to():
    import hydra

    cfg = _compose("train", ["data.resolution_factor=2"])
    assert value_errors(cfg) == []
    model = hydra.utils.instantiate(cfg.model, loss=None)
    assert model.inference.resolution_factor == 2
    assert value_errors(_compose("train", ["experiment=openkbp_cpu"])) == []
    assert _compose("train", ["experiment=openkbp_cpu"]).model.resolution_factor == 2


def test_a_model_resolution_factor_other_than_the_datas_is_refused_naming_the_key():
    cfg = _compose("train", ["model.resolution_factor=2"])
    assert value_errors(cfg) == [
        "model.resolution_factor=2: must equal data.resolution_factor=1 (the data is "
        "pooled by it and the predictor pools by the model's: set data.resolution_factor, "
        "the model follows it)"]


# --- one source for each default (docs/architecture.md, "Where each concept lives") -------

CONF = Path(CONFIG_DIR)


def _raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _parent_files(path: Path) -> list[Path]:
    """The YAMLs of the same group that ``path`` extends through its defaults list."""
    entries = [e for e in _raw(path).get("defaults", []) if isinstance(e, str)]
    return [path.parent / f"{e}.yaml" for e in entries
            if e != "_self_" and (path.parent / f"{e}.yaml").is_file()]


def _merged(path: Path) -> dict:
    """``path`` merged onto the group YAMLs it extends (raw values, interpolations as text)."""
    from omegaconf import OmegaConf

    parts = [_merged(p) for p in _parent_files(path)]
    own = {k: v for k, v in _raw(path).items() if k != "defaults"}
    return OmegaConf.to_container(OmegaConf.merge(*parts, own)) if parts else own


def _repeats(own, reference, where: str) -> list[str]:
    """Keys of ``own`` whose value equals ``reference``'s at the same place."""
    found = []
    for key, value in (own.items() if isinstance(own, dict) else ()):
        if not isinstance(reference, dict) or key not in reference:
            continue
        ref = reference[key]
        if isinstance(value, dict) and isinstance(ref, dict):
            found += _repeats(value, ref, f"{where}.{key}")
        elif value == ref or (isinstance(ref, tuple) and value == list(ref)):
            found.append(f"{where}.{key}: {value!r}")
    return found


def _schema_defaults(schema) -> dict:
    """A schema dataclass's defaults, its optional sub-schemas' included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        nested = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                  if dataclasses.is_dataclass(t)]
        if nested:
            out[f.name] = _schema_defaults(nested[0])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = ([dataclasses.asdict(v) for v in value]
                           if value and dataclasses.is_dataclass(value[0]) else value)
    return out


def _schema_of(path: Path):
    """The schema a YAML names first in its defaults list, or ``None``."""
    from vmatdose.config_schema import SCHEMAS

    group = None if path.parent == CONF else path.parent.name
    names = [e for e in _raw(path).get("defaults", []) if isinstance(e, str)]
    return next((cls for g, name, cls in SCHEMAS if g == group and name in names), None)


def _target_defaults(node, inherited: str | None = None, where: str = "") -> list[str]:
    """Keys of ``node`` (and of the nodes below it) that write the default of an argument
    of their vmatdose ``_target_`` (``${vmatdose.default:}`` names it instead)."""
    import inspect

    from vmatdose.config_schema import target_parameters

    if not isinstance(node, dict):
        return []
    target = node.get("_target_", inherited)
    params = (target_parameters(target) or {}) if str(target).startswith("vmatdose.") else {}
    defaults = {k: p.default for k, p in params.items()
                if p.default is not inspect.Parameter.empty}
    found = _repeats({k: v for k, v in node.items() if not isinstance(v, dict)}, defaults,
                     where)
    for key, value in node.items():
        found += _target_defaults(value, None, f"{where}.{key}")
    return found


def _experiment_overrides(path: Path) -> list[str]:
    """The group choices an experiment or debug YAML's defaults list makes, as overrides."""
    out = []
    for entry in _raw(path).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # one it extends
            out.append(f"{path.parent.name}={entry}")
        elif isinstance(entry, dict):
            (key, value), = entry.items()
            out.append(key.replace("override /", "") + f"={value}" if key.startswith("override")
                       else f"+{key.lstrip('/')}={value}")
    return out


@pytest.mark.slow
def test_no_default_is_written_twice():
    """A schema's default is not repeated by the YAML naming it; a vmatdose class's
    default not by a YAML targeting it; a group YAML repeats nothing of the one it
    extends; an experiment or debug YAML nothing of what it overrides."""
    from omegaconf import OmegaConf

    found = []
    for path in sorted(CONF.rglob("*.yaml")):
        name = str(path.relative_to(CONF))
        own = {k: v for k, v in _raw(path).items() if k != "defaults"}
        schema = _schema_of(path)
        if schema is not None:
            found += _repeats(own, _schema_defaults(schema), f"{name} (schema)")
        parents = _parent_files(path)
        if parents:
            base = OmegaConf.to_container(OmegaConf.merge(*map(_merged, parents)))
            found += _repeats(own, base, f"{name} (extends)")
        inherited = next((m.get("_target_") for m in map(_merged, parents)), None)
        found += _target_defaults(own, inherited, f"{name} (target)")
        if path.parent.name in ("experiment", "debug"):
            composed = OmegaConf.to_container(_compose("train", _experiment_overrides(path)))
            found += _repeats(own, composed, f"{name} (overrides)")
    assert found == []


def _literal_defaults(cls) -> dict[str, object]:
    """``__init__`` parameters of ``cls`` whose default is a literal value (a number,
    string, bool or non-empty list; ``None`` and empty containers mean "not given")."""
    import ast
    import inspect
    import textwrap

    fn = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__))).body[0]
    args = fn.args
    pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    found = {}
    for arg, node in pairs:
        try:
            value = ast.literal_eval(node)
        except ValueError:
            continue  # a reference (``DataConfig.batch_size``, ``CT_WINDOW_HU``)
        if value not in (None, (), [], {}):
            found[arg.arg] = value
    return found


def test_the_data_modules_take_the_schemas_defaults():
    import dataclasses

    from vmatdose.config_schema import OpenKBPDataConfig, PhantomDataConfig
    from vmatdose.data.datamodule import DoseDataModule
    from vmatdose.data.openkbp import OpenKBPDataModule

    for cls, schema in ((DoseDataModule, PhantomDataConfig),
                        (OpenKBPDataModule, OpenKBPDataConfig)):
        keys = {f.name for f in dataclasses.fields(schema)}
        assert {k: v for k, v in _literal_defaults(cls).items() if k in keys} == {}, cls


def test_plan_config_refuses_an_unknown_key_and_takes_the_schemas_defaults(user_conf):
    from hydra.errors import ConfigCompositionException

    from vmatdose.planning.settings import PlanSettings

    cfg = _compose("plan", ["cases_dir=c", "output_dir=o"])
    assert PlanSettings.from_config(cfg.planning) == PlanSettings()
    assert dict(cfg.gamma) == {"dose_percent": 3.0, "distance_mm": 3.0, "cutoff_percent": 10.0}
    with pytest.raises(ConfigCompositionException, match="planning.max_iters"):
        _compose("plan", ["cases_dir=c", "output_dir=o", "planning.max_iters=5"])
    conf, _ = user_conf
    (conf / "my_plan.yaml").write_text("defaults:\n  - plan\n  - _self_\n\nexport_rtdos: true\n")
    with initialize_config_dir(str(conf), version_base="1.3"), \
            pytest.raises(ConfigCompositionException) as err:
        compose("my_plan", overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]"])
    assert "Key 'export_rtdos' not in 'PlanConfig'" in str(err.value)


def test_a_key_named_for_its_targets_default_takes_it_from_the_code():
    from vmatdose.training.generative import DiffusionDoseModule

    cfg = _compose("train", ["model=ddpm", "model.sampling_steps=7"])
    assert cfg.model.ensemble_size == 4 and list(cfg.model.tta_axes) == [-3, -2, -1]
    assert cfg.model.sampling_steps == 7  # still an override without "+"
    import inspect
    default = inspect.signature(DiffusionDoseModule.__init__).parameters["num_train_timesteps"]
    assert cfg.model.num_train_timesteps == default.default == 1000
    with pytest.raises(Exception, match="needs a _target_ beside it"):
        cfg = _compose("train", ["+model.film.hidden2=${vmatdose.default:}"])
        OmegaConf.to_container(cfg.model.film, resolve=True)
