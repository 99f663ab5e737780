"""End-to-end training on tiny phantom volumes (debug=smoke), and the check of every case
file before the first epoch."""

import json
import shutil

import pandas as pd
import pytest
import torch

from vmatdose.data.case import list_case_files, load_case
from vmatdose.data.datamodule import make_split
from vmatdose.data.validation import CaseSetError, check_training_cases
from vmatdose.protocol import Protocol
from vmatdose.training.fit import fit

from case_variants import with_spacing, without_structure, write
from conftest import last_line, run_main, smoke_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("root")


smoke_cfg = smoke_config


@pytest.mark.slow
def test_two_epochs_lower_val_mae_below_initialisation(data_root, tmp_path):
    cfg = smoke_cfg(data_root, tmp_path / "run", "trainer.max_epochs=2",
                    "evaluate_after_training=false", "data.augment.flip_lr=0")
    trainer, model = fit(cfg, tmp_path / "run")
    datamodule = trainer.datamodule
    after = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/mae_gy"]
    torch.manual_seed(0)
    fresh = type(model)(**{**_init_kwargs(model), "net": _fresh_net(cfg)})
    before = trainer.validate(fresh, datamodule=datamodule, verbose=False)[0]["val/mae_gy"]
    assert after < 0.8 * before, (before, after)


def _fresh_net(cfg):
    import hydra

    return hydra.utils.instantiate(cfg.model.net)


def _init_kwargs(model):
    return dict(loss=model.loss, optimizer=model.optimizer_factory,
                scheduler=model.scheduler_factory, val_gamma=None)


def test_run_writes_record_split_checkpoints_and_evaluation(trained_run):
    _, run_dir, _ = trained_run
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["seed"] == 42 and "torch" in record["packages"]
    assert record["config"]["data"]["structures"][0] == "PTV70"
    assert "commit" in record["git"]
    from vmatdose.training.compile import choose_compile
    from vmatdose.training.precision import choose_precision
    assert record["precision"] == choose_precision("auto", "cpu").to_dict()
    assert record["compile"] == {"requested": "auto", "compiled": False,
                                 "reason": choose_compile("auto", "cpu").reason}
    # fp32 on this CPU keeps channels-last, bf16 trains contiguous: whichever auto chose
    expected = "contiguous" if record["precision"]["chosen"].startswith("bf16") else "channels_last"
    assert record["memory_format"]["requested"] == "auto"
    assert record["memory_format"]["chosen"] == expected
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["test"]) == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    table = pd.read_csv(run_dir / "eval" / "per_case.csv")
    assert list(table["case_id"]) == split["test"]
    assert table["mae_body_gy"].between(0, 70).all()
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["metrics"]["mae_body_gy"]["n"] == 1


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_the_epoch_count(data_root, tmp_path):
    first = tmp_path / "first"
    fit(smoke_cfg(data_root, first), first)
    second = tmp_path / "second"
    cfg = smoke_cfg(data_root, second, "trainer.max_epochs=2", "evaluate_after_training=false",
                    f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    trainer, _ = fit(cfg, second)
    assert trainer.current_epoch == 2
    metrics = pd.read_csv(second / "csv" / "metrics.csv")
    assert set(metrics["epoch"].dropna().astype(int)) == {1}, "only the second epoch is trained"


@pytest.mark.slow
def test_same_seed_gives_same_numbers_on_cpu(data_root, tmp_path):
    values = []
    for name in ("a", "b"):
        cfg = smoke_cfg(data_root, tmp_path / name, "evaluate_after_training=false")
        trainer, _ = fit(cfg, tmp_path / name)
        values.append(float(trainer.callback_metrics["val/mae_gy"]))
    assert values[0] == values[1]


def _bad_copy(trained_run, tmp_path):
    """A copy of the smoke cases where the test-split case lacks PTV56 and a training case
    is not a case file: (cases_dir, test case path, broken path)."""
    root, _, _ = trained_run
    cases_dir = tmp_path / "cases"
    shutil.copytree(root / "data" / "phantom_smoke", cases_dir)
    ids = [p.stem for p in list_case_files(cases_dir)]
    split = make_split(ids, 0.25, 0.25, seed=42)
    test_path = cases_dir / f"{split['test'][0]}.npz"
    case = without_structure(load_case(test_path), "PTV56")
    write(case, cases_dir)
    broken = cases_dir / f"{split['train'][0]}.npz"
    broken.write_text("truncated")
    return cases_dir, test_path, broken


def test_bad_cases_of_any_split_stop_training_before_the_first_epoch(trained_run, tmp_path):
    cases_dir, test_path, broken = _bad_copy(trained_run, tmp_path)
    result = run_main("vmatdose.train", "debug=smoke", f"paths.root_dir={tmp_path}",
                     f"data.cases_dir={cases_dir}", "logger=none", cwd=tmp_path)
    assert result.returncode == 1
    assert last_line(result.stdout) == (
        f"error: 2 case files not usable for training: {broken}: not a readable case file "
        f"(File is not a zip file) | {test_path}: missing required target PTV56 "
        "(prostate_sib needs PTV70 and PTV56)")
    assert "Epoch 0" not in result.stdout and "applying transform" not in result.stdout
    assert not list(tmp_path.rglob("*.ckpt"))


def test_val_and_test_cases_at_another_spacing_are_found_before_training(trained_run):
    root, _, _ = trained_run
    paths = list_case_files(root / "data" / "phantom_smoke")
    protocol = Protocol.load("prostate_sib")
    spacing = check_training_cases({"train": paths[:2], "val": paths[2:3], "test": paths[3:]},
                                   protocol)
    assert spacing.median_mm == (4.0, 8.0, 12.0)
    odd = write(with_spacing(load_case(paths[3]), [2.5, 2.0, 1.75], "odd"),
                paths[0].parent.parent / "odd_spacing")
    splits = {"train": paths[:2], "val": paths[2:3], "test": [odd]}
    assert check_training_cases(splits, protocol) == spacing  # resampled at evaluation
    with pytest.raises(CaseSetError) as err:
        check_training_cases(splits, protocol, spacing_mismatch="refuse")
    assert str(err.value) == (
        f"1 case file not usable for training: {odd}: voxel spacing 2.5x2x1.75 mm differs by "
        "more than 10% from the training spacing 4x8x12 mm (test split)")


def test_training_on_the_validation_cases_too_records_them_as_trained(data_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = smoke_cfg(data_root, run_dir, "trainer.max_steps=1", "evaluate_after_training=false",
                    "data.split.train_on=[train,val]")
    trainer, _ = fit(cfg, run_dir)
    split = json.loads((run_dir / "split.json").read_text())
    assert split["val"] and split["train"][-len(split["val"]):] == split["val"]
    stored = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                        weights_only=True)["vmatdose"]["split"]
    assert stored == split
    assert len(trainer.datamodule.paths_of("train")) == len(split["train"])
