"""The checkpoint contract: what training stores, and files that are not vmatdose
checkpoints refused in one line without running anything from them."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from vmatdose.data.input_spec import InputSpec
from vmatdose.inference import CheckpointError, Predictor, read_checkpoint
from vmatdose.protocol import Protocol

from conftest import last_line, run_main


class _Payload:
    """Unpickling this creates the folder ``marker``: the payload a crafted .ckpt runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_training_stores_the_contract_once_and_it_loads_weights_only(trained_run):
    root, run_dir, ckpt = trained_run
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "hyper_parameters" not in raw, "the config is stored once, under 'vmatdose'"
    contract = read_checkpoint(ckpt).contract
    protocol = Protocol.load("prostate_sib")
    assert contract.protocol == protocol.to_dict()
    assert contract.structures == list(protocol.structures)
    spec = dict(contract.inputs).pop("spec")
    assert {k: v for k, v in contract.inputs.items() if k != "spec"} == {
        "ct_window": [-1000.0, 1500.0], "signed_distance": False, "sdf_scale_mm": 50.0,
        "dose_scale_gy": 70.0, "prior_dose": None, "conditioning": None,
        "resolution_factor": 1}
    assert spec == InputSpec.build(protocol.structures, lr_pairs=protocol.lr_pairs).to_dict()
    # debug=smoke phantoms are 4 x 8 x 12 mm; the spacing is the training cases' median.
    assert contract.spacing["median_mm"] == [4.0, 8.0, 12.0]
    assert contract.cases_dir == str((root / "data" / "phantom_smoke").resolve())
    assert contract.split == json.loads((run_dir / "split.json").read_text())
    assert contract.config["model"]["_target_"] == "vmatdose.training.module.DoseModule"
    assert contract.config["data"]["structures"] == contract.structures


def test_rebuilt_module_carries_the_trained_weights(trained_run):
    _, _, ckpt = trained_run
    checkpoint = read_checkpoint(ckpt)
    module = checkpoint.build_module()
    assert module.loss is None and not module.training
    for name, value in module.state_dict().items():
        assert torch.equal(value, checkpoint.state_dict[name]), name


def test_text_npz_and_foreign_lightning_files_are_refused_by_name(trained_run, tmp_path):
    root, _, _ = trained_run
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch 3, val MAE 2.1 Gy\n")
    npz = root / "data" / "phantom_smoke" / "phantom_000.npz"
    foreign = tmp_path / "other_project.ckpt"
    torch.save({"epoch": 3, "pytorch-lightning_version": "2.6.0",
                "state_dict": {"w": torch.zeros(2)}}, foreign)
    expected = {text: "unreadable as one", npz: "a zip archive, such as an .npz",
                foreign: "no 'vmatdose' contract"}
    for path, problem in expected.items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"{path}: not a vmatdose checkpoint") and problem in message
        assert "\n" not in message


def test_a_crafted_model_target_is_refused_before_it_is_called(trained_run, tmp_path):
    _, _, ckpt = trained_run
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    marker = tmp_path / "ran"
    raw["vmatdose"]["config"]["model"] = {"_target_": "os.makedirs", "name": str(marker)}
    crafted = tmp_path / "crafted_config.ckpt"
    torch.save(raw, crafted)
    with pytest.raises(CheckpointError, match="names 'os.makedirs', which is not a vmatdose"):
        read_checkpoint(crafted).build_module()
    assert not marker.exists()


def test_another_contract_version_is_refused(trained_run, tmp_path):
    _, _, ckpt = trained_run
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["vmatdose"]["version"] = 99
    path = tmp_path / "future.ckpt"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint contract version 99"):
        read_checkpoint(path)


def test_a_checkpoint_without_the_input_spec_loads_and_predicts_the_same(trained_run,
                                                                        tmp_path):
    root, _, ckpt = trained_run
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    spec = raw["vmatdose"]["inputs"].pop("spec")  # as written before the spec was stored
    old = tmp_path / "before_spec.ckpt"
    torch.save(raw, old)
    new, before = Predictor.from_checkpoint(ckpt, "cpu"), Predictor.from_checkpoint(old, "cpu")
    assert "spec" not in before.contract.inputs
    assert before.contract.input_spec.to_dict() == spec  # derived from structures + inputs
    case = sorted((root / "data" / "phantom_smoke").glob("*.npz"))[0]
    np.testing.assert_array_equal(before.predict(case).dose_gy, new.predict(case).dose_gy)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_pickle_never_runs_in_predict_or_evaluate(trained_run, tmp_path, writer):
    root, _, _ = trained_run
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "model.ckpt"
    if writer == "torch.save":
        torch.save({"state_dict": {}, "vmatdose": _Payload(marker)}, crafted)
    else:
        crafted.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload is live
    assert (tmp_path / "control").is_dir()
    commands = {"vmatdose.predict": [f"cases_dir={root / 'data' / 'phantom_smoke'}",
                                     f"output_dir={tmp_path / 'pred'}"],
                "vmatdose.evaluate": []}
    for module, extra in commands.items() if writer == "torch.save" else [
            ("vmatdose.predict", commands["vmatdose.predict"])]:
        result = run_main(module, f"ckpt_path={crafted}", *extra, cwd=tmp_path)
        assert result.returncode != 0
        assert last_line(result.stdout) == (
            f"error: {crafted}: not a vmatdose checkpoint (it holds Python objects that a "
            "weights-only load refuses to run)")
        assert not marker.exists(), "the crafted payload ran"
    assert not (tmp_path / "pred").exists()


