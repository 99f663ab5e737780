"""Perceptual loss: VGG16 layout, weights only from a local file, slice sampling."""

import pytest
import torch

from vmatdose.losses import PerceptualLoss, VGG16Features
from vmatdose.losses.perceptual import body_slice_candidates, pick_slices
from vmatdose.losses.vgg import build_vgg16_features, vgg16_layer_names

from loss_testing import box_batch


def torchvision_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full vgg16 state_dict as torchvision names it: 13 convs in ``features`` and a
    (fake, small) classifier that the loss must ignore."""
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in build_vgg16_features(31).state_dict().items()}
    state["classifier.0.weight"] = torch.randn(8, 8)
    state["classifier.0.bias"] = torch.randn(8)
    return state


def test_layout_matches_torchvision_vgg16_features():
    names = vgg16_layer_names()
    assert len(names) == 31
    assert (names[3], names[8], names[15], names[22], names[29], names[30]) == (
        "relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3", "pool5")
    shapes = {k: tuple(v.shape) for k, v in torchvision_like_state().items()}
    conv_keys = [k for k in shapes if k.startswith("features.") and k.endswith(".weight")]
    assert [int(k.split(".")[1]) for k in conv_keys] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21,
                                                         24, 26, 28]
    assert shapes["features.0.weight"] == (64, 3, 3, 3)
    assert shapes["features.14.weight"] == (256, 256, 3, 3)
    assert shapes["features.28.weight"] == (512, 512, 3, 3)
    assert sum(v.numel() for k, v in torchvision_like_state().items()
               if k.startswith("features.")) == 14_714_688  # torchvision's vgg16 features


def test_refuses_to_start_without_weights_unless_random_weights_is_explicit():
    with pytest.raises(ValueError, match="weights_path=/path/to/vgg16.pth"):
        PerceptualLoss()
    with pytest.raises(ValueError, match="not both"):
        PerceptualLoss(weights_path="w.pth", random_weights=True)
    with pytest.raises(FileNotFoundError, match="no such VGG16 weights file"):
        PerceptualLoss(weights_path="/nonexistent/vgg16.pth")
    assert isinstance(PerceptualLoss(random_weights=True).vgg, VGG16Features)


def test_loads_a_torchvision_state_dict_saved_to_disk(tmp_path):
    state = torchvision_like_state(seed=3)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    loss = PerceptualLoss(weights_path=str(path), layers=["relu1_2", "relu3_3"])
    assert len(loss.vgg.features) == 16  # truncated after relu3_3
    loaded = loss.vgg.features.state_dict()
    for index in (0, 2, 5, 7, 10, 12, 14):
        assert torch.equal(loaded[f"{index}.weight"], state[f"features.{index}.weight"])
        assert torch.equal(loaded[f"{index}.bias"], state[f"features.{index}.bias"])
    assert all(not p.requires_grad for p in loss.vgg.parameters())


def test_incomplete_or_foreign_state_dicts_are_rejected(tmp_path):
    state = torchvision_like_state()
    del state["features.12.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="12.weight"):
        PerceptualLoss(weights_path=str(tmp_path / "partial.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'features"):
        PerceptualLoss(weights_path=str(tmp_path / "other.pth"))


def test_zero_for_perfect_prediction_positive_otherwise_finite_gradients():
    torch.manual_seed(0)
    loss = PerceptualLoss(random_weights=True, n_slices=3)
    batch = box_batch()
    assert loss(batch["dose"], batch).item() == 0.0
    pred = (batch["dose"] * 0.8).requires_grad_()
    value = loss(pred, batch)
    value.backward()
    assert value.item() > 0
    assert torch.isfinite(pred.grad).all()
    # Gradient only reaches the sampled axial slices: 3 per case.
    touched = pred.grad.abs().flatten(3).sum(-1)[:, 0] > 0  # (B, Z)
    assert touched.sum(dim=1).tolist() == [3, 3]


def test_slices_come_from_the_body_random_in_training_fixed_in_eval():
    body = torch.zeros(2, 1, 10, 4, 4)
    body[0, :, 3:7] = 1
    candidates = body_slice_candidates(body)
    assert candidates[0].tolist() == [3, 4, 5, 6]
    assert candidates[1].tolist() == list(range(10))  # no body: every slice
    assert pick_slices(candidates[0], 2, random=False).tolist() == [3, 6]
    torch.manual_seed(0)
    drawn = {tuple(sorted(pick_slices(candidates[0], 2, random=True).tolist()))
             for _ in range(30)}
    assert len(drawn) > 1 and all(set(d) <= {3, 4, 5, 6} and len(set(d)) == 2 for d in drawn)
    assert len(pick_slices(candidates[0], 6, random=True)) == 6  # with replacement


def test_input_is_three_channel_imagenet_normalised():
    loss = PerceptualLoss(random_weights=True)
    x = loss.to_vgg_input(torch.full((1, 1, 2, 2), 0.5))
    expected = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    assert x.shape == (1, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)


def test_eval_mode_value_is_deterministic():
    loss = PerceptualLoss(random_weights=True, n_slices=2).eval()
    batch = box_batch()
    pred = batch["dose"] * 1.1
    assert loss(pred, batch).item() == loss(pred, batch).item()
