"""DICOM-RT ingestion against analytic truth: masks (Dice), dose (1 %), orientations, errors,
patient positions by geometry, what clinics export (arcs, per-beam doses, several series,
varying slice spacing)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import zipfile

import numpy as np
import pytest

from vmatdose.data.beam_model import BeamModelParams
from vmatdose.data.beam_prior import beam_prior_dose
from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import load_case, save_case
from vmatdose.data.ingest.batch import SkipCase, convert_cases
from vmatdose.data.ingest.dicom import (
    DicomIngestError,
    DicomIngestSettings,
    MissingTargetsError,
    ingest_dicom_case,
)
from vmatdose.data.ingest.dicom_plan import hfs_gantry_deg
from vmatdose.data.ingest.rasterize import rasterize_polygons
from vmatdose.data.ingest.structure_names import StructureNameMap
from vmatdose.data.privacy import (
    SaltError,
    anonymous_case_id,
    case_id_for_folder,
    load_case_id_map,
)
from vmatdose.protocol import Protocol

from dicom_builders import (
    ORIENTATIONS,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    SCENE,
    GridSpec,
    PatientSpec,
    dice,
    dicom_uids,
    turned_scene,
    vmat_arc,
    write_patient,
)

CANONICAL = ["PTV70", "PTV56", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel"]
SALT = "test-salt"
PROSTATE = Protocol.load("prostate_sib")
SETTINGS = DicomIngestSettings(protocol=PROSTATE, id_salt=SALT)


def ingest(folder, **settings):
    """Ingest with the prostate protocol and a test salt (``settings`` override)."""
    return ingest_dicom_case(folder, settings=dataclasses.replace(SETTINGS, **settings))


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """HFS and FFS patients of the same anatomy, ingested once."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    for orientation in ("HFS", "FFS"):
        truth = write_patient(root / orientation, PatientSpec(orientation=orientation))
        out[orientation] = (root / orientation, truth, ingest(root / orientation))
    return out


def _variant(tmp_path, **spec) -> tuple:
    folder = tmp_path / "pt"
    return folder, write_patient(folder, PatientSpec(**spec))


# ----------------------------------------------------------------- rasteriser, names


def test_rasterized_ring_with_hole_matches_the_analytic_annulus():
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    outer = np.column_stack([60 + 40 * np.cos(t), 50 + 40 * np.sin(t)])
    inner = np.column_stack([60 + 20 * np.cos(t), 50 + 20 * np.sin(t)])
    mask = rasterize_polygons([outer, inner], (100, 120))
    yy, xx = np.mgrid[0:100, 0:120]
    r = np.hypot(xx - 60, yy - 50)
    assert dice(mask, (r < 40) & (r >= 20)) > 0.98
    assert not mask[50, 60] and mask[50, 60 + 30]


def test_structure_names_are_case_and_separator_insensitive():
    names = StructureNameMap.from_protocol(PROSTATE)
    for roi in ("PTV70", "PTV_70", "PTV 70Gy", "ptv-70"):
        assert names.canonical_name(roi) == "PTV70"
    for roi in ("Femur_L", "FemoralHead_L", "Left Femur", "LEFT FEMUR"):
        assert names.canonical_name(roi) == "Femur_L"
    assert names.canonical_name("External") == "Body"
    assert names.canonical_name("Couch") is None
    with pytest.raises(ValueError, match="maps to both"):
        StructureNameMap.from_dict({"structures": {"A": ["x_1"], "B": ["X 1"]}})


# ----------------------------------------------------------------- analytic truth


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_ingest_reproduces_analytic_ct_masks_and_dose(patients, orientation):
    _, truth, case = patients[orientation]
    assert np.array_equal(case.ct, truth.ct)  # exact through RescaleSlope/Intercept
    assert case.structures == CANONICAL
    for name in CANONICAL:
        assert dice(case.mask(name), truth.masks[name]) > 0.98, name
    assert dice(case.body, truth.masks["Body"]) > 0.98
    ring = case.mask("PTV56")
    assert not np.any(ring & case.mask("PTV70"))  # the hole is empty
    assert truth.masks["Bowel"].sum() > 100 and dice(case.mask("Bowel"), truth.masks["Bowel"]) > 0.98
    relative = np.abs(case.dose - truth.dose) / truth.dose
    assert relative.max() < 0.01  # coarser, offset dose grid resampled onto the CT
    np.testing.assert_allclose(case.origin_mm, [-20.0, -70.0, -80.0])
    np.testing.assert_allclose(case.spacing_mm, [2.5, 2.0, 1.75])


def test_head_first_and_feet_first_give_the_same_canonical_arrays(patients):
    hfs, ffs = patients["HFS"][2], patients["FFS"][2]
    assert np.array_equal(hfs.ct, ffs.ct)
    assert np.array_equal(hfs.masks, ffs.masks) and np.array_equal(hfs.body, ffs.body)
    np.testing.assert_allclose(hfs.dose, ffs.dose, atol=1e-3)
    np.testing.assert_allclose(hfs.origin_mm, ffs.origin_mm)
    assert ffs.meta["dicom"]["image_orientation_patient"] == [-1, 0, 0, 0, 1, 0]


