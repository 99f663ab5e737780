"""The checkpoint contract: what a vmatdose checkpoint carries, and the one way to read it.

Training stores one plain-JSON dict under ``checkpoint["vmatdose"]`` (the module's
``on_save_checkpoint``; Lightning's ``save_hyperparameters`` is not used, so the config is
in the file once). Every value in it is a str, number, bool, None, list or dict, and the
rest of a Lightning checkpoint (state dicts, loop and callback state) is tensors and plain
containers, so the file loads with ``torch.load(..., weights_only=True)``: nothing in it is
unpickled as an object and nothing in it runs. :func:`read_checkpoint` is the only place
that opens a checkpoint file.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vmatdose.data.body_region import POSSIBLE_DOSE_MASK
from vmatdose.data.conditioning import conditioning_spec
from vmatdose.data.grid_rule import OPENKBP, GridRule
from vmatdose.data.input_spec import InputSpec
from vmatdose.data.validation import SpacingRange
from vmatdose.errors import InputError
from vmatdose.protocol import Protocol

log = logging.getLogger(__name__)

#: The checkpoint key holding the contract.
CHECKPOINT_KEY = "vmatdose"
#: Version of the contract layout; a checkpoint of another version is refused.
CONTRACT_VERSION = 1
#: ``_target_`` prefixes a checkpoint's model config may name. The config is rebuilt with
#: Hydra, so without this a crafted (weights-only loadable) config could call anything.
ALLOWED_TARGETS = ("vmatdose.models.", "vmatdose.training.", "monai.networks.", "monai.losses.",
                   "torch.optim.")


class CheckpointError(InputError):
    """A file given as a checkpoint is not a usable vmatdose checkpoint."""


@dataclass(frozen=True)
class CheckpointContract:
    """What inference needs to use a trained model on new cases.

    Attributes:
        config: the composed, resolved training config (the model is rebuilt from
            ``config["model"]``).
        protocol: :meth:`vmatdose.protocol.Protocol.to_dict` of the training protocol.
        structures: mask channel order of the network input.
        inputs: input transform settings: ``ct_window`` (HU, HU), ``signed_distance``,
            ``sdf_scale_mm``, ``dose_scale_gy`` (the network's dose unit, Gy),
            ``resolution_factor`` (the data's pooling, the grid the network learnt), and
            ``spec``: the :class:`~vmatdose.data.input_spec.InputSpec` (channel layout).
        spacing: :meth:`SpacingRange.to_dict` of the training cases' voxel spacings.
        cases_dir: absolute path of the folder of case files it was trained on.
        split: ``{"train": [...], "val": [...], "test": [...]}`` case ids (file stems).
        version: :data:`CONTRACT_VERSION`.
        body: the kinds of region the training cases' ``body`` is
            (:mod:`vmatdose.data.body_region`: ``possible-dose mask``, ``external
            contour``); empty in a checkpoint written before it was recorded.
        grid_rule: :meth:`GridRule.to_dict` of the rule that put the training cases on
            their grid (``{}``: one training spacing); ``None`` in a checkpoint written
            before it was recorded (then inferred from ``body``: OpenKBP's
            possible-dose mask comes with OpenKBP's rule).
    """

    config: dict
    protocol: dict
    structures: list[str]
    inputs: dict
    spacing: dict
    cases_dir: str
    split: dict[str, list[str]]
    version: int = CONTRACT_VERSION
    body: list[str] = field(default_factory=list)
    grid_rule: dict | None = None

    @property
    def grid_rule_obj(self) -> GridRule:
        """The training cases' grid rule (:mod:`vmatdose.data.grid_rule`)."""
        if self.grid_rule is not None:
            return GridRule.from_dict(self.grid_rule)
        return OPENKBP if self.body == [POSSIBLE_DOSE_MASK] else GridRule()

    @property
    def protocol_obj(self) -> Protocol:
        return Protocol.from_dict(self.protocol)

    @property
    def spacing_range(self) -> SpacingRange:
        return SpacingRange.from_dict(self.spacing)

    @property
    def dose_scale_gy(self) -> float:
        return float(self.inputs["dose_scale_gy"])

    @property
    def input_spec(self) -> InputSpec:
        return contract_input_spec(asdict(self))

    def split_paths(self, name: str) -> list[Path]:
        """Case file paths of split ``name`` (``all``: every split) in ``cases_dir``."""
        names = [n for part in self.split.values() for n in part] if name == "all" \
            else self.split[name]
        return [Path(self.cases_dir) / f"{case_id}.npz" for case_id in names]

    def to_dict(self) -> dict:
        """Plain JSON-able form (what the checkpoint stores)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = "checkpoint") -> CheckpointContract:
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: the vmatdose contract is not a mapping")
        if data.get("version") != CONTRACT_VERSION:
            raise CheckpointError(f"{where}: checkpoint contract version "
                                  f"{data.get('version')!r}; this vmatdose reads "
                                  f"{CONTRACT_VERSION} (retrain or use a matching vmatdose)")
        optional = ("body", "grid_rule")
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__
                          if k not in optional or k in data})
        except KeyError as err:
            raise CheckpointError(f"{where}: checkpoint contract lacks {err.args[0]!r}") from err


def contract_input_spec(contract: Mapping) -> InputSpec:
    """The input specification of a contract (as stored, a dict): ``inputs["spec"]``, or
    for a checkpoint written before the spec was stored, the one its ``structures``,
    ``inputs`` and protocol ``lr_pairs`` describe (the layout those versions built)."""
    inputs = contract.get("inputs") or {}
    if "spec" in inputs:
        return InputSpec.from_dict(inputs["spec"])
    data = {"structures": contract["structures"],
            "signed_distance": inputs.get("signed_distance", False),
            "prior_dose": inputs.get("prior_dose")}
    return InputSpec.from_data_config(data, inputs.get("conditioning"),
                                      (contract.get("protocol") or {}).get("lr_pairs") or [])


def training_contract(cfg: Mapping, spacing: SpacingRange, cases_dir: str | Path,
                      split: Mapping[str, list[str]], body: Sequence[str] = (),
                      grid_rule: GridRule | None = None) -> CheckpointContract:
    """The contract of a training run composed as ``cfg`` (resolved mapping or DictConfig);
    ``body``: the kinds of body region of its cases (:func:`vmatdose.data.body_region.body_kinds`);
    ``grid_rule``: the rule of their grid (:func:`vmatdose.data.grid_rule.training_grid_rule`)."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = plain["data"]
    protocol = Protocol.from_dict(plain["protocol"])
    conditioning = conditioning_spec(data.get("conditioning"), protocol.targets,
                                     protocol.constraints, float(data["dose_scale_gy"]))
    return CheckpointContract(
        config=json.loads(json.dumps(plain)),
        protocol=protocol.to_dict(),
        structures=[str(s) for s in data["structures"]],
        inputs={"ct_window": [float(v) for v in data["ct_window"]],
                "signed_distance": bool(data["signed_distance"]),
                "sdf_scale_mm": float(data["sdf_scale_mm"]),
                "dose_scale_gy": float(data["dose_scale_gy"]),
                "prior_dose": data.get("prior_dose"),
                "conditioning": conditioning,
                "resolution_factor": int(data.get("resolution_factor", 1)),
                "spec": InputSpec.from_data_config(data, conditioning,
                                                   protocol.lr_pairs).to_dict()},
        spacing=spacing.to_dict(),
        cases_dir=str(Path(cases_dir).resolve()),
        split={k: [str(i) for i in v] for k, v in split.items()},
        body=[str(b) for b in body],
        grid_rule=(grid_rule or GridRule()).to_dict())


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read once: its contract and its weights."""

    path: Path
    contract: CheckpointContract
    state_dict: dict[str, torch.Tensor]

    def build_module(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The LightningModule rebuilt from the contract's model config with these
        weights, in eval mode on ``device`` (no loss, optimizer or scheduler)."""
        import hydra
        from omegaconf import OmegaConf

        model_cfg = self.contract.config.get("model")
        if not isinstance(model_cfg, Mapping):
            raise CheckpointError(f"{self.path}: the contract's config has no model section")
        # Inference needs no optimizer or scheduler: their configs are dropped unread.
        model_cfg = {**model_cfg, "loss": None, "optimizer": None, "scheduler": None,
                     **self._learnt_grid(model_cfg)}
        _check_targets(model_cfg, self.path)
        try:
            module = hydra.utils.instantiate(OmegaConf.create(model_cfg))
        except Exception as err:  # instantiate wraps any constructor error
            raise CheckpointError(f"{self.path}: cannot rebuild the model from the "
                                  f"checkpoint's config ({str(err).splitlines()[0]})") from err
        # Loss modules with parameters (a discriminator) are not needed for inference.
        state = {k: v for k, v in self.state_dict.items() if not k.startswith("loss.")}
        problem = weights_mismatch(module.state_dict(), state)
        if problem:
            raise CheckpointError(f"{self.path}: the weights do not fit the model rebuilt "
                                  f"from its config: {problem}")
        module.load_state_dict(state, strict=True)
        module.contract = self.contract.to_dict()
        return module.eval().to(device)

    def _learnt_grid(self, model_cfg: Mapping) -> dict:
        """``{"resolution_factor": f}`` with the data's factor f when the model config
        says otherwise (a checkpoint trained before the model followed the data: the
        network learnt on volumes pooled by f, so inference pools by f)."""
        data = self.contract.config.get("data") or {}
        data_f = int(self.contract.inputs.get("resolution_factor",
                                              data.get("resolution_factor", 1)))
        model_f = int(model_cfg.get("resolution_factor", 1))
        if model_f == data_f:
            return {}
        log.warning("%s: trained on volumes pooled by %d (data.resolution_factor) but its "
                    "model.resolution_factor is %d; predicting on the training grid (%d)",
                    self.path, data_f, model_f, data_f)
        return {"resolution_factor": data_f}


def weights_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                     shown: int = 3) -> str:
    """What keeps ``given`` weights from loading strictly into a module whose state dict is
    ``expected``, in one line (missing, unexpected and wrong-shape keys, the first
    ``shown`` of each named); empty when they fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} {tuple(given[k].shape)} instead of {tuple(expected[k].shape)}"
             for k in expected if k in given and given[k].shape != expected[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{label} {len(keys)}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def _check_targets(cfg: Any, path: Path) -> None:
    if isinstance(cfg, Mapping):
        target = cfg.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGETS):
            raise CheckpointError(f"{path}: the checkpoint's model config names "
                                  f"{target!r}, which is not a vmatdose or MONAI network")
        for value in cfg.values():
            _check_targets(value, path)
    elif isinstance(cfg, list):
        for value in cfg:
            _check_targets(value, path)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` once with ``weights_only=True`` and check it is a vmatdose checkpoint;
    any other file raises :class:`CheckpointError` with one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises a zoo of errors on foreign files
        raise CheckpointError(f"{path}: not a vmatdose checkpoint "
                              f"({_load_problem(err, path)})") from None
    if not isinstance(raw, Mapping) or CHECKPOINT_KEY not in raw:
        raise CheckpointError(f"{path}: not a vmatdose checkpoint (no {CHECKPOINT_KEY!r} "
                              "contract; a checkpoint of another project?)")
    contract = CheckpointContract.from_dict(raw[CHECKPOINT_KEY], path)
    state = raw.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise CheckpointError(f"{path}: the checkpoint has no state_dict of tensors")
    return Checkpoint(path, contract, dict(state))


def _load_problem(err: Exception, path: Path) -> str:
    """A short reason why ``torch.load`` refused a file (its own messages run to pages)."""
    text = str(err)
    if "Weights only load failed" in text:
        return "it holds Python objects that a weights-only load refuses to run"
    with path.open("rb") as handle:
        zipped = handle.read(2) == b"PK"
    if zipped and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                pickled = any(n.endswith("data.pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            pickled = True
        if not pickled:
            return "a zip archive, such as an .npz, but not a PyTorch checkpoint"
    if zipped:  # a checkpoint's zip with its end cut off or bytes damaged
        return "a truncated or corrupt checkpoint"
    return f"not a PyTorch checkpoint file: unreadable as one ({type(err).__name__})"


def check_resume_checkpoint(path: str | Path, cfg: Mapping) -> CheckpointContract:
    """Refuse, with one :class:`CheckpointError` line naming ``path``, a checkpoint that
    training cannot resume with the composed ``cfg``: not a vmatdose checkpoint (crafted,
    truncated, another project's), or trained under another protocol, structure set or
    network. The same reading as ``predict`` and ``evaluate`` (:func:`read_checkpoint`)."""
    checkpoint = read_checkpoint(path)
    contract = checkpoint.contract
    protocol = Protocol.from_dict(cfg["protocol"])
    if contract.protocol.get("name") != protocol.name:
        raise CheckpointError(f"{path}: trained with protocol {contract.protocol.get('name')!r}; "
                              f"this run's is {protocol.name!r} (resume with the same protocol "
                              "and data)")
    structures = [str(s) for s in cfg["data"]["structures"]]
    if list(contract.structures) != structures:
        raise CheckpointError(f"{path}: trained with structure channels {contract.structures}; "
                              f"this run's are {structures}")
    trained_net = (contract.config.get("model") or {}).get("net")
    run_net = cfg["model"].get("net") if isinstance(cfg["model"], Mapping) else None
    if _plain(trained_net) != _plain(run_net):
        raise CheckpointError(f"{path}: trained with another network (model.net) than this "
                              "run's; resume with the checkpoint's model settings")
    return contract


def _plain(cfg: Any) -> Any:
    """A config node as plain containers (resolved), for comparison."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg)) if cfg is not None else None
