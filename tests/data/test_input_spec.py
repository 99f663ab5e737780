"""The input specification: the one owner of the channel layout. Adding a channel is a
change to the spec alone: the image, the channel count, the prior's place, the
left/right permutation and the resampling all follow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vmatdose.config import CONFIG_DIR
from vmatdose.data.input_spec import ChannelBlock, InputSpec, input_channels, prior_channel
from vmatdose.data.pipeline import assemble_batch
from vmatdose.training.module import DoseModule

STRUCTURES = ["PTV70", "ParotidL", "ParotidR"]
PAIRS = [["ParotidL", "ParotidR"]]


def test_layout_order_interpolation_and_left_right_permutation():
    spec = InputSpec.build(STRUCTURES, signed_distance=True, prior=True, lr_pairs=PAIRS)
    assert spec.channels == ["ct/CT", "masks/PTV70", "masks/ParotidL", "masks/ParotidR",
                             "sdf/PTV70", "sdf/ParotidL", "sdf/ParotidR", "prior/prior_dose"]
    assert len(spec) == spec.network_channels == 8
    assert spec.slice("prior") == slice(7, 8) and spec.slice("sdf") == slice(4, 7)
    assert spec.interpolations == ["linear"] + ["nearest"] * 3 + ["linear"] * 4
    # the mask and SDF blocks swap their paired channels, CT and prior stay
    assert spec.lr_permutation() == [0, 1, 3, 2, 4, 6, 5, 7]
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(KeyError, match="no 'dummy' channels"):
        spec.slice("dummy")


def test_beam_sectors_follow_the_prior_and_swap_with_their_mirrored_gantry():
    prior = {"kind": "beams", "beam_sectors": 4}
    spec = InputSpec.from_data_config({"structures": STRUCTURES, "lr_pairs": PAIRS,
                                       "prior_dose": prior})
    assert spec.channels[4:] == ["prior/prior_dose", "prior/beams_000", "prior/beams_090",
                                 "prior/beams_180", "prior/beams_270"]
    assert spec.slice("prior") == slice(4, 9)
    assert spec.lr_permutation() == [0, 1, 3, 2, 4, 5, 8, 7, 6]  # 90 <-> 270
    assert input_channels({"structures": STRUCTURES, "prior_dose": prior}) == 9
    assert prior_channel({"structures": STRUCTURES, "prior_dose": prior}) == 4
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_conditioning_planes_come_last_and_are_not_network_channels():
    conditioning = {"targets": ["PTV70"], "constraints": [{"structure": "ParotidL",
                                                           "metric": "Dmean", "limit": 26}]}
    spec = InputSpec.from_data_config({"structures": STRUCTURES, "lr_pairs": PAIRS},
                                      conditioning)
    assert spec.channels[-2:] == ["condition/PTV70", "condition/ParotidL Dmean"]
    assert (len(spec), spec.network_channels) == (6, 4)
    assert spec.lr_permutation() == [0, 1, 3, 2, 4, 5]
    with pytest.raises(ValueError, match="after every volume"):
        InputSpec(tuple(reversed(spec.blocks)))


def test_the_model_in_channels_come_from_the_spec_through_the_resolver():
    conf = Path(CONFIG_DIR)
    hard_coded = [f"{p.relative_to(conf)}: {line.strip()}" for p in conf.rglob("*.yaml")
                  for line in p.read_text().splitlines()
                  if re.search(r"in_channels: [0-9]", line)]
    assert hard_coded == []
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        openkbp = compose("train", overrides=["experiment=openkbp_cpu"])
        phantom_sdf = compose("train", overrides=["data.signed_distance=true", "model=ddpm"])
    assert openkbp.model.net.in_channels == 12  # CT + 10 structures + the prior
    n = len(phantom_sdf.data.structures)
    assert phantom_sdf.model.net.in_channels == 1 + 2 * n + 1  # + the diffused dose
    assert input_channels({"structures": STRUCTURES, "prior_dose": {"kind": "beams"}}) == 5


def test_the_prior_channel_index_comes_from_the_spec_through_the_resolver():
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        flow = compose("train", overrides=["experiment=openkbp_flow"])
    assert flow.model.prior_channel == 11  # after CT + 10 structures
    assert prior_channel({"structures": STRUCTURES, "prior_dose": {"kind": "beams"}}, 1) == 5
    with pytest.raises(ValueError, match="prior_dose"):
        prior_channel({"structures": STRUCTURES})


def test_a_dummy_channel_is_added_by_changing_the_spec_alone():
    base = InputSpec.build(STRUCTURES, prior=True, lr_pairs=PAIRS)
    dummy = ChannelBlock("dummy", ("dummy",), "nearest")
    spec = InputSpec(base.blocks + (dummy,), base.lr_pairs)  # after the prior
    batch = {"ct": torch.zeros(2, 1, 4, 4, 4), "masks": torch.ones(2, 3, 4, 4, 4),
             "prior": torch.full((2, 1, 4, 4, 4), 0.5), "dummy": torch.full((2, 1, 4, 4, 4), 7.0),
             "body": torch.ones(2, 1, 4, 4, 4)}
    image = assemble_batch(batch, spec=spec)["image"]
    assert image.shape[1] == len(spec) == len(base) + 1 == 6
    assert float(image[:, spec.slice("dummy")].min()) == 7.0
    assert float(image[:, spec.slice("prior")].max()) == 0.5  # no longer the last channel
    assert spec.lr_permutation() == base.lr_permutation() + [5]
    assert spec.interpolations[-1] == "nearest"

    # the model's prior-residual upsampling and flip TTA find their channels by the spec
    class PickPrior(torch.nn.Module):
        def forward(self, x):
            return x[:, 4:5]

    module = DoseModule(PickPrior(), None, torch.optim.SGD, max_relative_dose=None,
                        resolution_factor=2, prior_residual=True, tta="flips", tta_axes=[-1])
    module.contract = {"structures": STRUCTURES, "inputs": {"spec": spec.to_dict()}}
    prior = torch.zeros(1, 1, 8, 8, 8)
    prior[..., 2:6, 2:6, 1:3] = 1.0  # sharp, and not left/right symmetric
    full = torch.cat([torch.zeros(1, 4, 8, 8, 8), prior, torch.ones(1, 1, 8, 8, 8)], dim=1)
    mean, _ = module.predict_with_uncertainty(full, body=torch.ones_like(prior))
    torch.testing.assert_close(mean, prior)  # zero correction + the full-resolution prior