def test_prescriptions_fractions_protocol_and_names_come_from_the_dicom(patients):
    folder, truth, case = patients["HFS"]
    assert case.prescriptions_gy == {"PTV70": 70.0, "PTV56": 56.0}
    assert case.meta["prescription_source"] == "rtplan" and case.fractions == 28
    assert case.meta["protocol"] == "prostate_sib"
    assert case.meta["roi_names"]["Femur_L"] == "Left Femur"
    assert set(case.meta["unmapped_rois"]) == {"CTV70", "Couch"}


def test_case_keeps_no_source_uid_unless_record_sources(patients):
    folder, truth, case = patients["HFS"]
    planted = dicom_uids(folder)
    assert len(planted) > case.shape[0]  # every CT slice, RTSTRUCT, RTDOSE, RTPLAN, ...
    text = json.dumps(case.meta)
    assert not [uid for uid in planted if uid in text]
    recorded = ingest(folder, record_sources=True).meta["dicom"]
    assert recorded["frame_of_reference_uid"] == truth.uids["frame"]
    assert recorded["ct_series_instance_uid"] == truth.uids["ct_series"]
    assert recorded["rtplan_sop_instance_uid"] == truth.uids["plan"]
    assert len(recorded["ct_sop_instance_uids"]) == case.shape[0]


def test_per_beam_doses_are_summed_and_absolute_frame_offsets_read(tmp_path):
    folder, truth = _variant(tmp_path, orientation="FFS", beam_weights=(0.3, 0.7),
                             gfov="absolute")
    case = ingest(folder)
    assert case.meta["dicom"]["dose_summation"] == "BEAM"
    assert case.meta["dicom"]["rtdose_files"] == 2
    assert (np.abs(case.dose - truth.dose) / truth.dose).max() < 0.01


def test_fast_dose_coverage_agrees_with_itk_on_a_partial_dose_grid(tmp_path):
    from vmatdose.data.ingest import dicom_dose
    from vmatdose.data.ingest.dicom_ct import plan_ct_series
    from vmatdose.data.ingest.dicom_files import scan_folder

    partial = GridSpec((5, 30, 35), (3.0, 3.0, 3.3), (-10.0, -30.0, -20.0))
    for orientation in ("HFS", "FFS"):
        folder, _ = _variant(tmp_path / orientation, orientation=orientation, dose_grid=partial)
        files = scan_folder(folder)
        grid = plan_ct_series(files, files.of("CT")).grid
        image, _ = dicom_dose.read_dose_image(files, files.of("RTDOSE")[0][0])
        dose, covered = dicom_dose.resample_to_grid(image, grid)
        assert 0 < covered.sum() < covered.size
        assert np.array_equal(covered, dicom_dose._covered_by_itk(image, grid))
        full = dicom_dose._resample(image, grid.shape, grid.spacing_mm, grid.origin_mm)
        np.testing.assert_allclose(dose, full, atol=1e-4)


def test_prescriptions_from_the_plan_win_and_the_protocol_fills_the_rest(tmp_path):
    folder, _ = _variant(tmp_path, plan_prescriptions={"PTV70": 72.0})
    case = ingest(folder)
    assert case.prescriptions_gy == {"PTV70": 72.0, "PTV56": 56.0}
    assert case.meta["prescription_source"] == "rtplan+protocol"
    assert any("differ from protocol prostate_sib: PTV70 72 Gy" in w
               for w in case.meta["warnings"])
    (folder / "RP_plan.dcm").unlink()
    protocol = dataclasses.replace(PROSTATE, prescriptions_gy={"PTV70": 74.0, "PTV56": 60.0},
                                   fractions=20)
    case = ingest(folder, protocol=protocol)
    assert case.prescriptions_gy == {"PTV70": 74.0, "PTV56": 60.0} and case.fractions == 20
    assert case.meta["prescription_source"] == "protocol"


def test_missing_slice_is_interpolated_and_reported(tmp_path):
    folder, truth = _variant(tmp_path, skip_slices=(7,))
    case = ingest(folder)
    assert case.shape == truth.ct.shape and case.meta["missing_slices"] == 1
    assert any("missing CT slice" in w for w in case.meta["warnings"])
    expected = (truth.ct[6].astype(float) + truth.ct[8]) / 2
    np.testing.assert_allclose(case.ct[7], np.rint(expected), atol=1)
    assert dice(case.mask("PTV70"), truth.masks["PTV70"]) > 0.98


# ----------------------------------------------------------------- privacy


