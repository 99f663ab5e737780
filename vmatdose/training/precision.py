"""``trainer.precision=auto``: the numeric precision a run trains in, chosen from what the
processor can do fast.

bf16 autocast pays off only where the hardware has bf16 arithmetic: CUDA devices, and CPUs
with AVX-512 BF16 or AMX. On an AVX2-only CPU, bf16 autocast runs in emulation and was
measured 55x slower than fp32 (experiments/openkbp.md), so there the choice is fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: /proc/cpuinfo flags that mean the CPU computes bf16 natively (oneDNN uses them).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """What the config asked for, what Lightning gets, and why (for the run record)."""

    requested: str
    chosen: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first processor in ``cpuinfo`` (empty where unreadable,
    e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def uses_cuda(accelerator: str) -> bool:
    """Whether a Lightning ``accelerator`` setting ends up on a CUDA device."""
    return accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available())


def choose_precision(requested: str | int, accelerator: str,
                     flags: set[str] | None = None) -> PrecisionChoice:
    """Resolve ``requested`` (``"auto"`` or any Lightning precision, kept as given) for
    ``accelerator``: ``auto`` is ``bf16-mixed`` on CUDA and on CPUs with one of
    :data:`BF16_CPU_FLAGS`, else ``32-true``. ``flags`` defaults to this machine's."""
    requested = str(requested)
    if requested in ("16-mixed", "16") and not uses_cuda(accelerator):
        # what Lightning itself does (with a warning): the run record says what ran
        return PrecisionChoice(requested, "bf16-mixed", "fp16 AMP is not supported on the CPU "
                               "(Lightning trains in bf16-mixed instead)")
    if requested != "auto":
        return PrecisionChoice(requested, requested, "set in the config")
    if uses_cuda(accelerator):
        return PrecisionChoice(requested, "bf16-mixed", "CUDA device")
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(BF16_CPU_FLAGS) & flags)
    if native:
        return PrecisionChoice(requested, "bf16-mixed", f"CPU with {', '.join(native)}")
    return PrecisionChoice(requested, "32-true",
                           f"CPU without {' or '.join(BF16_CPU_FLAGS)} (bf16 would be emulated)")
