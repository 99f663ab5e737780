"""Where the configs live, and the OmegaConf resolvers and config schemas they use.

Importing this module registers the resolvers and the schemas
(:mod:`vmatdose.config_schema`); every entry point imports it (through
``vmatdose/__init__.py``) before Hydra composes a config. ``vmatdose.input_channels`` is
the input specification's (:mod:`vmatdose.data.input_spec`), registered there.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from vmatdose.config_schema import register_schemas

#: Absolute path of the repository's ``conf/`` folder, so configs are found from any
#: working directory.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def max_prescription(prescriptions: dict) -> float:
    """Highest prescription in Gy (the dose normalisation)."""
    return float(max(prescriptions.values()))


def keys(mapping: dict) -> ListConfig:
    """The keys of a mapping, in order (a protocol's targets from its prescriptions)."""
    return OmegaConf.create([str(k) for k in mapping])


def concat(*lists: list) -> ListConfig:
    """The lists joined in order (a protocol's structures: targets, then OARs)."""
    return OmegaConf.create([item for part in lists for item in part])


def _register() -> None:
    resolvers = {
        "vmatdose.keys": keys,
        "vmatdose.concat": concat,
        "vmatdose.max_prescription": max_prescription,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register()
register_schemas()