def test_predict_names_a_text_file_given_as_checkpoint_in_one_line(trained_run, tmp_path):
    root, _, _ = trained_run
    text = tmp_path / "last.ckpt"
    text.write_text("not a checkpoint\n")
    result = run_main("vmatdose.predict", f"ckpt_path={text}",
                     f"cases_dir={root / 'data' / 'phantom_smoke'}",
                     f"output_dir={tmp_path / 'pred'}", cwd=tmp_path)
    assert result.returncode == 1
    assert last_line(result.stdout).startswith(f"error: {text}: not a vmatdose checkpoint")
    assert "Traceback" not in result.stdout


def test_spacing_record_is_a_median_and_range():
    from vmatdose.data.validation import SpacingRange

    spacing = SpacingRange.of([[2.5, 3.9, 3.9], [3.0, 5.1, 5.1], [2.5, 3.75, 3.75]])
    assert spacing.median_mm == (2.5, 3.9, 3.9)
    assert spacing.low_mm == (2.5, 3.75, 3.75) and spacing.high_mm == (3.0, 5.1, 5.1)
    assert spacing.contains([3.3, 5.6, 3.4])         # within 10 % of the range
    assert not spacing.contains([3.31, 4.0, 4.0])    # 3.31 > 3.0 * 1.1
    assert not spacing.contains([2.5, 3.37, 4.0])    # 3.37 < 3.75 * 0.9
    assert SpacingRange.from_dict(spacing.to_dict()) == spacing
    np.testing.assert_equal(SpacingRange.of([[4, 8, 12]]).describe(), "4x8x12 mm")


def test_an_extra_weight_is_refused_in_one_line_naming_it(trained_run):
    _, _, ckpt = trained_run
    checkpoint = read_checkpoint(ckpt)
    state = {**checkpoint.state_dict, "net.extra_head.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError) as err:
        type(checkpoint)(checkpoint.path, checkpoint.contract, state).build_module()
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{ckpt}: the weights do not fit the model rebuilt from its config: "
                       "unexpected 1: net.extra_head.weight")


def test_a_weight_of_the_wrong_shape_is_refused_in_one_line_naming_it(trained_run):
    _, _, ckpt = trained_run
    checkpoint = read_checkpoint(ckpt)
    name = next(k for k, v in checkpoint.state_dict.items() if v.ndim == 5)
    state = dict(checkpoint.state_dict)
    shape = tuple(state[name].shape)
    state[name] = torch.zeros(shape[0] + 1, *shape[1:])
    with pytest.raises(CheckpointError) as err:
        type(checkpoint)(checkpoint.path, checkpoint.contract, state).build_module()
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(f"wrong shape 1: {name} {(shape[0] + 1, *shape[1:])} "
                            f"instead of {shape}")


def test_missing_weights_are_counted_and_the_first_named(trained_run):
    _, _, ckpt = trained_run
    checkpoint = read_checkpoint(ckpt)
    names = list(checkpoint.state_dict)
    state = {k: v for k, v in checkpoint.state_dict.items() if k not in names[:5]}
    with pytest.raises(CheckpointError) as err:
        type(checkpoint)(checkpoint.path, checkpoint.contract, state).build_module()
    assert str(err.value).endswith(f"missing 5: {', '.join(names[:3])} and 2 more")


def test_the_checkpoint_records_the_datas_grid_and_an_older_one_predicts_on_it(
        trained_run, caplog):
    _, _, ckpt = trained_run
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint.contract.inputs["resolution_factor"] == 1
    assert checkpoint.build_module().inference.resolution_factor == 1
    # A checkpoint from before the model followed the data: data pooled by 2, model at 1.
    raw = checkpoint.contract.to_dict()
    del raw["inputs"]["resolution_factor"]
    raw["config"]["data"]["resolution_factor"] = 2
    raw["config"]["model"]["resolution_factor"] = 1
    older = type(checkpoint)(ckpt, type(checkpoint.contract).from_dict(raw),
                             checkpoint.state_dict)
    assert older.build_module().inference.resolution_factor == 2
    assert "trained on volumes pooled by 2 (data.resolution_factor)" in caplog.text