def test_no_patient_name_id_or_birth_date_in_case_file_summary_or_logs(tmp_path, caplog):
    folder, truth = _variant(tmp_path / "in", structures=("Body", "PTV70"))  # skipped
    good, _ = _variant(tmp_path / "in2")
    caplog.set_level(logging.DEBUG)
    jobs = [(case_id_for_folder(f, "s3cret"), f) for f in (folder, good)]
    convert = functools.partial(ingest_dicom_case, settings=SETTINGS)
    summary = convert_cases(jobs, convert, tmp_path / "out", num_workers=1,
                            progress=False, summary_path=tmp_path / "out" / "summary.json",
                            record_sources=False)
    assert summary["counts"]["processed"] == 1 and summary["counts"]["failed"] == 1
    assert "pt: missing required target(s) PTV56" in summary["failed"][0]["error"]
    case_file = tmp_path / "out" / f"{jobs[1][0]}.npz"
    with zipfile.ZipFile(case_file) as archive:
        blob = b"".join(archive.read(name) for name in archive.namelist())
    texts = [blob, (tmp_path / "out" / "summary.json").read_bytes(), caplog.text.encode()]
    uids = dicom_uids(good) | dicom_uids(folder)
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, "Doe", *uids):
        assert not any(secret.encode() in text for text in texts), secret
    case = load_case(case_file)
    assert case.case_id == jobs[1][0] == anonymous_case_id(PATIENT_ID, truth_study(good), "s3cret")


def truth_study(folder) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.glob("CT_*.dcm")), stop_before_pixels=True)
               .StudyInstanceUID)


def test_case_id_mapping_file(tmp_path):
    folder, _ = _variant(tmp_path)
    mapping = tmp_path / "ids.csv"
    mapping.write_text(f"key,case_id\n{PATIENT_ID},prostate_001\n")
    assert case_id_for_folder(folder, id_map=load_case_id_map(mapping)) == "prostate_001"
    mapping.write_text(json.dumps({"pt": "by_folder"}))
    mapping = mapping.rename(tmp_path / "ids.json")
    assert case_id_for_folder(folder, id_map=load_case_id_map(mapping)) == "by_folder"


# ----------------------------------------------------------------- errors and skips


def test_truncated_file_is_a_clear_error_naming_it(tmp_path):
    folder, truth = _variant(tmp_path)
    victim = truth.files["CT"][3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomIngestError, match=victim.name) as err:
        ingest(folder)
    assert err.value.path == victim.name


def test_missing_rtstruct_is_a_clear_error(tmp_path):
    folder, _ = _variant(tmp_path, with_struct=False)
    with pytest.raises(DicomIngestError, match="no RTSTRUCT"):
        ingest(folder)


def test_structure_set_on_another_frame_of_reference_is_refused(tmp_path):
    folder, _ = _variant(tmp_path, struct_frame_uid="1.2.3.4.5.6.7")
    with pytest.raises(DicomIngestError, match="frame of reference") as err:
        ingest(folder)
    assert err.value.path == "RS_structures.dcm"


def test_dose_grid_not_covering_the_targets_is_refused(tmp_path):
    shifted = GridSpec((8, 40, 15), (4.0, 3.0, 3.0), (-20.0, -70.0, -80.0))  # x < -38 mm only
    folder, _ = _variant(tmp_path, dose_grid=shifted)
    with pytest.raises(DicomIngestError, match="does not cover the CT region of PTV70: 100.0 %"):
        ingest(folder)


def test_case_without_the_required_targets_fails_naming_the_folder(tmp_path):
    folder, _ = _variant(tmp_path, structures=("Body", "PTV70", "Rectum"),
                         plan_prescriptions={"PTV70": 70.0})
    with pytest.raises(MissingTargetsError,
                       match=r"^pt: missing required target\(s\) PTV56 \(protocol "
                             r"prostate_sib needs PTV70 and PTV56; found targets: PTV70") as err:
        ingest(folder)
    assert err.value.path == "pt"


def test_empty_salt_is_refused_with_how_to_set_it(tmp_path):
    folder, _ = _variant(tmp_path)
    for salt in ("", "  "):
        with pytest.raises(SaltError, match="export VMATDOSE_ID_SALT="):
            ingest(folder, id_salt=salt)
        with pytest.raises(SaltError, match="pt: not in the case-id map"):
            case_id_for_folder(folder, salt)
    assert ingest_dicom_case(folder, "given_id", dataclasses.replace(SETTINGS, id_salt="")
                             ).case_id == "given_id"  # a mapped id needs no salt
    assert case_id_for_folder(folder, "", id_map={"pt": "mapped"}) == "mapped"


def test_missing_dose_is_a_skip_unless_allowed(tmp_path):
    folder, _ = _variant(tmp_path, with_dose=False)
    with pytest.raises(SkipCase, match="no RTDOSE"):
        ingest(folder)
    case = ingest(folder, require_dose=False)
    assert case.dose is None
    save_case(case, tmp_path / "c.npz")


def test_oblique_orientation_is_a_clear_error(tmp_path):
    import pydicom

    folder, truth = _variant(tmp_path)
    for path in truth.files["CT"]:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
        ds.save_as(path)
    with pytest.raises(DicomIngestError, match="unsupported ImageOrientationPatient"):
        ingest(folder)


