"""The phantom generator: plan-like dose numbers, determinism, resumable data set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from vmatdose.data.case import load_case
from vmatdose.data.phantom import (
    DATASET_FILE,
    STRUCTURES,
    generate_phantom_case,
    generate_phantom_dataset,
)


@pytest.fixture(scope="module")
def cases():
    return [generate_phantom_case(seed) for seed in (1, 2, 3)]


def _mask(case, name):
    return case.masks[case.structures.index(name)].astype(bool)


def test_target_medians_match_the_prescription(cases):
    for case in cases:
        assert abs(np.median(case.dose[_mask(case, "PTV70")]) - 70.0) <= 2.0
        assert abs(np.median(case.dose[_mask(case, "PTV56")]) - 56.0) <= 2.0


def test_rectum_is_spared(cases):
    for case in cases:
        rectum_mean = case.dose[_mask(case, "Rectum")].mean()
        assert rectum_mean < np.median(case.dose[_mask(case, "PTV56")])


def test_dose_falls_off_outside_the_targets(cases):
    for case in cases:
        targets = _mask(case, "PTV70") | _mask(case, "PTV56")
        distance = ndimage.distance_transform_edt(~targets, sampling=case.spacing_mm)
        shell = (distance >= 29.0) & (distance <= 31.0) & case.body.astype(bool)
        assert shell.sum() > 100
        assert case.dose[shell].mean() < 28.0
        assert np.percentile(case.dose[shell], 90) < 28.0


def test_low_dose_bath_and_no_dose_outside_body(cases):
    case = cases[0]
    body = case.body.astype(bool)
    assert case.dose[~body].max() == 0.0
    # the arc enters all around: most of the body slab around the target gets a few Gy
    z = np.argwhere(_mask(case, "PTV70"))[:, 0].mean().round().astype(int)
    assert (case.dose[z][body[z]] > 2.0).mean() > 0.9


def test_ct_has_realistic_tissue_values(cases):
    case = cases[0]
    assert case.ct[~case.body.astype(bool)].max() == -1000
    femur = case.ct[_mask(case, "Femur_L")]
    assert np.median(femur) > 300
    assert abs(np.median(case.ct[_mask(case, "Bladder")])) < 40


@pytest.mark.slow
def test_anatomy_varies_and_generation_is_deterministic():
    a, b, again = generate_phantom_case(5), generate_phantom_case(6), generate_phantom_case(5)
    np.testing.assert_array_equal(a.ct, again.ct)
    np.testing.assert_array_equal(a.dose, again.dose)
    assert a.structures == STRUCTURES
    volumes = [(c.masks.reshape(len(STRUCTURES), -1).sum(1)) for c in (a, b)]
    assert not np.array_equal(volumes[0], volumes[1])


def test_dataset_is_written_once_and_resumes(tmp_path):
    kwargs = dict(n_cases=3, shape=(24, 32, 40), spacing_mm=(5.0, 8.0, 10.0), num_workers=1,
                  progress=False)
    paths = generate_phantom_dataset(tmp_path, **kwargs)
    assert [p.name for p in paths] == ["phantom_000.npz", "phantom_001.npz", "phantom_002.npz"]
    assert json.loads((tmp_path / DATASET_FILE).read_text())["shape"] == [24, 32, 40]
    first = load_case(paths[1]).dose

    paths[1].write_bytes(b"truncated by a kill")  # a corrupt leftover is regenerated
    stamp = paths[0].stat().st_mtime_ns
    generate_phantom_dataset(tmp_path, **kwargs)
    np.testing.assert_array_equal(load_case(paths[1]).dose, first)
    assert paths[0].stat().st_mtime_ns == stamp  # valid cases are kept

    with pytest.raises(ValueError, match="dataset.json"):
        generate_phantom_dataset(tmp_path, **{**kwargs, "seed": 7})


SMALL = dict(shape=(24, 32, 40), spacing_mm=(5.0, 8.0, 10.0))


def test_the_protocol_orders_the_structures_and_a_foreign_one_is_refused():
    protocol = {"name": "pelvis_small", "fractions": 20,
                "prescriptions_gy": {"PTV70": 60.0, "PTV56": 48.0},
                "required_targets": ["PTV70", "PTV56"], "oars": ["Bladder", "Rectum"]}
    case = generate_phantom_case(4, **SMALL, protocol=protocol)
    assert case.structures == ["PTV70", "PTV56", "Bladder", "Rectum"]
    assert case.prescriptions_gy == {"PTV70": 60.0, "PTV56": 48.0}
    assert case.meta["fractions"] == 20 and case.meta["protocol"] == "pelvis_small"
    default = generate_phantom_case(4, **SMALL)
    np.testing.assert_array_equal(case.mask("Bladder"), default.mask("Bladder"))
    with pytest.raises(ValueError, match="PTV50.4"):
        generate_phantom_case(4, **SMALL, protocol="prostate_sib3")


def test_a_second_prescription_level_is_planned_and_recorded_per_case(tmp_path):
    low = generate_phantom_case(8, **SMALL, prescriptions_gy={"PTV70": 60.0, "PTV56": 50.0})
    assert abs(np.median(low.dose[_mask(low, "PTV70")]) - 60.0) <= 1.0
    assert abs(np.median(low.dose[_mask(low, "PTV56")]) - 50.0) <= 2.5
    with pytest.raises(ValueError, match="each of the protocol's targets"):
        generate_phantom_case(8, **SMALL, prescriptions_gy={"PTV70": 60.0})

    paths = generate_phantom_dataset(tmp_path, n_cases=6, **SMALL, num_workers=1,
                                     progress=False, second_level_gy={"PTV70": 60.0,
                                                                      "PTV56": 50.0},
                                     second_level_fraction=0.5)
    levels = [load_case(p).prescriptions_gy["PTV70"] for p in paths]
    assert set(levels) == {60.0, 70.0}, levels
    for path, level in zip(paths, levels):
        case = load_case(path)
        assert abs(np.median(case.dose[_mask(case, "PTV70")]) - level) <= 1.0
    record = json.loads((tmp_path / DATASET_FILE).read_text())
    assert record["second_level_gy"] == {"PTV70": 60.0, "PTV56": 50.0}
    with pytest.raises(ValueError, match="dataset.json"):
        generate_phantom_dataset(tmp_path, n_cases=6, **SMALL, num_workers=1, progress=False)


def test_a_folder_recorded_before_the_protocol_keys_existed_stays_valid(tmp_path):
    kwargs = dict(n_cases=1, **SMALL, num_workers=1, progress=False)
    [path] = generate_phantom_dataset(tmp_path, **kwargs)
    full = json.loads((tmp_path / DATASET_FILE).read_text())
    record = dict(full)
    for key in ("protocol", "prescriptions_gy", "second_level_gy", "second_level_fraction"):
        del record[key]
    (tmp_path / DATASET_FILE).write_text(json.dumps(record))
    stamp, data = path.stat().st_mtime_ns, path.read_bytes()
    # accepted (the old folders were these): its case is kept, its record completed
    assert generate_phantom_dataset(tmp_path, **kwargs) == [path]
    assert path.stat().st_mtime_ns == stamp and path.read_bytes() == data
    assert json.loads((tmp_path / DATASET_FILE).read_text()) == full
