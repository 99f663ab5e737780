"""callbacks.compile: the compiled network trains to the eager one's losses, the choice is
recorded, and a machine that cannot compile is refused before training."""

import lightning as L
import pytest
import torch

from vmatdose.training import compile as compile_mod
from vmatdose.training.compile import CompileCallback, choose_compile


class TinyConvModule(L.LightningModule):
    """Two 3D convolutions with an instance norm, trained with L1; records each loss."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1),
                                       torch.nn.InstanceNorm3d(4), torch.nn.PReLU(),
                                       torch.nn.Conv3d(4, 1, 3, padding=1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = (self.net(batch["image"]) - batch["dose"]).abs().mean()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _fit(mode: str) -> tuple[TinyConvModule, CompileCallback]:
    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 6, 8, 8), "dose": torch.rand(1, 6, 8, 8)}
            for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    module = TinyConvModule()
    callback = CompileCallback(mode)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, loader)
    return module, callback


@pytest.mark.skipif(compile_mod.cxx_compiler() is None, reason="no C++ compiler for inductor")
def test_compiled_network_trains_to_the_eager_losses_and_keeps_its_keys():
    eager, eager_cb = _fit("off")
    compiled, compiled_cb = _fit("on")
    assert compiled.net._compiled_call_impl is not None  # nn.Module.compile, in place
    assert eager.net._compiled_call_impl is None
    assert (eager_cb.choice.compiled, compiled_cb.choice.compiled) == (False, True)
    assert len(compiled.losses) == len(eager.losses) == 4
    assert compiled.losses[-1] < compiled.losses[0]  # it trained
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses),
                               rtol=1e-4, atol=1e-5)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod.
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_stays_eager_on_cpu_and_cuda_and_on_needs_a_compiler(monkeypatch):
    assert not choose_compile("auto", "cpu").compiled
    assert not choose_compile("auto", "cuda").compiled
    assert not choose_compile("off", "cpu").compiled
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        choose_compile("on", "cpu")
    with pytest.raises(ValueError, match="callbacks.compile.mode='yes'"):
        CompileCallback("yes")


def test_compile_on_without_a_compiler_is_refused_before_the_run_record(
        tmp_path, monkeypatch):
    from vmatdose.training.fit import fit

    from conftest import smoke_config

    cfg = smoke_config(tmp_path / "root", tmp_path / "run", "callbacks.compile.mode=on",
                       "trainer.accelerator=cpu")
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run_record.json").exists()