# ------------------------------------------------------------------ beam arrangement


def test_rtplan_static_fields_and_an_arc_are_read_back_as_the_case_beams(tmp_path):
    iso_xyz = (12.5, -4.0, 7.5)
    static = [{"gantry_deg": [a], "isocentre_xyz": iso_xyz, "energy_mv": 10.0}
              for a in (0.0, 72.0, 144.0, 216.0, 288.0)]
    static.append({"gantry_deg": [90.0], "isocentre_xyz": iso_xyz, "delivery": "SETUP"})
    _, _ = _variant(tmp_path / "static", beams=tuple(static))
    case = ingest(tmp_path / "static" / "pt")
    beams = case.meta["beams"]
    assert beams["gantry_deg"] == [0.0, 72.0, 144.0, 216.0, 288.0]  # the setup field left out
    assert beams["isocentre_mm"] == [7.5, -4.0, 12.5]  # DICOM (x, y, z) -> case (z, y, x)
    assert (beams["delivery"], beams["source"], beams["energy_mv"]) == ("static", "rtplan", 10.0)

    arc = [{"gantry_deg": [181.0, 270.0, 0.0, 90.0, 179.0], "rotation": "CW",
            "isocentre_xyz": iso_xyz, "couch_deg": 0.0},
           {"gantry_deg": [179.0, 90.0, 0.0], "rotation": "CC", "isocentre_xyz": iso_xyz}]
    _variant(tmp_path / "arc", beams=tuple(arc))
    beams = load_case(save_case(ingest(tmp_path / "arc" / "pt"), tmp_path / "arc.npz")).meta[
        "beams"]
    assert beams["gantry_deg"] == [181.0, 270.0, 0.0, 90.0, 179.0, 179.0, 90.0, 0.0]
    assert beams["couch_deg"] == [0.0] * 8
    assert beams["delivery"] == "arc"


@pytest.mark.parametrize("position, expected", [
    ("FFS", [270.0, 0.0]), ("HFS", [90.0, 0.0]), ("HFP", [270.0, 180.0]),
    ("FFP", [90.0, 180.0])])
def test_rtplan_angles_are_stored_as_the_head_first_supine_direction(tmp_path, position,
                                                                      expected):
    # gantry 90 enters from the patient's left for HFS and FFP, from the right for FFS and
    # HFP; gantry 0 from the back of a prone patient
    beams = tuple({"gantry_deg": [a], "isocentre_xyz": (0.0, 0.0, 0.0)} for a in (90.0, 0.0))
    _variant(tmp_path, orientation=position, beams=beams)
    assert ingest(tmp_path / "pt").meta["beams"]["gantry_deg"] == expected


def test_a_plan_without_beams_leaves_the_case_without_an_arrangement(patients):
    _, _, case = patients["HFS"]
    assert "beams" not in case.meta


# ------------------------------------------------------------------ patient positions

POSITIONS = ("HFS", "FFS", "HFP", "FFP")


