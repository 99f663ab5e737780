"""Channels-last training: weights and batches in NDHWC, the same numbers as the default;
``auto`` picks it for fp32 on the CPU only."""

import lightning as L
import pytest
import torch

from vmatdose.training.memory_format import (
    MemoryFormatCallback,
    choose_memory_format,
)


class TinyConvModule(L.LightningModule):
    """Two 3D convolutions trained with L1; records each training image's layout."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv3d(4, 1, 3, padding=1))
        self.image_layouts: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.image_layouts.append(
            batch["image"].is_contiguous(memory_format=torch.channels_last_3d))
        return (self.net(batch["image"]) - batch["dose"]).abs().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(fmt: str, precision: str = "32-true") -> TinyConvModule:
    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 6, 8, 10), "dose": torch.rand(1, 6, 8, 10)}
            for _ in range(3)]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    module = TinyConvModule()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, precision=precision,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[MemoryFormatCallback(fmt)])
    trainer.fit(module, loader)
    return module


def test_channels_last_weights_and_batches_train_to_the_same_weights():
    default, channels_last = _fit("contiguous"), _fit("channels_last")
    assert channels_last.image_layouts == [True] * 3
    assert default.image_layouts == [False] * 3
    weight = channels_last.net[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    for a, b in zip(default.parameters(), channels_last.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_is_channels_last_for_fp32_on_the_cpu_only_and_a_bad_value_is_named():
    def fmt(requested, device, precision):
        return choose_memory_format(requested, device, precision).memory_format

    assert fmt("auto", "cpu", "32-true") is torch.channels_last_3d
    assert fmt("auto", "cpu", "bf16-mixed") is torch.contiguous_format
    assert fmt("auto", "cpu", "bf16-true") is torch.contiguous_format
    assert fmt("auto", "cuda", "32-true") is torch.contiguous_format
    assert fmt("channels_last", "cpu", "bf16-mixed") is torch.channels_last_3d
    assert fmt("contiguous", "cpu", "32-true") is torch.contiguous_format
    choice = choose_memory_format("auto", "cpu", "bf16-mixed")
    assert choice.to_dict() == {"requested": "auto", "chosen": "contiguous",
                                "reason": choice.reason} and "bf16" in choice.reason
    with pytest.raises(ValueError, match="memory_format.format='chanels_last'"):
        MemoryFormatCallback("chanels_last")


def test_auto_under_bf16_trains_contiguous_weights_and_batches():
    auto = _fit("auto", "bf16-mixed")
    assert auto.image_layouts == [False] * 3
    assert not auto.net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert _fit("auto").image_layouts == [True] * 3
