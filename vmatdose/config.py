"""Where the configs live, and the OmegaConf resolvers and config schemas they use
(``vmatdose.default``: a key's value from its target's ``__init__``).

Importing this module registers the resolvers and the schemas
(:mod:`vmatdose.config_schema`); every entry point imports it (through
``vmatdose/__init__.py``) before Hydra composes a config. ``vmatdose.input_channels`` is
the input specification's (:mod:`vmatdose.data.input_spec`), registered there.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from vmatdose.config_schema import register_schemas, target_parameters

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


def target_default(*, _parent_, _node_):
    """``key: ${vmatdose.default:}``: the default of the argument ``key`` of the
    ``_target_`` of the node holding it (a model's ``tta``: ``DoseModule``'s). A config
    lists such a key to make it visible and overridable on the command line without
    writing the value a second time: the target's ``__init__`` holds it."""
    key, target = _node_._key(), _parent_.get("_target_")
    param = (target_parameters(str(target)) or {}).get(key) if target else None
    if param is None or param.default is param.empty:
        raise ValueError(f"{key}: ${{vmatdose.default:}} needs a _target_ beside it with a "
                         f"default for {key!r} (target: {target})")
    default = param.default
    if isinstance(default, tuple | list | dict):  # a node, as the other resolvers return
        return OmegaConf.create(list(default) if isinstance(default, tuple) else default)
    return default


def _register() -> None:
    resolvers = {
        "vmatdose.default": target_default,
        "vmatdose.keys": keys,
        "vmatdose.concat": concat,
        "vmatdose.max_prescription": max_prescription,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register()
register_schemas()