def _room_axes(position: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IEC fixed room (X right seen from the couch's foot, Y to the gantry, Z up): the room
    directions of the patient's left, posterior and superior (DICOM LPS) in ``position``."""
    head = np.array([0.0, 1.0, 0.0]) * (1 if position.startswith("HF") else -1)
    front = np.array([0.0, 0.0, 1.0]) * (1 if position.endswith("S") else -1)
    return np.cross(head, front), -front, head


@pytest.mark.parametrize("position", POSITIONS)
def test_each_position_maps_the_gantry_to_the_same_beam_direction_in_the_patient(position):
    left, posterior, superior = _room_axes(position)
    for gantry in np.arange(0.0, 360.0, 15.0):
        a = np.deg2rad(gantry)
        beam = -np.array([np.sin(a), 0.0, np.cos(a)])  # from the source to the isocentre
        b = np.deg2rad(hfs_gantry_deg(gantry, position))
        # the head-first-supine beam of angle b travels along (dy, dx) = (cos b, -sin b)
        np.testing.assert_allclose([np.cos(b), -np.sin(b)], [beam @ posterior, beam @ left],
                                   atol=1e-9)
    # the CT's image rows run along room X, its columns down (-Z): the orientation the
    # builders write for the position is that geometry in patient axes
    rows = [np.array([1.0, 0.0, 0.0]) @ axis for axis in (left, posterior, superior)]
    cols = [np.array([0.0, 0.0, -1.0]) @ axis for axis in (left, posterior, superior)]
    assert tuple(rows + cols) == ORIENTATIONS[position]


def _centre_xyz(spec: PatientSpec) -> tuple[float, float, float]:
    z = spec.ct.axes()[0]
    return (*spec.ct.centre_xy(), float((z[0] + z[-1]) / 2))


@pytest.fixture(scope="module")
def positioned(tmp_path_factory):
    """One anatomy in each patient position, a plan of fields at gantry 0, 90 and 270."""
    root = tmp_path_factory.mktemp("positions")
    out = {}
    for position in POSITIONS:
        spec = PatientSpec(orientation=position)
        spec.beams = tuple({"gantry_deg": [a], "isocentre_xyz": _centre_xyz(spec)}
                           for a in (0.0, 90.0, 270.0))
        write_patient(root / position, spec)
        out[position] = ingest(root / position)
    return out


@pytest.mark.parametrize("position", ["HFP", "FFP"])
def test_prone_series_land_on_the_same_canonical_grid(positioned, position):
    hfs, prone = positioned["HFS"], positioned[position]
    assert prone.meta["dicom"]["patient_position"] == position
    assert np.array_equal(prone.ct, hfs.ct)
    assert np.array_equal(prone.masks, hfs.masks) and np.array_equal(prone.body, hfs.body)
    np.testing.assert_allclose(prone.dose, hfs.dose, atol=1e-3)
    np.testing.assert_allclose(prone.origin_mm, hfs.origin_mm)


# the side a physicist expects gantry 0, 90 and 270 (the plan's fields) to enter from
ENTRY = {"HFS": ("anterior", "left", "right"), "FFS": ("anterior", "right", "left"),
         "HFP": ("posterior", "right", "left"), "FFP": ("posterior", "left", "right")}
# organs on each side of the scene: the left femoral head ("Left Femur") at x = +55 mm,
# the right at -38 mm; the bladder in front (y = -36 mm), the rectum behind (+36 mm)
MARKERS = {"left": ("Femur_L", "Femur_R"), "right": ("Femur_R", "Femur_L"),
           "anterior": ("Bladder", "Rectum"), "posterior": ("Rectum", "Bladder")}


@pytest.mark.parametrize("position", POSITIONS)
def test_each_field_enters_on_the_side_a_physicist_expects(positioned, position):
    case = positioned[position]
    beams = BeamArrangement.from_meta(case.meta["beams"])
    for gantry, side in zip(beams.gantry_deg, ENTRY[position]):
        field = BeamArrangement((gantry,), (0.0,), beams.isocentre_mm)
        prior = beam_prior_dose(case.ct, case.body, case.mask("PTV70")[None], [70.0],
                                case.spacing_mm, case.origin_mm, field)
        near, far = (float(prior[case.mask(name) > 0].mean()) for name in MARKERS[side])
        assert near > 1.2 * far > 0, (position, gantry, side)


def _off_centre_cube():
    """(ct, body, target (1, Z, Y, X), isocentre) on a grid centred on 0 mm: a water block
    with a target off towards the posterior left."""
    spacing, shape = (2.0, 2.0, 2.0), (10, 48, 48)
    origin = tuple(-(n - 1) * s / 2 for n, s in zip(shape, spacing))
    z, y, x = np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(origin, spacing, shape)],
                          indexing="ij")
    body = (np.abs(y) <= 36) & (np.abs(x) <= 40)
    target = (np.abs(y - 10) <= 6) & (np.abs(x - 16) <= 6) & (np.abs(z) <= 5)
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    return ct, body, target[None], (0.0, 10.0, 16.0), spacing, origin


@pytest.mark.parametrize("supine, prone", [("HFS", "HFP"), ("FFS", "FFP")])
def test_a_prone_patients_prior_is_the_supine_one_turned_about_the_head_feet_axis(supine,
                                                                                   prone):
    # the same room, the same machine angles: the prone patient is the supine one turned
    # 180 degrees about the head-feet axis, so its anatomy and its dose in its own axes
    # are the supine ones turned 180 degrees about z (y -> -y, x -> -x)
    ct, body, target, iso, spacing, origin = _off_centre_cube()
    params = BeamModelParams(scatter_sigma_mm=2.0)
    machine = (30.0, 100.0, 215.0)

    def prior(ct, body, target, iso, position, to_hfs=hfs_gantry_deg):
        beams = BeamArrangement(tuple(to_hfs(a, position) for a in machine), (0.0,) * 3, iso)
        return beam_prior_dose(ct, body, target, [1.0], spacing, origin, beams, params)

    turned = (ct[:, ::-1, ::-1].copy(), body[:, ::-1, ::-1].copy(),
              target[:, :, ::-1, ::-1].copy(), (iso[0], -iso[1], -iso[2]))
    expected = prior(ct, body, target, iso, supine)[:, ::-1, ::-1]
    got = prior(*turned, prone)
    assert expected.max() > 0.9
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # a front-back mirror (the old HFP 180 - a, FFP 180 + a) gives another dose here
    mirrored = prior(*turned, prone, lambda a, p: (180.0 - a) if p == "HFP" else (180.0 + a))
    assert np.abs(mirrored - expected).max() > 0.3


