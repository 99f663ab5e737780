"""The choices that tell runs apart, as flat top-level keys for the trackers.

A W&B runs table (or TensorBoard's HParams tab) groups and plots by top-level config keys;
the composed config nests them (``loss.terms.gradient.weight``) and names no config group.
:func:`run_choices` gives ``loss_name: grad``, ``loss_weight_gradient: 0.2``, ``seed: 2``.
"""

from __future__ import annotations

from collections.abc import Mapping

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

#: Hydra config groups whose choice becomes a flat key (``loss`` -> ``loss_name``).
CHOICE_GROUPS = ("experiment", "data", "model", "loss")


def run_choices(cfg: DictConfig, choices: Mapping[str, object] | None = None) -> dict:
    """``<group>_name`` for the chosen ``experiment``, ``data``, ``model`` and ``loss``
    configs (a list of loss configs joined by ``+``), ``loss_weighting``,
    ``loss_weight_<term>`` (the configured weight of every loss term) and ``seed``.

    ``choices`` (group -> chosen config) defaults to Hydra's record of the running job;
    outside a Hydra app only the keys read from ``cfg`` are given.
    """
    if choices is None:
        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    flat: dict = {}
    for group in CHOICE_GROUPS:
        choice = choices.get(group)
        if isinstance(choice, (list, tuple, ListConfig)):
            flat[f"{group}_name"] = "+".join(str(c) for c in choice)
        elif choice is not None:
            flat[f"{group}_name"] = str(choice).strip("[]").replace(", ", "+")
    loss = cfg.get("loss") or {}
    if "terms" in loss:
        flat["loss_weighting"] = str(loss.get("weighting", "fixed"))
        for term, spec in loss.terms.items():
            if spec is not None and "weight" in spec:
                flat[f"loss_weight_{term}"] = float(spec.weight)
    if cfg.get("seed") is not None:
        flat["seed"] = int(cfg.seed)
    return flat
