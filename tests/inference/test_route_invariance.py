"""One model, one patient, two routes: the OpenKBP case file and the same patient written
as a clinic's DICOM (1.2 mm in-plane, its own RTDOSE grid and RTPLAN) and ingested back
give the same dose within the interpolation floor (experiments/route_invariance.md)."""

from __future__ import annotations

import logging

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from openkbp_as_dicom import clinical_grid, write_case_as_dicom

from vmatdose.config import CONFIG_DIR
from vmatdose.data.body_region import EXTERNAL, POSSIBLE_DOSE_MASK
from vmatdose.data.case import Case, save_case
from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
from vmatdose.data.ingest.openkbp import import_openkbp_patient
from vmatdose.data.pipeline import inference_transform
from vmatdose.data.resample import Grid, resample_volume
from vmatdose.data.validation import SpacingRange
from vmatdose.inference import Predictor
from vmatdose.inference.checkpoint import training_contract
from vmatdose.protocol import Protocol

from conftest import OPENKBP_SAMPLE

pytestmark = pytest.mark.skipif(not OPENKBP_SAMPLE.is_dir(),
                                reason=f"OpenKBP sample not found at {OPENKBP_SAMPLE}")
#: The issue's bound on the mean difference inside the possible-dose mask (Gy); the
#: interpolation alone (the prediction on the OpenKBP grid taken to the DICOM grid and
#: back) accounts for 0.3-0.9 Gy of it with this three-step model.
BOUND_GY = 1.0
#: What may remain beyond that interpolation: the CT interpolated twice (Gy).
BEYOND_INTERPOLATION_GY = 0.35


def cropped(case: Case, shape=(24, 48, 48)) -> Case:
    """The box of ``shape`` voxels centred on the targets (origin moved with it)."""
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
                                 [POSSIBLE_DOSE_MASK])
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


def test_inputs_built_off_the_training_grid_would_change_the_dose(routes):
    """Without resampling the case first (prior and masks built at 1.2 mm, as before),
    the same model gives another dose: the invariance above is not a matter of luck."""
    case, openkbp_path, dicom_case, dicom_path, _, predictor = routes
    native = Predictor(predictor.module, predictor.contract)
    native.spacing = SpacingRange.of([dicom_case.spacing_mm])
    by_arrays = predictor.predict(openkbp_path).dose_gy
    at_native = native.predict(dicom_path).dose_gy
    inside = case.body > 0
    assert np.abs(on_openkbp_grid(at_native, dicom_case, case) - by_arrays)[inside].mean() \
        > 2 * BOUND_GY


def test_a_model_of_mixed_spacings_predicts_both_routes_on_one_grid_by_choice(routes):
    """Trained on spacings from the arrays' own to 1.3 times it, the model predicts the
    arrays (inside that range) as they are under ``resample`` (the default) but the DICOM
    case (1.2 mm, outside it) at the median: two grids, two doses. ``training_grid`` puts
    both on the median grid: one dose (experiments/route_invariance.md, cause 4)."""
    case, openkbp_path, dicom_case, dicom_path, _, trained = routes
    mixed = SpacingRange.of([case.spacing_mm, 1.3 * np.asarray(case.spacing_mm)])
    inside = case.body > 0

    def difference(predictor: Predictor) -> float:
        predictor.spacing = mixed
        by_arrays = predictor.predict(openkbp_path).dose_gy
        by_dicom = on_openkbp_grid(predictor.predict(dicom_path).dose_gy, dicom_case, case)
        return float(np.abs(by_dicom - by_arrays)[inside].mean())

    one_grid = difference(Predictor(trained.module, trained.contract, "training_grid"))
    two_grids = difference(Predictor(trained.module, trained.contract))  # resample
    assert one_grid < BOUND_GY
    assert two_grids > one_grid + 0.2