def test_a_prone_dicom_patients_prior_is_the_supine_one_turned(tmp_path):
    # the HFS patient and, in the same place of the room, the HFP one: the same machine
    # angles give the same room dose, so in patient axes the prone prior is the supine one
    # turned 180 degrees about the head-feet axis (canonical arrays flipped in y and x)
    cases = {}
    for position, scene in (("HFS", SCENE), ("HFP", turned_scene(SCENE))):
        spec = PatientSpec(orientation=position, scene=scene, ct_hu=0.0)
        spec.beams = tuple({"gantry_deg": [a], "isocentre_xyz": _centre_xyz(spec)}
                           for a in (30.0, 100.0, 215.0))
        write_patient(tmp_path / position, spec)
        cases[position] = ingest(tmp_path / position)
    supine, prone = cases["HFS"], cases["HFP"]
    assert np.array_equal(prone.ct, supine.ct[:, ::-1, ::-1])
    assert dice(prone.mask("PTV70"), supine.mask("PTV70")[:, ::-1, ::-1]) > 0.99

    def prior(case):
        return beam_prior_dose(case.ct, case.body, case.mask("PTV70")[None], [70.0],
                               case.spacing_mm, case.origin_mm,
                               BeamArrangement.from_meta(case.meta["beams"]))

    expected = prior(supine)[:, ::-1, ::-1]
    np.testing.assert_allclose(prior(prone), expected, atol=1e-3 * expected.max())


# ------------------------------------------------------------------ what clinics export


@pytest.mark.parametrize("position, arcs, counts, sign", [
    ("HFS", [(181.0, 179.0, "CW", 2.0), (179.0, 181.0, "CC", 4.0)], [180, 91], (1, -1)),
    ("FFS", [(181.0, 179.0, "CW", 3.0)], [121], (-1,)),  # feet first: it turns the other way
])
def test_vmat_arcs_record_every_control_point_in_their_direction(tmp_path, position, arcs,
                                                                   counts, sign):
    spec = PatientSpec(orientation=position, beam_weights=(1.0,) if len(arcs) == 1
                       else (0.45, 0.55))
    spec.beams = tuple({"gantry_deg": vmat_arc(*arc), "rotation": arc[2],
                        "isocentre_xyz": _centre_xyz(spec)} for arc in arcs)
    write_patient(tmp_path / "pt", spec)
    beams = ingest(tmp_path / "pt").meta["beams"]
    assert [len(vmat_arc(*arc)) for arc in arcs] == counts  # 358 degrees each
    assert len(beams["gantry_deg"]) == sum(counts) and beams["delivery"] == "arc"
    start = 0
    for count, arc, direction in zip(counts, arcs, sign):
        angles = np.asarray(beams["gantry_deg"][start:start + count])
        step = (np.diff(angles) + 180.0) % 360.0 - 180.0  # signed, degrees
        assert np.all(np.sign(step) == direction)
        np.testing.assert_allclose(np.abs(step[:-1]), arc[3], atol=1e-6)
        assert angles[0] == hfs_gantry_deg(arc[0], position)
        start += count


def test_an_arcs_beam_off_sector_is_left_out(tmp_path):
    # an avoidance sector: no meterset between gantry 40 and 80 (the segments inside it)
    angles = np.asarray(vmat_arc(181.0, 179.0, "CW", 2.0))
    off = (angles[:-1] >= 40) & (angles[:-1] <= 80) & (angles[1:] >= 40) & (angles[1:] <= 80)
    cumulative = np.concatenate([[0.0], np.cumsum(np.where(off, 0.0, 1.0))])
    spec = PatientSpec()
    spec.beams = ({"gantry_deg": list(angles), "rotation": "CW", "isocentre_xyz":
                   _centre_xyz(spec), "meterset": list(cumulative / cumulative[-1])},)
    write_patient(tmp_path / "pt", spec)
    case = ingest(tmp_path / "pt")
    kept = np.asarray(case.meta["beams"]["gantry_deg"])
    # the points are at odd angles: 41 and 79 start and end the sector's segments, the 18
    # between (43, 45, ..., 77) deliver nothing on either side
    assert len(kept) == 180 - 18
    assert not np.any((kept > 41) & (kept < 79)) and {41.0, 79.0} <= set(kept.tolist())
    assert ("RTPLAN arcs: 18 control point(s) in beam-off sectors (no meterset on either "
            "side) left out of the beam arrangement") in case.meta["warnings"]


def _dose_of_each_file(folder):
    from vmatdose.data.ingest import dicom_dose
    from vmatdose.data.ingest.dicom_ct import plan_ct_series
    from vmatdose.data.ingest.dicom_files import scan_folder

    files = scan_folder(folder)
    grid = plan_ct_series(files, files.of("CT")).grid
    return {path.name: dicom_dose.resample_to_grid(dicom_dose.read_dose_image(files, path)[0],
                                                   grid)[0]
            for path, _ in files.of("RTDOSE")}


