"""``callbacks.compile.mode``: the network's forward (and so its backward) compiled with
``torch.compile`` (inductor) for training, or left eager.

Compiling costs wall time inside the training budget (the first step, and again when
validation first runs the network in eval mode): measured 2.8 min under load on the
project's 2-core AVX2 EPYC for the CPU recipe's network, for no faster step there
(experiments/openkbp.md). So ``auto`` leaves the network eager; ``on`` compiles it
wherever inductor can build kernels (a C++ compiler on the CPU, Triton on CUDA), and a
machine without one is refused before training. The network is compiled in place
(``nn.Module.compile``), so its parameters and checkpoint keys are unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass

import lightning as L
import torch

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CompileChoice:
    """What the config asked for, whether the network is compiled, and why (for the run
    record)."""

    requested: str
    compiled: bool
    reason: str

    def to_dict(self) -> dict[str, str | bool]:
        return asdict(self)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (``$CXX``, else ``c++``, ``g++``,
    ``clang++``), or ``None``."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def choose_compile(requested: str, device_type: str) -> CompileChoice:
    """Resolve ``requested`` (one of :data:`MODES`) for a ``device_type`` (``cpu``,
    ``cuda``, ...): ``auto`` and ``off`` leave the network eager; ``on`` compiles it when
    inductor can build kernels there, else raises ``ValueError`` naming what is missing."""
    requested = str(requested)
    if requested not in MODES:
        raise ValueError(f"callbacks.compile.mode={requested!r}: use one of {', '.join(MODES)}")
    if requested == "off":
        return CompileChoice(requested, False, "set in the config")
    if requested == "auto":
        return CompileChoice(requested, False, "eager: compiling was not measured faster "
                             "for the recipe's step (experiments/openkbp.md)")
    if device_type == "cpu":
        compiler = cxx_compiler()
        if compiler is None:
            raise ValueError("callbacks.compile.mode=on: no C++ compiler on this machine "
                             "(inductor's CPU backend needs one: install g++ or set CXX)")
        return CompileChoice(requested, True, f"inductor, CPU kernels built with {compiler}")
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("callbacks.compile.mode=on: Triton is not installed "
                             "(inductor's CUDA backend needs it)") from err
        return CompileChoice(requested, True, "inductor, CUDA kernels built with Triton")
    raise ValueError(f"callbacks.compile.mode=on: no inductor backend for {device_type!r}")


def accelerator_device_type(accelerator: str) -> str:
    """``cuda`` or ``cpu``: where a Lightning ``accelerator`` setting trains."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


class CompileCallback(L.Callback):
    """Compile ``pl_module.net`` in place at fit start when :func:`choose_compile` says so
    for the module's device."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in MODES:  # a bad value fails at instantiation
            raise ValueError(f"callbacks.compile.mode={mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.choice: CompileChoice | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.choice = choose_compile(self.mode, pl_module.device.type)
        if self.choice.compiled:
            pl_module.net.compile()
            log.info("network compiled (%s)", self.choice.reason)
