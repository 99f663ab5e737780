"""A sequenced plan written as a DICOM RT Plan and read back (no planning engine needed)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from vmatdose.planning.mlc import mlc_geometry, segment_shape
from vmatdose.planning.rtplan import DeliveredBeam, write_rtplan
from vmatdose.planning.sequencing import SequencingLimits, sequence_fluence

from conftest import make_box_case

#: attributes that stand for each module of the RT Plan IOD
MODULES = {
    "Patient": ("PatientName", "PatientID"),
    "General Study": ("StudyInstanceUID", "StudyDate"),
    "RT Series": ("Modality", "SeriesInstanceUID"),
    "Frame of Reference": ("FrameOfReferenceUID",),
    "General Equipment": ("Manufacturer",),
    "RT General Plan": ("RTPlanLabel", "RTPlanGeometry"),
    "RT Prescription": ("DoseReferenceSequence",),
    "RT Patient Setup": ("PatientSetupSequence",),
    "RT Fraction Scheme": ("FractionGroupSequence",),
    "RT Beams": ("BeamSequence",),
    "SOP Common": ("SOPClassUID", "SOPInstanceUID"),
}


def _beam(gantry: float, fluence: np.ndarray, extent, leaf_width=5.0) -> DeliveredBeam:
    seq = sequence_fluence(fluence, SequencingLimits(levels=4))
    mlc = mlc_geometry(fluence.shape, extent, 5.0, leaf_width)
    shapes = [segment_shape(s, mlc) for s in seq.segments]
    return DeliveredBeam(gantry, 0.0, mlc, shapes, np.array([s.weight for s in seq.segments]))


def test_rtplan_round_trip(tmp_path):
    case = make_box_case(case_id="plan_case")
    fluence = np.array([[1.0, 1.0, 2.0, 2.0], [0.0, 1.0, 3.0, 1.0], [2.0, 0.0, 0.0, 2.0]])
    beams = [_beam(0.0, fluence, (-10.0, 10.0, -7.5, 7.5)),
             _beam(200.0, fluence[::-1], (-5.0, 15.0, -2.5, 12.5), leaf_width=2.5)]
    path = write_rtplan(case, beams, (1.0, 2.0, 3.0), {"PTV70": 70.0, "PTV56": 56.0}, 35,
                        tmp_path / "plan_case_rtplan.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.RTPlanStorage and ds.Modality == "RTPLAN"
    for module, keywords in MODULES.items():
        for keyword in keywords:
            assert keyword in ds, f"{module}: {keyword} missing"
    assert ds.PatientID == "plan_case"
    assert [float(r.TargetPrescriptionDose) for r in ds.DoseReferenceSequence] == [70.0, 56.0]
    group = ds.FractionGroupSequence[0]
    assert group.NumberOfFractionsPlanned == 35 and group.NumberOfBeams == 2
    for written, beam, ref in zip(ds.BeamSequence, beams, group.ReferencedBeamSequence):
        assert float(ref.BeamMeterset) == pytest.approx(beam.mu, rel=1e-6)
        devices = {d.RTBeamLimitingDeviceType: d for d in written.BeamLimitingDeviceSequence}
        mlc = devices["MLCX"]
        assert len(mlc.LeafPositionBoundaries) == mlc.NumberOfLeafJawPairs + 1
        cps = written.ControlPointSequence
        assert written.NumberOfControlPoints == len(cps) == 2 * len(beam.shapes)
        first = cps[0]
        assert float(first.GantryAngle) == beam.gantry_deg
        assert [float(v) for v in first.IsocenterPosition] == [3.0, 2.0, 1.0]
        weights = [float(cp.CumulativeMetersetWeight) for cp in cps]
        assert weights[0] == 0.0 and weights[-1] == 1.0 and np.all(np.diff(weights) >= 0)
        for cp in cps:
            pos = {p.RTBeamLimitingDeviceType: np.array(p.LeafJawPositions, float)
                   for p in cp.BeamLimitingDevicePositionSequence}
            leaves = pos["MLCX"].reshape(2, -1)
            assert leaves.shape[1] == mlc.NumberOfLeafJawPairs
            assert np.all(leaves[0] <= leaves[1])
            bounds = np.array(mlc.LeafPositionBoundaries, float)
            is_open = leaves[1] > leaves[0]
            # the jaws enclose every open leaf gap, along X and along Y
            assert pos["ASYMX"][0] <= leaves[0][is_open].min()
            assert pos["ASYMX"][1] >= leaves[1][is_open].max()
            assert pos["ASYMY"][0] <= bounds[:-1][is_open].min()
            assert pos["ASYMY"][1] >= bounds[1:][is_open].max()
    # each segment's MU, read back from the cumulative weights of its two control points
    weights = [float(cp.CumulativeMetersetWeight) for cp in ds.BeamSequence[0]
               .ControlPointSequence]
    np.testing.assert_allclose(np.diff(weights)[::2] * beams[0].mu, beams[0].segment_mu,
                               rtol=1e-6)