def test_per_beam_doses_sum_to_the_plan_dose_with_a_warning(tmp_path):
    folder, truth = _variant(tmp_path, beam_weights=(0.2, 0.3, 0.5))
    case = ingest(folder)
    each = _dose_of_each_file(folder)
    assert sorted(each) == ["RD_0.dcm", "RD_1.dcm", "RD_2.dcm"]
    np.testing.assert_allclose(case.dose, sum(each.values()), atol=1e-4)
    assert (np.abs(case.dose - truth.dose) / truth.dose).max() < 0.01
    assert ("no plan-summed RTDOSE: summed 3 per-beam RTDOSEs (DoseSummationType BEAM; one "
            "per treatment beam of the RTPLAN)") in case.meta["warnings"]
    (folder / "RP_plan.dcm").unlink()
    unchecked = ingest(folder)
    np.testing.assert_allclose(unchecked.dose, case.dose, atol=1e-6)
    assert ("no plan-summed RTDOSE: summed 3 per-beam RTDOSEs (DoseSummationType BEAM; no "
            "RTPLAN of theirs to check that every beam has one)") in unchecked.meta["warnings"]


def _copy_dose(path, name, **changes):
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path.parent / name)


def test_the_plan_dose_wins_over_per_beam_doses_and_two_plan_doses_are_refused(tmp_path):
    import pydicom

    folder, truth = _variant(tmp_path, beam_weights=(0.3, 0.7), plan_dose_too=True)
    beam = pydicom.dcmread(folder / "RD_0.dcm")  # a wrong per-beam dose: unused
    beam.DoseGridScaling = float(beam.DoseGridScaling) * 3
    beam.save_as(folder / "RD_0.dcm")
    case = ingest(folder)
    assert case.meta["dicom"]["dose_summation"] == "PLAN"
    assert (np.abs(case.dose - truth.dose) / truth.dose).max() < 0.01
    assert ("used the plan dose RD_plan.dcm; ignored 2 per-beam/fraction RTDOSE(s) beside it"
            in case.meta["warnings"])
    _copy_dose(folder / "RD_plan.dcm", "RD_plan_recalc.dcm")
    with pytest.raises(DicomIngestError, match=r"several plan-summed RTDOSEs for one plan "
                                               r"\(RD_plan.dcm, RD_plan_recalc.dcm\)"):
        ingest(folder)


def test_per_beam_doses_missing_a_beam_or_twice_one_beam_are_refused(tmp_path):
    import pydicom

    folder, _ = _variant(tmp_path, beam_weights=(0.2, 0.3, 0.5))
    _copy_dose(folder / "RD_0.dcm", "RD_0_copy.dcm")
    with pytest.raises(DicomIngestError, match="two per-beam RTDOSEs of beam 1"):
        ingest(folder)
    (folder / "RD_0_copy.dcm").unlink()
    (folder / "RD_1.dcm").unlink()
    with pytest.raises(DicomIngestError, match=r"per-beam RTDOSEs of beams \[1, 3\] but the "
                                               r"RTPLAN has treatment beams \[1, 2, 3\]"):
        ingest(folder)
    plan = pydicom.dcmread(folder / "RP_plan.dcm")  # a plan that only counts its beams
    del plan.FractionGroupSequence[0].ReferencedBeamSequence
    plan.save_as(folder / "RP_plan.dcm")
    with pytest.raises(DicomIngestError, match="per-beam RTDOSEs of 2 beams but the RTPLAN "
                                               "has 3 treatment beams"):
        ingest(folder)


@pytest.mark.parametrize("names_series", [True, False])
def test_of_several_ct_series_the_one_the_rtstruct_references_is_used(tmp_path, names_series):
    # the other series share the frame of reference and the geometry (CT + 100, + 200 HU):
    # only the RTSTRUCT's series reference, or its contours' images, single one out
    folder, truth = _variant(tmp_path, extra_ct_series=2, struct_names_series=names_series)
    case = ingest(folder, record_sources=True)
    assert np.array_equal(case.ct, truth.ct)
    assert case.meta["dicom"]["ct_series_instance_uid"] == truth.uids["ct_series"]
    assert case.meta["dicom"]["ct_slices"] == 16
    said = [w for w in case.meta["warnings"] if w.startswith("3 CT series")]
    assert said == ["3 CT series in the patient folder: used the one the RTSTRUCT references "
                    f"(16 slices, e.g. {min(p.name for p in truth.files['CT'])}); ignored 2 "
                    "other series (32 files)"]


def test_several_ct_series_without_a_reference_are_refused(tmp_path):
    import pydicom

    folder, truth = _variant(tmp_path, extra_ct_series=1, struct_names_series=False)
    path = truth.files["RTSTRUCT"][0]
    ds = pydicom.dcmread(path)
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            del contour.ContourImageSequence
    ds.save_as(path)
    with pytest.raises(DicomIngestError, match="2 CT series in the patient folder and the "
                                               "RTSTRUCT does not single one out"):
        ingest(folder)


