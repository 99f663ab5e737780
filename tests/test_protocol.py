"""Protocols: one source per treatment site, composed by Hydra and read by the code."""

import pytest
from hydra import compose, initialize_config_dir

from vmatdose.config import CONFIG_DIR
from vmatdose.protocol import Protocol, ProtocolError, available_protocols


def test_the_three_sites_are_provided():
    assert {"prostate_sib", "prostate_sib3", "head_neck"} <= set(available_protocols())


def test_prostate_sib3_adds_the_nodal_level_to_prostate_sib():
    base, three = Protocol.load("prostate_sib"), Protocol.load("prostate_sib3")
    assert base.prescriptions_gy == {"PTV70": 70.0, "PTV56": 56.0}
    assert three.prescriptions_gy == {"PTV70": 70.0, "PTV56": 56.0, "PTV50.4": 50.4}
    assert three.structures == ("PTV70", "PTV56", "PTV50.4", *base.oars)
    assert three.fractions == base.fractions == 28
    assert three.synonyms["Rectum"] == base.synonyms["Rectum"]
    assert len(three.constraints) == len(base.constraints) + 1


def test_head_neck_needs_any_one_target_and_prostate_needs_both():
    hn, pr = Protocol.load("head_neck"), Protocol.load("prostate_sib")
    assert hn.dose_scale_gy == 70.0 and hn.fractions == 35
    assert hn.missing_targets(["PTV63", "SpinalCord"]) == []
    assert hn.missing_targets(["SpinalCord"]) == ["PTV70", "PTV63", "PTV56"]
    assert pr.missing_targets(["PTV70"]) == ["PTV56"]
    assert "at least one of" in hn.requirement_text()


def test_data_config_reads_the_protocol_and_openkbp_selects_head_neck():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        default = compose("train")
        openkbp = compose("train", overrides=["data=openkbp"])
    assert default.protocol.name == "prostate_sib"
    assert list(default.data.structures) == list(Protocol.load("prostate_sib").structures)
    assert openkbp.protocol.name == "head_neck"
    assert openkbp.data.dose_scale_gy == 70.0
    assert openkbp.model.net.in_channels == 1 + 10


def test_max_dose_limits_are_the_lowest_dmax_limit_of_each_organ():
    assert Protocol.load("head_neck").max_dose_limits_gy == {"SpinalCord": 45.0,
                                                            "Brainstem": 54.0}
    base = Protocol.load("prostate_sib").to_dict()
    base["constraints"] += [{"structure": "Femur_L", "metric": "Dmax", "op": "<=",
                             "limit": 48.0},
                            {"structure": "Rectum", "metric": "Dmax", "op": ">", "limit": 1.0},
                            {"structure": "PTV70", "metric": "Dmax", "op": "<", "limit": 80.0}]
    # the lower of Femur_L's two limits; not a ">" constraint, not a target's
    assert Protocol.from_dict(base).max_dose_limits_gy == {"Femur_L": 48.0, "Femur_R": 50.0}


def test_round_trip_and_bad_protocols_are_refused():
    hn = Protocol.load("head_neck")
    assert Protocol.from_dict(hn.to_dict()) == hn
    with pytest.raises(ValueError, match="required targets"):
        Protocol.from_dict({**hn.to_dict(), "required_targets": ["PTV80"]})
    with pytest.raises(ValueError, match="unknown structures"):
        Protocol.from_dict({**hn.to_dict(), "lr_pairs": [["LeftEye", "RightEye"]]})
    with pytest.raises(ValueError, match="unknown protocol"):
        Protocol.load("liver")


@pytest.mark.parametrize("beams, problem", [
    ({"n_beam": 9, "couch_deg": 0.0}, "beams: unknown key 'n_beam' (allowed: gantry_deg,"),
    ({"n_beams": 9, "strat_deg": 20}, "beams: unknown key 'strat_deg'"),
    ({"couch_deg": 0.0}, "beams: give either gantry_deg (a list of angles) or n_beams"),
    ({"n_beams": 0}, "beams: n_beams=0 must be an integer >= 1"),
    ({"gantry_deg": [0, "left"]}, "beams: gantry_deg=[0, 'left'] must be a non-empty list"),
    ({"n_beams": 9, "energy_mv": "6 MV"}, "beams: energy_mv='6 MV' must be a number"),
])
def test_a_misspelt_or_bad_beams_key_is_refused_naming_the_protocol_file(beams, problem):
    hn = Protocol.load("head_neck").to_dict()
    with pytest.raises(ProtocolError) as err:
        Protocol.from_dict({**hn, "beams": beams})
    message = str(err.value)
    assert message.startswith("protocol 'head_neck' (conf/protocol/head_neck.yaml): ")
    assert problem in message and "\n" not in message


def test_a_misspelt_beams_key_stops_training_before_the_run_record(tmp_path):
    from vmatdose.training.fit import fit

    from conftest import smoke_config

    cfg = smoke_config(tmp_path, tmp_path / "run", "+protocol.beams.strat_deg=20")
    with pytest.raises(ProtocolError, match="beams: unknown key 'strat_deg'"):
        fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "data").exists()  # the phantom was not generated either
