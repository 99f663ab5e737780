"""OpenKBP: sparse CSV reading, canonical orientation, the challenge split, archive
unpacking, compact caching, dose-focused patches, the device cache and the submission
format (the real sample when present)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from vmatdose.data.case import load_case, save_case
from vmatdose.data.device_cache import DeviceBatches
from vmatdose.data.export.openkbp import read_submission, to_original, write_submission
from vmatdose.data.ingest.openkbp import (
    SPLIT_FILE,
    OpenKBPFormatError,
    find_openkbp_patients,
    import_openkbp_dataset,
    import_openkbp_patient,
    official_split,
    openkbp_cases,
    read_sparse,
    to_canonical,
    unpack_archive,
)
from vmatdose.data.pipeline import (
    InputSettings,
    SamplingSettings,
    assemble_batch,
    build_transforms,
)
from vmatdose.data.prior import fit_falloff_profile, prior_dose

from conftest import OPENKBP_SAMPLE, last_line, make_box_case, openkbp_patients, run_main

needs_sample = pytest.mark.skipif(
    not OPENKBP_SAMPLE.is_dir(),
    reason=f"OpenKBP sample not found at {OPENKBP_SAMPLE} (see ../shared/data/openkbp-sample)")


def test_read_sparse_values_and_masks(tmp_path):
    values = tmp_path / "dose.csv"
    values.write_text(",data\n0,1.5\n7,2.0\n")
    mask = tmp_path / "Roi.csv"
    mask.write_text(",data\n3,\n4,\n")
    dose = read_sparse(values, shape=(2, 2, 2))
    assert dose[0, 0, 0] == 1.5 and dose[1, 1, 1] == 2.0 and dose.sum() == 3.5
    roi = read_sparse(mask, shape=(2, 2, 2), dtype=np.uint8)
    assert roi.ravel().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]


def test_read_sparse_rejects_bad_files(tmp_path):
    outside = tmp_path / "ct.csv"
    outside.write_text(",data\n99,1\n")
    with pytest.raises(OpenKBPFormatError, match="ct.csv.*outside"):
        read_sparse(outside, shape=(2, 2, 2))
    nan = tmp_path / "dose.csv"
    nan.write_text(",data\n1,nan\n2,3.0\n")
    with pytest.raises(OpenKBPFormatError, match="dose.csv.*non-finite"):
        read_sparse(nan, shape=(2, 2, 2))


def test_canonical_orientation_moves_slices_to_superior_first():
    volume = np.zeros((2, 3, 4))  # (row=y, column=x, slice: superior -> inferior)
    volume[1, 2, 0] = 1.0  # posterior, left, most superior slice
    out = to_canonical(volume)
    assert out.shape == (4, 2, 3)
    assert out[3, 1, 2] == 1.0  # z index 3 is the most superior


def test_missing_files_name_the_folder(tmp_path):
    (tmp_path / "ct.csv").write_text(",data\n")
    with pytest.raises(OpenKBPFormatError, match="missing.*possible_dose_mask.csv"):
        import_openkbp_patient(tmp_path)


@needs_sample
def test_sample_patient_anatomy_is_in_canonical_orientation():
    case = import_openkbp_patient(OPENKBP_SAMPLE / "train-pats" / "pt_1")
    centre = {n: np.argwhere(case.mask(n)).mean(0) for n in
              ("Brainstem", "SpinalCord", "Mandible", "LeftParotid", "RightParotid")}
    assert centre["Brainstem"][0] > centre["SpinalCord"][0]  # z: superior
    assert centre["Mandible"][1] < centre["SpinalCord"][1]  # y: posterior
    assert centre["LeftParotid"][2] > centre["RightParotid"][2]  # x: patient left
    np.testing.assert_allclose(case.spacing_mm, [2.5, 3.906, 3.906])
    assert case.ct.min() == -1024
    soft_tissue = np.median(case.ct[case.body > 0])
    assert -150 < soft_tissue < 150
    assert abs(np.median(case.dose[case.mask("PTV70") > 0]) - 70.0) < 5.0
    assert case.dose[case.body == 0].max() == 0.0
    assert case.prescriptions_gy == {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}


@pytest.mark.slow
@needs_sample
def test_sample_imports_into_case_files_once(tmp_path):
    patients = find_openkbp_patients(OPENKBP_SAMPLE)
    assert len(patients) == 21
    paths = import_openkbp_dataset(tmp_path, OPENKBP_SAMPLE, num_workers=1, progress=False)
    assert len(paths) == 21
    stamp = paths[0].stat().st_mtime_ns
    import_openkbp_dataset(tmp_path, OPENKBP_SAMPLE, num_workers=1, progress=False)
    assert paths[0].stat().st_mtime_ns == stamp
    case = load_case(tmp_path / "openkbp_pt_61.npz")
    assert "PTV63" not in case.prescriptions_gy  # only the targets the patient has
    assert case.meta["protocol"] == "head_neck"
    assert case.meta["openkbp_split"] == "train-pats"
    split = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert (len(split["train"]), len(split["val"])) == (17, 4)
    assert split["test"] == split["val"]  # no test-pats: validation stands in
    assert "openkbp_pt_61" in split["train"]


def test_official_split_follows_the_folders(tmp_path):
    folders = [tmp_path / "train-pats" / "pt_1", tmp_path / "train-pats" / "pt_2",
               tmp_path / "validation-pats" / "pt_201", tmp_path / "test-pats" / "pt_241"]
    split = official_split(folders)
    assert split == {"train": ["openkbp_pt_1", "openkbp_pt_2"], "val": ["openkbp_pt_201"],
                     "test": ["openkbp_pt_241"]}


def fake_patient_archive(path, names=("pt_1", "pt_2")):
    """A .tar.xz shaped like the challenge's: train-pats/pt_N/<files>."""
    with tarfile.open(path, "w:xz") as tar:
        for name in names:
            for file in ("ct.csv", "dose.csv"):
                data = f",data\n0,{len(name)}\n".encode()
                info = tarfile.TarInfo(f"train-pats/{name}/{file}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_is_idempotent_and_resumes(tmp_path):
    archive = fake_patient_archive(tmp_path / "train-pats.tar.xz")
    dest = tmp_path / "out"
    unpack_archive(archive, dest, progress=False)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.csv"))
    assert files == ["train-pats/pt_1/ct.csv", "train-pats/pt_1/dose.csv",
                     "train-pats/pt_2/ct.csv", "train-pats/pt_2/dose.csv"]
    done = dest / "train-pats/pt_1/ct.csv"
    stamp = done.stat().st_mtime_ns
    unpack_archive(archive, dest, progress=False)  # finished: nothing rewritten
    assert done.stat().st_mtime_ns == stamp
    # an interrupted run: the stamp is missing and one file was never written
    (dest / ".train-pats.tar.xz.done").unlink()
    (dest / "train-pats/pt_2/dose.csv").unlink()
    unpack_archive(archive, dest, progress=False)
    assert (dest / "train-pats/pt_2/dose.csv").read_text() == ",data\n0,4\n"
    assert done.stat().st_mtime_ns == stamp  # complete files are kept


def test_unpack_refuses_members_outside_the_patient_folders(tmp_path):
    archive = tmp_path / "evil-pats.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        info = tarfile.TarInfo("../escape.csv")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(OpenKBPFormatError, match="evil-pats.tar.xz.*unexpected member"):
        unpack_archive(archive, tmp_path / "out", progress=False)


@needs_sample
def test_submission_round_trip_is_voxel_exact(tmp_path):
    case = import_openkbp_patient(OPENKBP_SAMPLE / "validation-pats" / "pt_201")
    path = write_submission(case.dose, case, tmp_path)
    assert path.name == "pt_201.csv"
    assert path.read_text().splitlines()[0] == ",data"
    original = read_submission(path)
    # the challenge's layout: the same array its own dose.csv gives
    np.testing.assert_array_equal(original, read_sparse(
        OPENKBP_SAMPLE / "validation-pats" / "pt_201" / "dose.csv"))
    np.testing.assert_array_equal(to_canonical(original), case.dose)
    np.testing.assert_array_equal(to_original(case.dose), original)


def test_submission_refuses_other_grids(box_case):
    with pytest.raises(ValueError, match="case 'box'.*128"):
        write_submission(box_case.dose, box_case, "unused.csv")


@needs_sample
def test_openkbp_folder_imports_on_the_fly(tmp_path):
    folder = tmp_path / "to_predict"
    patient = folder / "pt_201"
    patient.mkdir(parents=True)
    for src in (OPENKBP_SAMPLE / "validation-pats" / "pt_201").iterdir():
        if src.name != "dose.csv":  # a case to predict has no reference dose
            (patient / src.name).symlink_to(src)
    paths = openkbp_cases(folder, tmp_path / "cases")
    assert [p.name for p in paths] == ["openkbp_pt_201.npz"]
    assert load_case(paths[0]).dose is None


def test_prior_dose_is_the_prescription_falloff_of_the_nearest_target():
    masks = np.zeros((2, 1, 1, 30), np.uint8)
    masks[0, 0, 0, 0:5] = 1  # target at level 1.0
    masks[1, 0, 0, 20:25] = 1  # target at level 0.8
    body = np.ones((1, 1, 30), np.uint8)
    body[0, 0, 29] = 0
    prior = prior_dose(masks, body, [1.0, 0.8], (1.0, 1.0, 2.0), [0.0, 10.0, 20.0],
                       [1.0, 0.5, 0.0])
    assert prior[0, 0, 2] == pytest.approx(1.0)
    assert prior[0, 0, 22] == pytest.approx(0.8)
    assert prior[0, 0, 5] == pytest.approx(1.0 - 0.05 * 2.0)  # 2 mm from target 1
    assert prior[0, 0, 10] == pytest.approx(0.4)  # 12 mm from target 1, 20 mm from 2
    assert prior[0, 0, 29] == 0.0  # outside the body


def test_falloff_profile_fit_recovers_a_known_falloff(tmp_path):
    case = make_box_case(shape=(24, 24, 24), spacing=(2.0, 2.0, 2.0))
    dist = prior_dose(case.masks[:1], case.body, [1.0], case.spacing_mm,
                      [0.0, 40.0], [1.0, 0.0])  # 1 - d / 40 mm
    case.dose = (70.0 * dist).astype(np.float32)
    case.masks = case.masks[:1]
    case.structures = ["PTV70"]
    case.prescriptions_gy = {"PTV70": 70.0}
    save_case(case, tmp_path / "c.npz")
    knots = [0, 2, 4, 6, 8, 10]
    profile = fit_falloff_profile([tmp_path / "c.npz"], {"PTV70": 70.0}, knots_mm=knots)
    assert profile["distance_mm"] == knots
    assert profile["relative_dose"] == pytest.approx([1 - k / 40 for k in knots], abs=0.03)


def test_compact_samples_assemble_into_the_float_ones(tmp_path):
    save_case(make_box_case(), tmp_path / "box.npz")
    kw = dict(signed_distance=True, prescriptions_gy={"PTV70": 70.0, "PTV56": 56.0},
              prior_dose={"distance_mm": [0.0, 30.0], "relative_dose": [1.0, 0.1]})
    names = ["PTV70", "PTV56", "Rectum"]
    inputs = InputSettings(names, 70.0, **kw)
    full = build_transforms(inputs)({"path": str(tmp_path / "box.npz")})
    compact = build_transforms(inputs, compact=True)({"path": str(tmp_path / "box.npz")})
    assert compact["masks"].dtype == torch.uint8 and compact["ct"].dtype == torch.float16
    assert compact["dose"].dtype == torch.float16 and "image" not in compact
    assembled = assemble_batch(compact, signed_distance=True, prior=True)
    assert assembled["image"].shape == full["image"].shape == (1 + 3 + 3 + 1, 16, 20, 24)
    torch.testing.assert_close(assembled["image"], full["image"], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(assembled["dose"], full["dose"], atol=1e-3, rtol=1e-3)
    assert float(full["image"][-1].max()) == pytest.approx(1.0)  # prior inside PTV70


def test_resolution_factor_pools_volumes_and_spacing(tmp_path):
    save_case(make_box_case(), tmp_path / "box.npz")
    inputs = InputSettings(["PTV70", "PTV56", "Rectum"], 70.0)
    sample = build_transforms(inputs, resolution_factor=2)({"path": str(tmp_path / "box.npz")})
    full = build_transforms(inputs)({"path": str(tmp_path / "box.npz")})
    assert sample["image"].shape == (4, 8, 10, 12)
    torch.testing.assert_close(sample["dose"][0, 3, 4, 5], full["dose"][0, 6:8, 8:10, 10:12].mean())
    np.testing.assert_allclose(sample["spacing_mm"], [4.0, 5.0, 6.0])


def test_dose_patches_centre_on_the_dose_region(tmp_path):
    case = make_box_case(shape=(40, 40, 40))
    case.dose = np.zeros_like(case.dose)
    case.dose[2:6, 2:6, 2:6] = 70.0  # a small corner dose region
    save_case(case, tmp_path / "box.npz")

    def hit_rate(sampling: str) -> float:
        transform = build_transforms(
            InputSettings(["PTV70", "PTV56", "Rectum"], 70.0),
            SamplingSettings(patch_size=[8, 8, 8], patch_sampling=sampling,
                             dose_patch_fraction=1.0))
        transform.set_random_state(seed=0)
        patches = [transform({"path": str(tmp_path / "box.npz")}) for _ in range(40)]
        return float(np.mean([float((p["dose"] >= 0.1).any()) for p in patches]))

    assert hit_rate("dose") == 1.0
    assert hit_rate("uniform") < 0.3
    with pytest.raises(ValueError, match="patch_sampling"):
        SamplingSettings(patch_sampling="random")


def test_device_batches_flip_and_swap_paired_channels():
    masks = torch.zeros(2, 4, 4, 6, dtype=torch.uint8)
    masks[0, :, :, 0] = 1  # "Left" structure at low x
    sample = {"ct": torch.rand(1, 4, 4, 6).half(), "masks": masks,
              "body": torch.ones(1, 4, 4, 6, dtype=torch.uint8),
              "dose": torch.rand(1, 4, 4, 6).half(), "spacing_mm": torch.ones(3),
              "dose_scale_gy": 70.0, "case_id": "a"}
    always = DeviceBatches([sample], 1, "cpu", ["Left", "Right"], [["Left", "Right"]],
                           augment={"flip_lr": 1.0})
    batch = next(iter(always))
    assert batch["masks"].shape == (1, 2, 4, 4, 6)
    assert batch["masks"][0, 1, :, :, 5].all() and not batch["masks"][0, 0].any()
    torch.testing.assert_close(batch["dose"][0], torch.flip(sample["dose"], [-1]))
    prior = torch.arange(5.0)[:, None, None, None].expand(5, 4, 4, 6).half()
    sectors = DeviceBatches([{**sample, "prior": prior}], 1, "cpu", ["Left", "Right"],
                            augment={"flip_lr": 1.0}, prior_permutation=[0, 1, 4, 3, 2])
    assert next(iter(sectors))["prior"][0, :, 0, 0, 0].tolist() == [0.0, 1.0, 4.0, 3.0, 2.0]
    patches = DeviceBatches([sample], 1, "cpu", ["Left", "Right"], patch_size=[2, 2, 2])
    assert next(iter(patches))["ct"].shape == (1, 1, 2, 2, 2)
    assert len(always) == 1 and always.nbytes() > 0


@needs_sample
def test_openkbp_cases_carry_the_nine_challenge_beams_around_the_targets_centroid():
    case = import_openkbp_patient(OPENKBP_SAMPLE / "train-pats" / "pt_1")
    beams = case.meta["beams"]
    assert beams["gantry_deg"] == [40.0 * i for i in range(9)]
    assert beams["couch_deg"] == [0.0] * 9
    assert (beams["energy_mv"], beams["delivery"], beams["source"]) == (6.0, "static", "openkbp")
    targets = np.stack([case.mask(t) for t in case.prescriptions_gy]).any(0)
    centroid = case.origin_mm + np.argwhere(targets).mean(0) * case.spacing_mm
    np.testing.assert_allclose(beams["isocentre_mm"], centroid, atol=1e-6)


def _listing(folder) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def test_openkbp_refuses_a_folder_of_the_users_case_files_and_leaves_it_as_it_was(tmp_path):
    mine = tmp_path / "my_cases"
    for i in range(3):
        save_case(make_box_case(case_id=f"mine_{i}"), mine / f"mine_{i}.npz")
    (mine / "notes.txt").write_text("my own plans\n")
    before = _listing(mine)
    source = openkbp_patients(tmp_path / "openkbp", {"train-pats": ("pt_1",),
                                                      "validation-pats": ("pt_201",)})
    done = run_main("vmatdose.train", "data=openkbp", f"data.cases_dir={mine}",
                    f"data.source_dir={source}", "debug=limit", cwd=tmp_path)
    assert done.returncode != 0
    assert last_line(done.stdout) == (
        f"error: data.cases_dir={mine}: not an OpenKBP import (no openkbp_split.json) and not "
        "empty (4 entries, e.g. mine_0.npz); data=openkbp never imports into a folder of "
        f"other files: train on your own case files with data=clinic data.cases_dir={mine}")
    assert _listing(mine) == before
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


def test_openkbp_imports_into_an_empty_folder_and_then_reads_it(tmp_path):
    from vmatdose.data.openkbp import OpenKBPDataModule
    from vmatdose.protocol import Protocol

    target = tmp_path / "import_here"
    target.mkdir()
    source = openkbp_patients(tmp_path / "openkbp", {"train-pats": ("pt_1",),
                                                      "validation-pats": ("pt_201",)})
    site = Protocol.load("head_neck")
    data = OpenKBPDataModule(source_dir=str(source), data_dir=str(tmp_path / "data"),
                             cases_dir=str(target), import_workers=1,
                             structures=site.structures, targets=site.targets,
                             prescriptions_gy=site.prescriptions_gy,
                             dose_scale_gy=site.dose_scale_gy)
    data.prepare_data()
    assert sorted(p.name for p in target.glob("*.npz")) == ["openkbp_pt_1.npz",
                                                            "openkbp_pt_201.npz"]
    before = _listing(target)
    data.prepare_data()  # an import there already: read, not redone
    assert data.ensure_split()["train"] == ["openkbp_pt_1"] and _listing(target) == before


def test_a_failed_patient_stops_the_import_without_a_split_file_and_a_rerun_resumes(tmp_path):
    """A patient that fails (a worker crash, a broken file) is an error naming it, and no
    split file is written: the folder is an unfinished import, which the next run
    completes, instead of a finished one with cases missing."""
    source = openkbp_patients(tmp_path / "source", {"train-pats": ("pt_1",),
                                                    "validation-pats": ("pt_201",)})
    broken = source / "validation-pats" / "pt_201" / "ct.csv"
    good = broken.read_bytes()
    broken.write_text("not,a\nct")
    out = tmp_path / "cases"
    with pytest.raises(OpenKBPFormatError, match="1 of 2 patients failed to import, "
                                                 "first openkbp_pt_201"):
        import_openkbp_dataset(out, source, num_workers=1, progress=False)
    assert not (out / SPLIT_FILE).exists()
    assert [p.name for p in out.glob("*.npz")] == ["openkbp_pt_1.npz"]
    broken.write_bytes(good)
    import_openkbp_dataset(out, source, num_workers=1, progress=False)
    split = json.loads((out / SPLIT_FILE).read_text())
    assert (split["train"], split["val"]) == (["openkbp_pt_1"], ["openkbp_pt_201"])
