"""One model, one patient, two routes: the OpenKBP case file and the same patient written
as a clinic's DICOM (1.2 mm in-plane, its own RTDOSE grid and RTPLAN) and ingested back
give the same dose within the interpolation floor (experiments/route_invariance.md)."""

from __future__ import annotations

import logging
from dataclasses import replace

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from openkbp_as_dicom import clinical_grid, write_case_as_dicom

from vmatdose.config import CONFIG_DIR
from vmatdose.data.body_region import EXTERNAL, POSSIBLE_DOSE_MASK
from vmatdose.data.case import Case, load_case, save_case
from vmatdose.data.grid_rule import OPENKBP
from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
from vmatdose.data.ingest.openkbp import import_openkbp_patient
from vmatdose.data.ingest.training_grid import GridSettings
from vmatdose.data.pipeline import inference_transform
from vmatdose.data.resample import Grid, resample_volume
from vmatdose.data.validation import SpacingRange
from vmatdose.inference import Predictor
from vmatdose.inference.checkpoint import training_contract
from vmatdose.inference.dicom_input import ingest_for_prediction
from vmatdose.protocol import Protocol

from conftest import OPENKBP_SAMPLE

pytestmark = pytest.mark.skipif(not OPENKBP_SAMPLE.is_dir(),
                                reason=f"OpenKBP sample not found at {OPENKBP_SAMPLE}")
#: The issue's bound on the mean difference inside the possible-dose mask (Gy); the
#: interpolation alone (the prediction on the OpenKBP grid taken to the DICOM grid and
#: back) accounts for 0.3-0.9 Gy of it with this three-step model.
BOUND_GY = 1.0
#: What may remain beyond that interpolation: the CT interpolated twice (Gy). Trained
#: recipe checkpoints give 0.32-0.36 Gy on this case (whole volumes 0.356, the body's box
#: 0.320) and 0.35-0.45 Gy on validation patients (experiments/route_invariance.md); the
#: three-step model here 0.40 (the failure it guards against: more than 2 Gy).
BEYOND_INTERPOLATION_GY = 0.45


def cropped(case: Case, shape=(24, 128, 128)) -> Case:
    """The box of ``shape`` voxels centred on the targets (origin moved with it); the
    default keeps the whole field of view in-plane, as OpenKBP's arrays do (their grid
    rule: 128 voxels across the CT's field of view)."""
    targets = case.masks[[case.structures.index(t) for t in case.prescriptions_gy]].any(0)
    centre = np.round(np.argwhere(targets).mean(0)).astype(int)
    start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, shape, case.shape)]
    box = tuple(slice(a, a + n) for a, n in zip(start, shape))
    keep = [i for i, mask in enumerate(case.masks) if mask[box].any()]
    return Case(case_id=case.case_id, ct=case.ct[box], masks=case.masks[(keep, *box)],
                structures=[case.structures[i] for i in keep], body=case.body[box], spacing_mm=case.spacing_mm,
                origin_mm=case.origin_mm + np.asarray(start) * case.spacing_mm,
                prescriptions_gy=case.prescriptions_gy, dose=case.dose[box], meta=case.meta)


