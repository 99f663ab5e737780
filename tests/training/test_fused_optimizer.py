"""A fused AdamW (the optimizer config's default): the same updates as the per-tensor one,
gradients clipped before its step under fp32 and bf16 (where Lightning alone refuses to),
and left unfused where an fp16 gradient scaler would have to unscale first."""

from functools import partial

import lightning as L
import pytest
import torch
from losses.loss_testing import as_samples, box_batch
from torch import nn

from vmatdose.losses import CompositeLoss, VoxelLoss
from vmatdose.training.module import DoseModule, fused_step

CLIP = 0.05


class GradNormBeforeStep(L.Callback):
    """Records the global gradient norm each optimizer step used (Lightning clips in place
    before the step; the gradients stay until the next step's ``zero_grad``)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.float() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def _fit(precision: str, fused: bool, clip: float | None) -> tuple[DoseModule, list[float]]:
    torch.manual_seed(0)
    batch = box_batch(n_cases=2, size=8)
    net = nn.Sequential(nn.Conv3d(batch["image"].shape[1], 4, 3, padding=1), nn.PReLU(),
                        nn.Conv3d(4, 1, 3, padding=1))
    loss = CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss(kind="l1")}})
    module = DoseModule(net, loss, optimizer=partial(torch.optim.AdamW, lr=0.01,
                                                     weight_decay=0.1, fused=fused))
    record = GradNormBeforeStep()
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=4,
                        gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    loader = torch.utils.data.DataLoader(as_samples(batch), batch_size=2)
    trainer.fit(module, loader)
    return module, record.norms


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_clips_before_its_step_and_trains_to_the_per_tensor_weights(precision):
    fused, norms = _fit(precision, fused=True, clip=CLIP)
    single, single_norms = _fit(precision, fused=False, clip=CLIP)
    _, unclipped = _fit(precision, fused=True, clip=None)
    assert fused_step(fused.trainer.optimizers[0])
    assert not fused_step(single.trainer.optimizers[0])
    assert len(norms) == 4 and max(norms) <= CLIP * (1 + 1e-4)
    assert min(unclipped) > 2 * CLIP  # so the clipping above did something
    assert norms == pytest.approx(single_norms, rel=1e-4)
    for a, b in zip(fused.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_gradient_scaler_gets_the_unfused_step(caplog):
    module = DoseModule(nn.Conv3d(8, 1, 1),
                        CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss()}}),
                        optimizer=partial(torch.optim.AdamW, lr=0.01, fused=True))
    assert fused_step(module.configure_optimizers())  # no trainer: no scaler
    module._grad_scaler = lambda: torch.amp.GradScaler("cpu")
    module._trainer = type("T", (), {"precision": "16-mixed"})()
    with caplog.at_level("INFO"):
        optimizer = module.configure_optimizers()
    assert not fused_step(optimizer)
    assert "model.optimizer.fused: off under 16-mixed" in caplog.text
