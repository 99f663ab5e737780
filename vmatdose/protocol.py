"""A treatment-site protocol: the one source of a site's structures, names and doses.

A protocol (``conf/protocol/<name>.yaml``, chosen with ``protocol=<name>``) holds what a
treatment site is: targets and their prescriptions (Gy), fractions, the required targets,
organs at risk, left/right pairs, DICOM name synonyms, clinical constraints, and the dose
scale (the highest prescription, Gy). Ingest, the data module, losses, evaluation, the
phantom and checkpoints read it; nothing else repeats these facts.

Mask channels are always ordered targets (in prescription order) then OARs:
:attr:`Protocol.structures`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmatdose.config import CONFIG_DIR
from vmatdose.errors import InputError

REQUIRE_RULES = ("all", "any")
#: The keys a protocol's ``beams`` may hold (read by :mod:`vmatdose.data.beams`):
#: ``gantry_deg`` (a list) or ``n_beams`` equispaced from ``start_deg``, then ``couch_deg``,
#: ``energy_mv``, ``delivery``.
BEAM_KEYS = ("gantry_deg", "n_beams", "start_deg", "couch_deg", "energy_mv", "delivery")


class ProtocolError(InputError):
    """A protocol that cannot be used (the message names its file and the key)."""


@dataclass(frozen=True)
class Protocol:
    """One treatment site.

    Attributes:
        name: protocol name (``prostate_sib``, ``head_neck``, ...).
        fractions: number of fractions.
        prescriptions_gy: target -> prescribed dose in Gy, highest first.
        oars: organ-at-risk names, in mask channel order after the targets.
        required_targets: targets a case must have (see ``required``).
        required: ``all`` (every required target) or ``any`` (at least one).
        lr_pairs: (left, right) structure pairs swapped by a left/right flip.
        synonyms: canonical name -> DICOM ROI synonyms.
        body_synonyms: ROI names of the external contour.
        constraints: clinical constraints ``{structure, metric, op, limit}``.
        beams: the default beam arrangement for cases that carry none
            (:mod:`vmatdose.data.beams`): ``gantry_deg`` or ``n_beams``, ``couch_deg``,
            ``energy_mv``, ``delivery``; the isocentre is the targets' centroid.
    """

    name: str
    fractions: int
    prescriptions_gy: dict[str, float]
    oars: tuple[str, ...]
    required_targets: tuple[str, ...]
    required: str = "all"
    lr_pairs: tuple[tuple[str, str], ...] = ()
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    body_synonyms: tuple[str, ...] = ()
    constraints: tuple[dict, ...] = ()
    beams: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"protocol {self.name!r} (conf/protocol/{self.name}.yaml)"
        if not self.prescriptions_gy:
            raise ValueError(f"{where}: no targets (prescriptions_gy is empty)")
        if self.required not in REQUIRE_RULES:
            raise ValueError(f"{where}: required must be one of {REQUIRE_RULES}, "
                             f"not {self.required!r}")
        unknown = [t for t in self.required_targets if t not in self.prescriptions_gy]
        if unknown:
            raise ValueError(f"{where}: required targets {unknown} have no prescription")
        names = set(self.structures)
        if len(names) != len(self.structures):
            raise ValueError(f"{where}: a structure is listed twice in {self.structures}")
        stray = sorted({s for pair in self.lr_pairs for s in pair} - names)
        stray += sorted({str(c["structure"]) for c in self.constraints} - names)
        if stray:
            raise ValueError(f"{where}: lr_pairs/constraints name unknown structures {stray}")
        problem = beams_problem(self.beams)
        if problem:
            raise ProtocolError(f"{where}: beams: {problem}")

    @property
    def targets(self) -> tuple[str, ...]:
        """Target names in prescription order (highest first)."""
        return tuple(self.prescriptions_gy)

    @property
    def structures(self) -> tuple[str, ...]:
        """Mask channel order: targets, then OARs."""
        return (*self.targets, *self.oars)

    @property
    def dose_scale_gy(self) -> float:
        """The dose normalisation: the highest prescription, Gy."""
        return max(self.prescriptions_gy.values())

    @property
    def max_dose_limits_gy(self) -> dict[str, float]:
        """Organ at risk -> the lowest limit (Gy) of its maximum-dose constraints
        (``metric: Dmax``, ``op`` ``<`` or ``<=``); organs without one are absent."""
        limits: dict[str, float] = {}
        for c in self.constraints:
            name = str(c["structure"])
            if name in self.oars and c["metric"] == "Dmax" and c["op"] in ("<", "<="):
                limits[name] = min(float(c["limit"]), limits.get(name, float("inf")))
        return limits

    def missing_targets(self, present: Iterable[str]) -> list[str]:
        """The required targets a case with structures ``present`` lacks; empty if it
        satisfies the protocol (``any``: empty when at least one is present)."""
        present = set(present)
        missing = [t for t in self.required_targets if t not in present]
        if self.required == "any" and len(missing) < len(self.required_targets):
            return []
        return missing

    def requirement_text(self) -> str:
        """``"PTV70 and PTV56"`` / ``"at least one of PTV70, PTV63, PTV56"``."""
        if self.required == "any":
            return "at least one of " + ", ".join(self.required_targets)
        return " and ".join(self.required_targets)

    def to_dict(self) -> dict:
        """Plain JSON-able form (checkpoints, run records); :meth:`from_dict` reads it."""
        out = asdict(self)
        out["oars"] = list(self.oars)
        out["required_targets"] = list(self.required_targets)
        out["lr_pairs"] = [list(p) for p in self.lr_pairs]
        out["synonyms"] = {k: list(v) for k, v in self.synonyms.items()}
        out["body_synonyms"] = list(self.body_synonyms)
        out["constraints"] = [dict(c) for c in self.constraints]
        out["beams"] = dict(self.beams)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Protocol:
        """Build from a protocol config (a mapping or DictConfig; derived keys ignored)."""
        data = _plain(data)
        try:
            return cls(
                name=str(data["name"]),
                fractions=int(data["fractions"]),
                prescriptions_gy={str(k): float(v)
                                  for k, v in data["prescriptions_gy"].items()},
                oars=tuple(str(s) for s in data.get("oars", ())),
                required_targets=tuple(str(s) for s in data.get("required_targets", ())),
                required=str(data.get("required", "all")),
                lr_pairs=tuple((str(a), str(b)) for a, b in data.get("lr_pairs", ())),
                synonyms={str(k): tuple(str(s) for s in (v or ()))
                          for k, v in (data.get("synonyms") or {}).items()},
                body_synonyms=tuple(str(s) for s in data.get("body_synonyms", ())),
                constraints=tuple(dict(c) for c in data.get("constraints", ())),
                beams=dict(data.get("beams") or {}),
            )
        except KeyError as err:
            raise ValueError(f"protocol config lacks the key {err.args[0]!r}") from err

    @classmethod
    def load(cls, name: str) -> Protocol:
        """The protocol ``conf/protocol/<name>.yaml``, read whole (a file that builds on
        another through its defaults list, like ``prostate_sib3``, is merged onto it).

        Read with OmegaConf, not by composing a Hydra config: this runs inside the Hydra
        apps (an OpenKBP folder imported by ``predict``), where Hydra's global state is
        taken."""
        available = available_protocols()
        if name not in available:
            raise ValueError(f"unknown protocol {name!r}; available: {', '.join(available)}")
        return cls.from_dict(_protocol_node(name))


def beams_problem(beams: Mapping) -> str:
    """What is wrong with a protocol's ``beams`` mapping (empty: nothing; an empty
    mapping is no default arrangement)."""
    if not beams:
        return ""
    unknown = [str(k) for k in beams if k not in BEAM_KEYS]
    if unknown:
        return (f"unknown key {', '.join(map(repr, unknown))} (allowed: "
                f"{', '.join(BEAM_KEYS)})")
    if ("gantry_deg" in beams) == ("n_beams" in beams):
        return "give either gantry_deg (a list of angles) or n_beams (equispaced), not both"
    if "n_beams" in beams:
        n = beams["n_beams"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return f"n_beams={n!r} must be an integer >= 1"
    elif not beams["gantry_deg"] or not all(_is_number(a) for a in beams["gantry_deg"]):
        return f"gantry_deg={beams['gantry_deg']!r} must be a non-empty list of angles"
    numbers = [k for k in ("start_deg", "couch_deg", "energy_mv")
               if k in beams and not _is_number(beams[k])]
    if numbers:
        return f"{numbers[0]}={beams[numbers[0]]!r} must be a number"
    return ""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _protocol_node(name: str):
    """``conf/protocol/<name>.yaml`` with its defaults list (other protocols, ``_self_``)
    merged in order, interpolations resolved."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(CONFIG_DIR) / "protocol" / f"{name}.yaml")
    defaults = list(node.pop("defaults", None) or ["_self_"])
    if "_self_" not in defaults:
        defaults.append("_self_")
    parts = [node if entry == "_self_" else _protocol_node(str(entry)) for entry in defaults]
    merged = OmegaConf.merge(*parts)
    return OmegaConf.to_container(OmegaConf.create({"protocol": merged}).protocol,
                                  resolve=True)


def available_protocols() -> list[str]:
    """Names of the protocols in ``conf/protocol/``."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "protocol").glob("*.yaml"))


def _plain(data: Mapping) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return dict(data)
    if isinstance(data, DictConfig):
        return OmegaConf.to_container(data, resolve=True)
    return dict(data)