def tiny_model(case_path, case: Case):
    """The experiment=openkbp_cpu recipe (beam prior, half resolution, correction to the
    prior, zeroing) with a 4-8-8 U-Net, three Adam steps on the case, and its contract."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.root_dir={case_path.parent}", f"paths.output_dir={case_path.parent}/run",
            "experiment=openkbp_cpu", "model.net.channels=[4,8,8]", "model.net.strides=[2,2]",
            "model.tta=null"])
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss))
    contract = training_contract(cfg, SpacingRange.of([case.spacing_mm]), case_path.parent,
                                 {"train": [case.case_id], "val": [], "test": []},
                                 [POSSIBLE_DOSE_MASK], OPENKBP)
    module.contract = contract.to_dict()
    sample = inference_transform({**contract.inputs, "structures": contract.structures,
                                  "prescriptions_gy": cfg.protocol.prescriptions_gy,
                                  "beams": cfg.protocol.beams}, with_dose=True)(
        {"path": str(case_path), "case": case})
    pool = torch.nn.AvgPool3d(2)
    batch = {key: pool(sample[key][None]) for key in ("image", "dose", "body")}
    batch.update(dose_scale_gy=torch.tensor([70.0]), spacing_mm=sample["spacing_mm"][None] * 2,
                 masks=pool(sample["masks"][None]))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.log = lambda *args, **kwargs: None
    for _ in range(3):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Predictor(module.eval(), contract)


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    case = cropped(import_openkbp_patient(OPENKBP_SAMPLE / "train-pats" / "pt_1"))
    openkbp_path = save_case(case, root / "cases" / "openkbp.npz")
    written = write_case_as_dicom(case, root / "dicom" / "pt_1", clinical_grid(case, 1.2),
                                  body="possible_dose")
    settings = DicomIngestSettings(protocol=Protocol.load("head_neck"))
    dicom_case = ingest_dicom_case(root / "dicom" / "pt_1", "dicom", settings)
    dicom_path = save_case(dicom_case, root / "cases" / "dicom.npz")
    return case, openkbp_path, dicom_case, dicom_path, written, tiny_model(openkbp_path, case)


def on_openkbp_grid(dose: np.ndarray, case: Case, openkbp: Case) -> np.ndarray:
    return resample_volume(dose, Grid.of(case), Grid.of(openkbp))


def round_trip(dose: np.ndarray, openkbp: Case, case: Case) -> np.ndarray:
    """An OpenKBP-grid dose taken to ``case``'s grid and back: what the interpolation
    alone does to it."""
    return on_openkbp_grid(resample_volume(dose, Grid.of(openkbp), Grid.of(case)), case,
                           openkbp)


def test_the_dicom_route_ingests_the_same_patient(routes):
    case, _, dicom_case, _, written, _ = routes
    assert dicom_case.shape == written.grid.shape and dicom_case.spacing_mm[1] == 1.2
    assert dicom_case.meta["beams"]["gantry_deg"] == case.meta["beams"]["gantry_deg"]
    np.testing.assert_allclose(dicom_case.meta["beams"]["isocentre_mm"],
                               case.meta["beams"]["isocentre_mm"], atol=1e-6)
    assert dicom_case.prescriptions_gy == case.prescriptions_gy
    inside = case.body > 0
    dose_back = on_openkbp_grid(dicom_case.dose, dicom_case, case)
    assert np.abs(dose_back - case.dose)[inside].mean() < 1.5  # the reference's own floor


def test_one_model_predicts_the_same_dose_by_both_routes(routes, caplog):
    case, openkbp_path, dicom_case, dicom_path, _, predictor = routes
    assert predictor.module.target_dose_floor == 0.97  # the recipe's floor, in both routes
    inside = case.body > 0
    with caplog.at_level(logging.WARNING, logger="vmatdose.inference.predictor"):
        by_arrays = predictor.predict(openkbp_path).dose_gy
        assert not caplog.records
        by_dicom = predictor.predict(dicom_path).dose_gy
    assert by_dicom.shape == dicom_case.shape
    assert by_arrays[inside].mean() > 10.0  # a dose, not zeros
    back = on_openkbp_grid(by_dicom, dicom_case, case)
    assert np.abs(back - by_arrays)[inside].mean() < BOUND_GY
    # the same two interpolations applied to the arrays' dose: the routes' inputs agree
    assert np.abs(back - round_trip(by_arrays, case, dicom_case))[inside].mean() \
        < BEYOND_INTERPOLATION_GY
    # the predictor says the DICOM case's body is another region than it trained on
    assert len(caplog.records) == 1
    assert f"its body is the {EXTERNAL} but the model was trained on cases whose body " \
           f"is the {POSSIBLE_DOSE_MASK}" in caplog.records[0].getMessage()


def test_both_routes_give_the_network_the_same_box(routes):
    """The recipe's network sees the body's box (``model.body_crop_margin``): the DICOM
    case on the rule's grid yields the arrays' box, smaller than the grid."""
    _, openkbp_path, _, dicom_path, _, predictor = routes
    assert predictor.module.body_crop_margin == 2
    boxes = []
    for path in (openkbp_path, dicom_path):
        work = predictor.on_training_grid(load_case(path))
        body = predictor.transform({"path": str(path), "case": work})["body"][None]
        boxes.append(predictor.module.inference.body_box(body))
    assert boxes[0] is not None and boxes[0] == boxes[1]
    assert boxes[0][1].stop - boxes[0][1].start < 64  # y: 32 of the 64 network voxels


def test_inputs_built_off_the_training_grid_would_change_the_dose(routes):
    """Without resampling the case first (prior and masks built at 1.2 mm, as before),
    the same model gives another dose: the invariance above is not a matter of luck."""
    case, openkbp_path, dicom_case, dicom_path, _, predictor = routes
    native = Predictor(predictor.module, replace(predictor.contract, grid_rule={}))
    native.spacing = SpacingRange.of([dicom_case.spacing_mm])
    by_arrays = predictor.predict(openkbp_path).dose_gy
    at_native = native.predict(dicom_path).dose_gy
    inside = case.body > 0
    assert np.abs(on_openkbp_grid(at_native, dicom_case, case) - by_arrays)[inside].mean() \
        > 2 * BOUND_GY


def test_the_grid_rule_puts_the_dicom_case_where_the_arrays_are(routes):
    """The model records its data's grid rule (OpenKBP: 128 voxels across the CT's field
    of view, the CT's slices); the DICOM case (1.2 mm) is predicted on the grid the rule
    gives its CT, i.e. the arrays' grid, not on the training median."""
    case, _, dicom_case, _, _, predictor = routes
    assert predictor.contract.grid_rule_obj == OPENKBP
    work = predictor.on_training_grid(dicom_case)
    np.testing.assert_allclose(work.spacing_mm, case.spacing_mm, rtol=2e-3)
    assert predictor.on_training_grid(case) is case