def test_slice_spacing_varying_within_the_series_is_resampled_and_said(tmp_path):
    fine = GridSpec((31, 72, 96), (1.0, 2.0, 1.75), (-20.0, -70.0, -80.0))
    kept = [*range(0, 13, 2), *range(15, 31, 3)]  # 2 mm gaps, then 3 mm gaps
    folder, truth = _variant(tmp_path, ct=fine,
                             skip_slices=tuple(sorted(set(range(31)) - set(kept))))
    case = ingest(folder)
    assert ("CT slice spacing varies within the series (2.00 to 3.00 mm between 13 slices): "
            "resampled to a uniform 2.00 mm (16 slices; CT linear, contours from the nearest "
            "stored slice)") in case.meta["warnings"]
    assert case.shape == (16, 72, 96) and case.meta["dicom"]["ct_slices"] == 13
    np.testing.assert_allclose(case.spacing_mm, [2.0, 2.0, 1.75])
    np.testing.assert_allclose(case.origin_mm, [-20.0, -70.0, -80.0])
    # the grid's slices lie on every other 1 mm slice of the truth; the CT is linear in z
    # inside the body, so interpolating between the stored slices gives it back
    np.testing.assert_allclose(case.ct, truth.ct[::2], atol=1)
    assert (np.abs(case.dose - truth.dose[::2]) / truth.dose[::2]).max() < 0.01
    for name in ("PTV70", "PTV56", "Rectum"):
        assert dice(case.mask(name), truth.masks[name][::2]) > 0.9, name


def test_varying_slice_spacing_onto_a_training_grid_gives_the_ct_grid_case_cropped(tmp_path):
    """A resampled series on a training grid of the same spacing: the grid is a crop of the
    uniform CT grid (same corner), so CT and masks are those of the CT-grid case there."""
    from vmatdose.data.ingest.training_grid import GridSettings
    fine = GridSpec((31, 72, 96), (1.0, 2.0, 1.75), (-20.0, -70.0, -80.0))
    kept = [*range(0, 13, 2), *range(15, 31, 3)]
    folder, _ = _variant(tmp_path, ct=fine, skip_slices=tuple(sorted(set(range(31)) - set(kept))))
    on_ct = ingest(folder)
    on_grid = ingest(folder, grid=GridSettings((2.0, 2.0, 1.75), margin_mm=4.0))
    assert on_grid.meta["grid"] == "training" and on_grid.shape < on_ct.shape
    offset = np.rint((np.asarray(on_grid.origin_mm) - on_ct.origin_mm)
                     / np.asarray(on_ct.spacing_mm)).astype(int)
    crop = tuple(slice(o, o + n) for o, n in zip(offset, on_grid.shape))
    np.testing.assert_allclose(on_grid.ct, on_ct.ct[crop], atol=1)
    for name in ("PTV70", "PTV56", "Rectum"):
        assert dice(on_grid.mask(name), on_ct.mask(name)[crop]) == 1.0, name


def test_patients_of_their_own_identity_are_distinct_cases(tmp_path):
    """Two patients written with their own name and ID (as the scale benchmark writes a
    clinic): every file carries its patient's identity, the two share no UID, each one's
    RTSTRUCT and RTDOSE point at its own CT and RTPLAN, and ingest makes two cases with
    their own ids and none of the identity."""
    import pydicom

    folders, cases = {}, {}
    for n in (1, 2):
        folder = tmp_path / f"pt{n}"
        write_patient(folder, PatientSpec(patient_name=f"Bench^P{n}", patient_id=f"B-{n}"))
        folders[n], cases[n] = folder, ingest(folder)
    assert not dicom_uids(folders[1]) & dicom_uids(folders[2])
    for n, folder in folders.items():
        files = {p.name: pydicom.dcmread(p, stop_before_pixels=True)
                 for p in folder.glob("*.dcm")}
        assert {(str(ds.PatientName), ds.PatientID) for ds in files.values()} == {
            (f"Bench^P{n}", f"B-{n}")}
        cts = [ds for name, ds in files.items() if name.startswith("CT_")]
        structure_set, dose, plan = files["RS_structures.dcm"], files["RD_0.dcm"], files[
            "RP_plan.dcm"]
        frame = structure_set.ReferencedFrameOfReferenceSequence[0]
        series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == cts[0].SeriesInstanceUID
        assert {ref.ReferencedSOPInstanceUID for ref in series.ContourImageSequence} == {
            ds.SOPInstanceUID for ds in cts}
        assert {frame.FrameOfReferenceUID, dose.FrameOfReferenceUID} == {
            ds.FrameOfReferenceUID for ds in cts}
        assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
        assert cases[n].case_id == anonymous_case_id(f"B-{n}", truth_study(folder), SALT)
        meta = json.dumps(cases[n].meta)
        assert f"B-{n}" not in meta and "Bench" not in meta
    assert cases[1].case_id != cases[2].case_id
    assert dice(cases[1].masks[0], cases[2].masks[0]) == 1.0  # the same anatomy, two people
