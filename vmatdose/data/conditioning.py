"""The plan's conditioning vector: what a case is prescribed, for a conditioned network.

Layout (``D = T + K`` floats, all >= 0), from the protocol:

* ``T`` target slots, in the protocol's target order: the case's prescription of that
  target divided by the protocol's dose scale (its highest prescription), 0 when the case
  lacks the target. A prostate case at 70/56 Gy gives (1.0, 0.8); at 60/50 Gy (0.857,
  0.714): the vector tells the levels apart, and the network predicts dose in the same
  units;
* ``K`` constraint slots, in the protocol's constraint order: the limit, normalised
  (``V`` metrics: % / 100; ``D`` metrics: Gy / dose scale). The per-case values: a case
  whose ``meta["constraints"]`` lists ``{structure, metric, limit}`` entries overrides the
  protocol's limit of the same structure and metric (a stricter rectum goal for one
  patient).

:class:`ConditionChanneld` puts the vector into the sample as ``condition`` (D,) and
appends it to ``image`` as ``D`` constant channels: the one input tensor then carries it
through patches, sliding windows, padding and flips to every predictor, and
:class:`vmatdose.models.film.FiLMNet` reads it back (spatial maximum, robust to the zero
padding) and strips those channels before the network.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform


def condition_size(targets: Sequence[str], constraints: Sequence[Mapping]) -> int:
    """``D``: one slot per protocol target and per protocol constraint."""
    return len(targets) + len(constraints)


def conditioning_spec(conditioning: str | None, targets: Sequence[str],
                      constraints: Sequence[Mapping] | None, dose_scale_gy: float
                      ) -> dict | None:
    """The :class:`ConditionChanneld` arguments for a model conditioning (``model.conditioning``
    as the data config sees it), ``None`` for ``none``."""
    if conditioning in (None, "none"):
        return None
    return {"targets": list(targets), "constraints": [dict(c) for c in constraints or ()],
            "dose_scale_gy": float(dose_scale_gy)}


def _normalised_limit(constraint: Mapping, dose_scale_gy: float) -> float:
    metric = str(constraint["metric"])
    limit = float(constraint["limit"])
    return limit / 100.0 if metric.startswith("V") else limit / dose_scale_gy


def condition_vector(prescriptions_gy: Mapping[str, float], targets: Sequence[str],
                     constraints: Sequence[Mapping], dose_scale_gy: float,
                     case_constraints: Sequence[Mapping] = ()) -> np.ndarray:
    """(D,) float32 conditioning vector of one case (see the module docstring).

    Args:
        prescriptions_gy: the case's target -> Gy.
        targets, constraints, dose_scale_gy: the protocol's.
        case_constraints: per-case ``{structure, metric, limit}`` overrides.
    """
    overrides = {(str(c["structure"]), str(c["metric"])): c for c in case_constraints}
    values = [float(prescriptions_gy.get(t, 0.0)) / dose_scale_gy for t in targets]
    for c in constraints:
        chosen = overrides.get((str(c["structure"]), str(c["metric"])), c)
        values.append(_normalised_limit(chosen, dose_scale_gy))
    vector = np.asarray(values, dtype=np.float32)
    if (vector < 0).any():
        raise ValueError(f"conditioning vector {vector.tolist()} has negative entries: "
                         "prescriptions and limits must be >= 0")
    return vector


def read_case_condition_inputs(path: str) -> tuple[dict[str, float], list[dict]]:
    """A case file's prescriptions (Gy) and per-case constraints (``meta["constraints"]``),
    read without loading its arrays."""
    try:
        with np.load(path) as data:
            prescriptions = json.loads(str(data["prescriptions_gy"]))
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: cannot read prescriptions_gy / meta ({err})") from err
    return {k: float(v) for k, v in prescriptions.items()}, list(meta.get("constraints", []))


class ConditionChanneld(MapTransform):
    """Add ``condition`` (D,) and append it to ``image`` (C, Z, Y, X) as D constant
    channels (C + D channels out). Needs ``path`` (the case file) in the sample."""

    def __init__(self, targets: Sequence[str], constraints: Sequence[Mapping],
                 dose_scale_gy: float, image_key: str = "image", path_key: str = "path"):
        super().__init__(keys=[image_key])
        self.targets = list(targets)
        self.constraints = [dict(c) for c in constraints]
        self.dose_scale_gy = float(dose_scale_gy)
        self.image_key, self.path_key = image_key, path_key

    @property
    def size(self) -> int:
        return condition_size(self.targets, self.constraints)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        prescriptions, case_constraints = read_case_condition_inputs(str(out[self.path_key]))
        vector = torch.from_numpy(condition_vector(
            prescriptions, self.targets, self.constraints, self.dose_scale_gy,
            case_constraints))
        image = torch.as_tensor(out[self.image_key])
        planes = vector[:, None, None, None].to(image.dtype).expand(-1, *image.shape[1:])
        out["condition"] = vector
        out[self.image_key] = torch.cat([image, planes], dim=0)
        return out
