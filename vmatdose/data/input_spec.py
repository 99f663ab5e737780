"""The network input's channel layout, owned in one place.

An :class:`InputSpec` is an ordered list of channel blocks, each a sample key and one name
per channel: ``ct`` (1), ``masks`` (one per structure), ``sdf`` (one per structure, with
``signed_distance``), ``prior`` (1, with ``prior_dose``; 1 + S with
``prior_dose.beam_sectors`` = S: the prior, then the fields of each gantry sector), and ``condition`` (one constant
plane per slot of the plan's conditioning vector, with ``conditioning``). The image a
model reads is the blocks concatenated in this order on the channel axis, (C, Z, Y, X).

The spec says how many channels there are (the model's ``in_channels``, through the
``vmatdose.input_channels`` resolver), where each block sits, how each channel is
resampled to another grid (``linear`` or ``nearest``; ``constant`` planes need neither),
and the channel order after a left/right mirror (paired structures swap places). It is
stored in the checkpoint contract (``inputs["spec"]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: How a block is brought to another grid: ``linear`` (CT, SDFs, prior dose), ``nearest``
#: (binary masks), ``constant`` (planes that hold one value each: the conditioning vector).
INTERPOLATIONS = ("linear", "nearest", "constant")
#: ``volume``: a (n, Z, Y, X) sample entry concatenated into the image; ``vector``: a (n,)
#: sample entry appended as n constant planes, read (and stripped) by the model itself.
KINDS = ("volume", "vector")


@dataclass(frozen=True)
class ChannelBlock:
    """Consecutive input channels from one sample key.

    Attributes:
        key: the sample entry holding the block (``ct``, ``masks``, ``sdf``, ...).
        names: one name per channel (a structure for ``masks`` and ``sdf``).
        interpolation: one of :data:`INTERPOLATIONS`.
        mirrored: a left/right flip swaps the channels of paired structures (``names``
            are structures).
        kind: one of :data:`KINDS`.
    """

    key: str
    names: tuple[str, ...]
    interpolation: str = "linear"
    mirrored: bool = False
    kind: str = "volume"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"input block {self.key!r}: interpolation must be one of "
                             f"{INTERPOLATIONS}, got {self.interpolation!r}")
        if self.kind not in KINDS:
            raise ValueError(f"input block {self.key!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")


@dataclass(frozen=True)
class InputSpec:
    """The ordered channel blocks of the network input and the left/right pairs."""

    blocks: tuple[ChannelBlock, ...]
    lr_pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        keys = [b.key for b in self.blocks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"input blocks repeat a key: {keys}")
        vectors = [i for i, b in enumerate(self.blocks) if b.kind == "vector"]
        if vectors and vectors[0] != len(self.blocks) - len(vectors):
            raise ValueError("vector blocks (constant planes) must come after every volume")

    @classmethod
    def build(cls, structures: Sequence[str], signed_distance: bool = False,
              prior: bool = False, condition: Sequence[str] = (),
              lr_pairs: Sequence[Sequence[str]] = (), prior_sectors: int = 0) -> InputSpec:
        """[CT, masks, (SDFs), (prior, (its ``prior_sectors`` gantry sectors)),
        (condition)] for ``structures``."""
        names = tuple(str(s) for s in structures)
        pairs = [(str(a), str(b)) for a, b in lr_pairs]
        blocks = [ChannelBlock("ct", ("CT",)),
                  ChannelBlock("masks", names, "nearest", mirrored=True)]
        if signed_distance:
            blocks.append(ChannelBlock("sdf", names, mirrored=True))
        if prior:
            sectors = sector_names(prior_sectors)
            blocks.append(ChannelBlock("prior", ("prior_dose", *sectors),
                                       mirrored=bool(prior_sectors)))
            pairs += sector_lr_pairs(prior_sectors)
        if condition:
            blocks.append(ChannelBlock("condition", tuple(condition), "constant",
                                       kind="vector"))
        return cls(tuple(blocks), tuple(pairs))

    @classmethod
    def from_data_config(cls, data: Mapping, conditioning: Mapping | None = None,
                         lr_pairs: Sequence[Sequence[str]] | None = None) -> InputSpec:
        """The spec of a data config (``structures``, ``signed_distance``, ``prior_dose``,
        ``lr_pairs``). ``conditioning``: the model's conditioning as
        :func:`vmatdose.data.conditioning.conditioning_spec` gives it (``targets``,
        ``constraints``), one plane per slot; ``None``: not conditioned. ``lr_pairs``
        overrides the data config's (a protocol's)."""
        condition = ()
        if conditioning:
            condition = [str(t) for t in conditioning["targets"]] + [
                f"{c['structure']} {c['metric']}" for c in conditioning["constraints"]]
        pairs = data.get("lr_pairs") if lr_pairs is None else lr_pairs
        prior = data.get("prior_dose")
        return cls.build(list(data["structures"]), bool(data.get("signed_distance", False)),
                         prior is not None, condition, [tuple(p) for p in pairs or ()],
                         prior_sectors(prior))

    @property
    def channels(self) -> list[str]:
        """``key/name`` of every channel, in order."""
        return [f"{b.key}/{n}" for b in self.blocks for n in b.names]

    def __len__(self) -> int:
        return sum(len(b.names) for b in self.blocks)

    @property
    def network_channels(self) -> int:
        """Channels the wrapped network reads (the volumes; vector planes are stripped
        by the model that reads them)."""
        return sum(len(b.names) for b in self.blocks if b.kind == "volume")

    @property
    def volume_keys(self) -> list[str]:
        """Sample keys concatenated, in order, into the image."""
        return [b.key for b in self.blocks if b.kind == "volume"]

    def has(self, key: str) -> bool:
        return any(b.key == key for b in self.blocks)

    def slice(self, key: str) -> slice:
        """The channels of block ``key`` in the image."""
        start = 0
        for block in self.blocks:
            if block.key == key:
                return slice(start, start + len(block.names))
            start += len(block.names)
        raise KeyError(f"the input has no {key!r} channels (it has {[b.key for b in self.blocks]})")

    @property
    def interpolations(self) -> list[str]:
        """One of :data:`INTERPOLATIONS` per channel."""
        return [b.interpolation for b in self.blocks for _ in b.names]

    def block_lr_permutation(self, key: str) -> list[int]:
        """Channel order of block ``key`` alone after a left/right mirror."""
        block = next(b for b in self.blocks if b.key == key)
        return (lr_permutation(block.names, self.lr_pairs) if block.mirrored
                else list(range(len(block.names))))

    def lr_permutation(self) -> list[int]:
        """Channel order after a left/right mirror: in every ``mirrored`` block each
        (left, right) pair present swaps places (``Femur_L`` stays the patient's left
        femur); the other channels stay."""
        order, start = [], 0
        for block in self.blocks:
            local = (lr_permutation(block.names, self.lr_pairs) if block.mirrored
                     else range(len(block.names)))
            order += [start + i for i in local]
            start += len(block.names)
        return order

    def to_dict(self) -> dict:
        """Plain JSON-able form (stored in the checkpoint contract)."""
        return {"blocks": [{"key": b.key, "names": list(b.names),
                            "interpolation": b.interpolation, "mirrored": b.mirrored,
                            "kind": b.kind} for b in self.blocks],
                "lr_pairs": [list(p) for p in self.lr_pairs]}

    @classmethod
    def from_dict(cls, data: Mapping) -> InputSpec:
        return cls(tuple(ChannelBlock(str(b["key"]), tuple(str(n) for n in b["names"]),
                                      str(b["interpolation"]), bool(b["mirrored"]),
                                      str(b["kind"])) for b in data["blocks"]),
                   tuple((str(a), str(c)) for a, c in data.get("lr_pairs") or ()))


def prior_sectors(prior_dose: Mapping | None) -> int:
    """The gantry sectors (``beam_sectors``) a ``data.prior_dose`` config asks for."""
    return int((prior_dose or {}).get("beam_sectors", 0) or 0)


def sector_names(sectors: int) -> tuple[str, ...]:
    """Channel names of ``sectors`` gantry sectors, sector ``k`` centred on
    ``k * 360 / sectors`` degrees (:func:`vmatdose.data.beam_prior.gantry_sectors`):
    ``beams_000``, ``beams_040``, ... (the centre in whole degrees)."""
    return tuple(f"beams_{round(k * 360 / sectors) % 360:03d}" for k in range(sectors))


def sector_lr_pairs(sectors: int) -> list[tuple[str, str]]:
    """Sector channels a left/right mirror swaps: gantry angle g becomes -g, so sector k
    becomes sector -k (mod ``sectors``)."""
    names = sector_names(sectors)
    return [(names[k], names[sectors - k]) for k in range(1, (sectors + 1) // 2)]


def lr_permutation(structures: Sequence[str], pairs: Sequence[Sequence[str]]) -> list[int]:
    """Channel order of ``structures`` after a left/right mirror: each (left, right) pair
    present swaps places (``Femur_L`` stays the patient's left femur)."""
    structures = list(structures)
    permutation = list(range(len(structures)))
    for left, right in pairs:
        if left in structures and right in structures:
            i, j = structures.index(left), structures.index(right)
            permutation[i], permutation[j] = j, i
    return permutation


def input_channels(data: Mapping, extra: int = 0) -> int:
    """The ``vmatdose.input_channels`` resolver: the channels a network reads for data
    config ``data`` (``${vmatdose.input_channels:${data}}``), plus ``extra`` (the dose
    channel of networks that also see a dose: critic, denoiser)."""
    return InputSpec.from_data_config(data).network_channels + int(extra)


def prior_channel(data: Mapping, offset: int = 0) -> int:
    """The ``vmatdose.prior_channel`` resolver: the index of the prior-dose channel in the
    image of data config ``data``, plus ``offset`` (a generative model's
    ``model.prior_channel: ${vmatdose.prior_channel:${data}}``)."""
    spec = InputSpec.from_data_config(data)
    if not spec.has("prior"):
        raise ValueError("this data config has no prior-dose channel: set data.prior_dose "
                         "(e.g. /prior_dose@data.prior_dose: openkbp) to read the prior")
    return spec.slice("prior").start + int(offset)


def register_resolver() -> None:
    """Register ``vmatdose.input_channels`` and ``vmatdose.prior_channel``
    (``vmatdose/__init__.py`` calls it, so every config composed after
    ``import vmatdose...`` can use them)."""
    from omegaconf import OmegaConf

    for name, fn in (("vmatdose.input_channels", input_channels),
                     ("vmatdose.prior_channel", prior_channel)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
