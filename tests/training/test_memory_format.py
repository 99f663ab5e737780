"""Channels-last training: weights and batches in NDHWC, the same numbers as the default."""

import lightning as L
import pytest
import torch

from vmatdose.training.memory_format import MemoryFormatCallback, chosen_format


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


def _fit(fmt: str) -> TinyConvModule:
    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 6, 8, 10), "dose": torch.rand(1, 6, 8, 10)}
            for _ in range(3)]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    module = TinyConvModule()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False,
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


def test_auto_is_channels_last_on_cpu_only_and_a_bad_value_is_named():
    assert chosen_format("auto", torch.device("cpu")) is torch.channels_last_3d
    assert chosen_format("auto", torch.device("cuda")) is torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format.format='chanels_last'"):
        MemoryFormatCallback("chanels_last")
