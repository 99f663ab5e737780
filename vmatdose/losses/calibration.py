"""Initial sigmas of learned (uncertainty) loss weights, from each term's magnitude.

With ``total = sum_i L_i / (2 sigma_i^2) + log sigma_i`` the best sigma for a term of
value ``L_i`` is ``sigma_i = sqrt(L_i)``; starting there gives every term the same share
of the initial loss, whatever its units (a squared target error is ~100 times smaller
than an L1 body error). The magnitudes are the weighted term values of the untrained
network on a few training batches, its output clipped to the range a prediction can
take (``[0, max_relative_dose]``): an untrained network's raw output is noise of order 1,
whose squared error would dwarf what the term measures once training starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from vmatdose.data.atomic import atomic_path
from vmatdose.losses.composite import CompositeLoss

#: sigmas are never set below this (a term that is 0 on the first batches)
MIN_SIGMA = 1e-4


@torch.no_grad()
def term_magnitudes(loss: CompositeLoss, predict: Callable[[torch.Tensor], torch.Tensor],
                    batches: Iterable[Mapping],
                    max_relative_dose: float | None = 1.5) -> dict[str, float]:
    """Term name -> mean of ``weight * L_i`` over ``batches`` (dicts of
    :mod:`vmatdose.data.pipeline` samples), with ``predict(image) -> (B, 1, Z, Y, X)``
    normalised dose, clipped to ``[0, max_relative_dose]``. Terms of weight 0 are left
    out."""
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        pred = predict(batch["image"]).clamp(0.0, max_relative_dose)
        _, values = loss(pred, batch)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + loss.weights[name] * float(value)
        count += 1
    if count == 0:
        raise ValueError("no batches to calibrate the loss on (the training split is empty)")
    return {name: total / count for name, total in sums.items()}


def sigmas_from_magnitudes(magnitudes: Mapping[str, float]) -> dict[str, float]:
    """``sigma_i = sqrt(L_i)`` (at least :data:`MIN_SIGMA`), rounded to 4 significant
    digits."""
    out = {}
    for name, value in magnitudes.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"loss term {name!r} has magnitude {value} on the calibration "
                             "batches; a non-negative finite value is needed")
        out[name] = float(f"{max(math.sqrt(value), MIN_SIGMA):.4g}")
    return out


def write_sigmas_yaml(sigmas: Mapping[str, float], path: str | Path, command: str) -> Path:
    """Write ``sigmas`` as a config of the ``loss/initial_sigmas`` group (it lands at
    ``loss.initial_sigmas``; include it with ``+loss/initial_sigmas=<file stem>``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# @package loss.initial_sigmas",
             "# Initial sigmas of loss.weighting=uncertainty, sigma = sqrt(term magnitude)",
             f"# on the untrained network, written by: {command}"]
    lines += [f"{name}: {value}" for name, value in sigmas.items()]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return path