def test_a_rule_spacing_off_the_training_range_is_predicted_with_a_warning(routes, caplog):
    """The rule gives this CT its arrays' 3.9 mm; a model trained only at 2.5-3 mm in-plane
    is told so, naming the case, and still predicts on the rule's grid."""
    case, _, dicom_case, _, _, predictor = routes
    narrow = Predictor(predictor.module, predictor.contract)
    narrow.spacing = SpacingRange.of([(2.5, 2.5, 2.5), (2.5, 3.0, 3.0)])
    with caplog.at_level(logging.WARNING, logger="vmatdose.inference.predictor"):
        work = narrow.on_training_grid(dicom_case)
    np.testing.assert_allclose(work.spacing_mm, case.spacing_mm, rtol=2e-3)
    (record,) = caplog.records
    assert record.getMessage().startswith(f"{dicom_case.case_id}: the training data's grid "
                                          "rule (in-plane the CT's field of view / 128")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vmatdose.inference.predictor"):
        predictor.on_training_grid(dicom_case)  # in range: no word
    assert not caplog.records


def test_a_model_of_mixed_spacings_predicts_one_dose_by_its_grid_rule(routes):
    """Trained on spacings from the arrays' own to 1.3 times it, a model without a grid
    rule predicts the arrays (inside that range) as they are under ``resample`` (the
    default) but the DICOM case (1.2 mm, outside it) at the median: two grids, two doses
    (experiments/route_invariance.md, cause 4). With OpenKBP's rule the DICOM case goes
    on the grid its CT's field of view gives, the arrays' own: one dose by default, as
    with ``training_grid`` (every case on the median)."""
    case, openkbp_path, dicom_case, dicom_path, _, trained = routes
    mixed = SpacingRange.of([case.spacing_mm, 1.3 * np.asarray(case.spacing_mm)])
    inside = case.body > 0

    def difference(predictor: Predictor) -> float:
        predictor.spacing = mixed
        by_arrays = predictor.predict(openkbp_path).dose_gy
        by_dicom = on_openkbp_grid(predictor.predict(dicom_path).dose_gy, dicom_case, case)
        return float(np.abs(by_dicom - by_arrays)[inside].mean())

    without_rule = replace(trained.contract, grid_rule={})
    two_grids = difference(Predictor(trained.module, without_rule))  # resample
    one_grid = difference(Predictor(trained.module, without_rule, "training_grid"))
    by_rule = difference(Predictor(trained.module, trained.contract))  # resample
    assert one_grid < BOUND_GY and by_rule < BOUND_GY
    assert two_grids > by_rule + 0.2


def test_predict_dicom_ingests_straight_onto_the_rules_grid(routes, tmp_path):
    """``predict dicom_dir=`` puts the patient on the rule's grid at ingest (one CT
    interpolation; the whole field of view, as the arrays: a cropped volume changes an
    instance-normalised network's statistics): the arrays' grid, and the same dose."""
    case, openkbp_path, _, _, _, predictor = routes
    dicom_dir = openkbp_path.parents[1] / "dicom"
    cases = ingest_for_prediction(dicom_dir, predictor, tmp_path, "salt", None)
    (path,) = cases
    ingested = load_case(path)
    np.testing.assert_allclose(ingested.spacing_mm, case.spacing_mm, rtol=2e-3)
    assert ingested.shape == case.shape
    assert predictor.on_training_grid(ingested) is ingested
    by_dicom = on_openkbp_grid(predictor.predict(path).dose_gy, ingested, case)
    by_arrays = predictor.predict(openkbp_path).dose_gy
    inside = case.body > 0
    assert np.abs(by_dicom - by_arrays)[inside].mean() < BOUND_GY


def test_a_case_cropped_to_its_body_goes_back_on_the_whole_field_of_view(routes, tmp_path):
    """A DICOM case preprocessed onto a training grid and cropped to its body + 10 mm (as
    ``preprocess source=dicom`` writes it; here at 3.9 mm, so that only the crop differs
    from the arrays: a finer grid adds a second CT interpolation, 0.8 Gy at 1.2 mm and
    1.3 Gy at 2.0 mm for this barely trained model) is predicted on the rule's grid over
    its CT's whole field of view, air around it: the arrays' grid and dose (cropped, the
    same model's instance normalisation moved it by 10.8 Gy)."""
    case, openkbp_path, _, _, _, predictor = routes
    settings = DicomIngestSettings(protocol=Protocol.load("head_neck"),
                                   grid=GridSettings(spacing_mm=(2.5, 3.9, 3.9)))
    cropped_case = ingest_dicom_case(openkbp_path.parents[1] / "dicom" / "pt_1", "c", settings)
    assert cropped_case.shape[1] < 100 and cropped_case.shape[2] < 100  # cropped
    path = save_case(cropped_case, tmp_path / "c.npz")
    work = predictor.on_training_grid(cropped_case)
    assert work.shape == case.shape
    np.testing.assert_allclose(work.origin_mm, case.origin_mm, atol=0.5)
    by_dicom = on_openkbp_grid(predictor.predict(path).dose_gy, cropped_case, case)
    by_arrays = predictor.predict(openkbp_path).dose_gy
    inside = case.body > 0
    assert np.abs(by_dicom - by_arrays)[inside].mean() < BOUND_GY
