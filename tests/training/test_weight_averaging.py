"""callbacks.weight_averaging: the average is the warmed-up EMA of the weights after every
optimizer step, validation and checkpoints see it, the training weights travel beside it
for resuming, and switched off the callback changes nothing."""

import lightning as L
import pytest
import torch

from vmatdose.training.weight_averaging import (
    EMA_WARMUP,
    EMAWeightAveraging,
    check_ema_decay,
    ema_decay_at,
)


class TinyConvModule(L.LightningModule):
    """Two 3D convolutions trained with L1; records its weights after every step and the
    weights validation runs with."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.PReLU(),
                                       torch.nn.Conv3d(4, 1, 3, padding=1))
        self.after_step: list[list[torch.Tensor]] = []
        self.at_start: list[torch.Tensor] = []
        self.in_validation: list[list[torch.Tensor]] = []

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def training_step(self, batch, batch_idx):
        return (self.net(batch["image"]) - batch["dose"]).abs().mean()

    def on_train_start(self):
        self.at_start = self.weights()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after_step.append(self.weights())

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.in_validation.append(self.weights())
        loss = (self.net(batch["image"]) - batch["dose"]).abs().mean()
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def _fit(decay, tmp_path, epochs=3, ckpt_path=None, warmup=EMA_WARMUP):
    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 6, 8, 8), "dose": torch.rand(1, 6, 8, 8)}
            for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    module = TinyConvModule()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EMAWeightAveraging(decay, warmup), checkpoint])
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return module


def _ema_by_hand(snapshots: list[list[torch.Tensor]], decay: float,
                 warmup: float = EMA_WARMUP) -> list[torch.Tensor]:
    average = [w.clone() for w in snapshots[0]]  # the first update copies the weights
    for n, weights in enumerate(snapshots[1:], start=1):
        weight = 1.0 - ema_decay_at(decay, n, warmup)
        average = [a.lerp(w, weight) for a, w in zip(average, weights)]
    return average


def test_the_warm_up_forgets_the_start_then_the_decay_caps_it():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 9000) == pytest.approx(0.999)
    assert ema_decay_at(0.99, 10**6) == 0.99
    # a smaller warm-up constant averages more of the run: (1 + n) / (4 + n)
    assert ema_decay_at(0.9999, 0, warmup=4) == pytest.approx(0.25)
    assert ema_decay_at(0.9999, 96, warmup=4) == pytest.approx(0.97)
    assert ema_decay_at(0.999, 10**6, warmup=4) == 0.999


@pytest.mark.parametrize("warmup", [1.0, 0.5, -3])
def test_a_warm_up_constant_of_one_or_less_is_refused_naming_the_key(warmup):
    with pytest.raises(ValueError, match=r"callbacks\.weight_averaging\.warmup"):
        EMAWeightAveraging(0.999, warmup)


def test_the_warm_up_constant_sets_the_average_the_callback_keeps(tmp_path):
    module = _fit(0.99, tmp_path, warmup=2.0)
    expected = _ema_by_hand(module.after_step, 0.99, warmup=2.0)
    for a, b in zip(module.weights(), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and it is not the default warm-up's average
    default = _ema_by_hand(module.after_step, 0.99)
    assert max(float((a - b).abs().max()) for a, b in zip(expected, default)) > 1e-4


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_a_decay_outside_zero_one_is_refused_naming_the_key(decay):
    with pytest.raises(ValueError, match=r"callbacks\.weight_averaging\.decay"):
        EMAWeightAveraging(decay)
    assert check_ema_decay(None, "k") is None


def test_validation_and_the_end_of_training_see_the_ema_of_every_step(tmp_path):
    module = _fit(0.9, tmp_path)
    steps_per_epoch = 4
    assert len(module.after_step) == 3 * steps_per_epoch
    # validation of epoch e ran with the average of the steps so far (the first
    # in_validation is Lightning's sanity check, before any step: the initial weights)
    for epoch, seen in enumerate(module.in_validation[1:]):
        expected = _ema_by_hand(module.after_step[:steps_per_epoch * (epoch + 1)], 0.9)
        for a, b in zip(seen, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    final = _ema_by_hand(module.after_step, 0.9)
    for a, b in zip(module.weights(), final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the average is not the last training weights (it did average)
    assert max(float((a - b).abs().max()) for a, b in zip(final, module.after_step[-1])) > 1e-3


def test_checkpoints_hold_the_average_and_the_training_weights_beside_it(tmp_path):
    module = _fit(0.9, tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    trained = dict(zip([n for n, _ in module.named_parameters()], module.after_step[-1]))
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(value, dict(module.named_parameters())[name].detach())
        torch.testing.assert_close(ckpt["current_model_state"][name], trained[name])


def test_resumed_without_it_training_goes_on_from_the_training_weights(tmp_path, caplog):
    first = _fit(0.9, tmp_path / "first", epochs=2)
    ckpt = tmp_path / "first" / "last.ckpt"
    resumed = _fit(None, tmp_path / "second", epochs=3, ckpt_path=ckpt)
    for a, b in zip(resumed.at_start, first.after_step[-1]):  # not the average
        torch.testing.assert_close(a, b)
    assert any("average is dropped" in r.getMessage() for r in caplog.records)
    # with the average on, the resumed run goes on from the training weights too
    again = _fit(0.9, tmp_path / "third", epochs=3, ckpt_path=ckpt)
    for a, b in zip(again.at_start, first.after_step[-1]):
        torch.testing.assert_close(a, b)


def test_switched_off_it_changes_nothing(tmp_path):
    module = _fit(None, tmp_path / "off")
    for a, b in zip(module.weights(), module.after_step[-1]):
        assert torch.equal(a, b)
    ckpt = torch.load(tmp_path / "off" / "last.ckpt", weights_only=True)
    assert "current_model_state" not in ckpt


def test_a_model_with_its_own_average_is_refused(tmp_path):
    module = TinyConvModule()
    module.ema_net = torch.nn.Linear(1, 1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[EMAWeightAveraging(0.9)])
    loader = torch.utils.data.DataLoader([{"image": torch.randn(2, 6, 8, 8),
                                           "dose": torch.rand(1, 6, 8, 8)}], batch_size=1)
    with pytest.raises(ValueError, match="model.ema_decay"):
        trainer.fit(module, loader)


def test_a_dose_model_trained_with_it_predicts_with_the_average(tmp_path):
    """The whole path: `callbacks.weight_averaging.decay` on a debug=smoke run, then the
    Predictor (as `predict` and `evaluate` build it) holds the checkpoint's average."""
    from vmatdose.inference.predictor import Predictor
    from vmatdose.training.fit import fit

    from conftest import smoke_config

    run = tmp_path / "run"
    cfg = smoke_config(tmp_path, run, "callbacks.weight_averaging.decay=0.9",
                       "evaluate_after_training=false")
    fit(cfg, run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    predictor = Predictor.from_checkpoint(run / "checkpoints" / "last.ckpt", "cpu")
    loaded = predictor.module.state_dict()
    differs = 0
    for name, average in ckpt["state_dict"].items():
        torch.testing.assert_close(loaded[name], average)
        differs += not torch.equal(average, ckpt["current_model_state"][name])
    assert differs > 0  # the average is not the training weights


def test_one_foreach_update_lerps_the_floats_and_copies_the_counters():
    """The callback's update through torch's AveragedModel (as Lightning runs it): float
    weights and buffers move by the warmed-up decay, an integer buffer (BatchNorm's step
    count) follows the model."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    average = torch.optim.swa_utils.AveragedModel(
        net, use_buffers=True, multi_avg_fn=EMAWeightAveraging(0.9)._average)
    average.update_parameters(net)  # the first update copies
    first = [t.detach().clone() for t in net.state_dict().values()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net(torch.randn(2, 1, 3, 3, 3))  # BatchNorm: running stats and its counter move
    average.update_parameters(net)
    weight = 1.0 - ema_decay_at(0.9, 1)  # 1 - 2/11
    for (name, now), before, kept in zip(net.state_dict().items(), first,
                                         average.module.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert int(kept) == int(now) == 1
        else:
            torch.testing.assert_close(kept, before.lerp(now, weight))
