"""``data=clinic``: one's own case files, read (never written) with 64^3 dose-centred
patches and a cache that stays within its memory budget."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from monai.data import CacheDataset

from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import save_case
from vmatdose.errors import InputError

from conftest import make_box_case


def _clinic(tmp_path, cases_dir, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=clinic", f"data.cases_dir={cases_dir}", "protocol=prostate_sib",
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *overrides])
    return hydra.utils.instantiate(cfg.data)


@pytest.fixture
def clinic_cases(tmp_path):
    folder = tmp_path / "my_cases"
    for i in range(10):  # two spacings, one grid size each
        spacing = (2.5, 2.5, 2.5) if i % 2 else (3.0, 2.0, 2.0)
        save_case(make_box_case((24, 40, 48), spacing, case_id=f"mine_{i}"),
                  folder / f"mine_{i}.npz")
    return folder


def test_clinic_trains_on_patches_of_the_folder_and_writes_nothing_there(tmp_path,
                                                                         clinic_cases):
    before = sorted(p.name for p in clinic_cases.iterdir())
    data = _clinic(tmp_path, clinic_cases)
    data.prepare_data()
    data.setup("fit")
    assert sorted(data.split["train"] + data.split["val"] + data.split["test"]) == \
        [f"mine_{i}" for i in range(10)]
    assert (len(data.split["val"]), len(data.split["test"])) == (1, 1)
    batch = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(batch, 0)
    assert tuple(batch["image"].shape[2:]) == (64, 64, 64)  # padded to the patch size
    assert isinstance(data.dataset("train"), CacheDataset)
    assert sorted(p.name for p in clinic_cases.iterdir()) == before


def test_cache_over_the_budget_reads_from_disk(tmp_path, clinic_cases):
    data = _clinic(tmp_path, clinic_cases, "data.cache_budget_gb=0.0001")
    data.setup("fit")
    # 9 cases of 24 x 40 x 48 voxels (train + val); compact: CT, dose 2 bytes, masks 1
    # byte (3 packed), body 1 byte
    assert data.cache_estimate_gb() == pytest.approx(9 * 24 * 40 * 48 * 6 / 1e9)
    assert not isinstance(data.dataset("train"), CacheDataset)
    sample = data.dataset("train")[0]
    assert np.asarray(sample["dose"]).shape[1:] == (64, 64, 64)


def test_clinic_refuses_a_folder_without_case_files(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")
    data = _clinic(tmp_path, empty)
    with pytest.raises(InputError, match=f"{empty}: no case files"):
        data.prepare_data()
    assert [p.name for p in empty.iterdir()] == ["notes.txt"]
