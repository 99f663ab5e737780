"""A case's beam arrangement: which fields deliver its dose, as data.

Stored in the case file under ``meta["beams"]`` (plain JSON; beam angles and the
isocentre identify nobody, so ingest may keep them):

    {"gantry_deg": [...], "couch_deg": [...], "isocentre_mm": [z, y, x],
     "energy_mv": 6.0, "delivery": "static" | "arc", "source": "rtplan" | "openkbp" |
     "protocol" | "phantom"}

Angles are IEC 61217 degrees (gantry 0: the beam enters from anterior, heading
posterior, for a head-first-supine patient; 90: enters from the patient's left); plans
of other patient positions are converted to the same beam directions at ingest
(:func:`vmatdose.data.ingest.dicom_plan.hfs_gantry_deg`); an arc is listed by the gantry
angles of its control points. ``isocentre_mm`` is in the case
file's patient coordinates (z, y, x), the same frame as ``origin_mm``.

A case without ``meta["beams"]`` takes its protocol's default arrangement
(``conf/protocol/<site>.yaml``, key ``beams``), with the isocentre at the centroid of
the case's targets (:func:`beam_arrangement`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DELIVERIES = ("static", "arc")
SOURCES = ("rtplan", "openkbp", "protocol", "phantom")


@dataclass(frozen=True)
class BeamArrangement:
    """Fields of one plan.

    Attributes:
        gantry_deg: (B,) gantry angle of each field (or arc control point), IEC degrees.
        couch_deg: (B,) couch angle of each, IEC degrees (0: coplanar).
        isocentre_mm: (z, y, x) isocentre in patient mm.
        energy_mv: nominal photon energy (MV).
        delivery: ``static`` fields or an ``arc`` sampled at its control points.
        source: where the arrangement came from.
    """

    gantry_deg: tuple[float, ...]
    couch_deg: tuple[float, ...]
    isocentre_mm: tuple[float, float, float]
    energy_mv: float = 6.0
    delivery: str = "static"
    source: str = "protocol"

    def __post_init__(self) -> None:
        if not self.gantry_deg:
            raise ValueError("a beam arrangement needs at least one gantry angle")
        if len(self.couch_deg) != len(self.gantry_deg):
            raise ValueError(f"beam arrangement: {len(self.gantry_deg)} gantry angles but "
                             f"{len(self.couch_deg)} couch angles")
        if len(self.isocentre_mm) != 3:
            raise ValueError(f"beam arrangement: isocentre_mm needs (z, y, x), got "
                             f"{self.isocentre_mm}")
        if self.delivery not in DELIVERIES:
            raise ValueError(f"beam arrangement: delivery must be one of {DELIVERIES}, "
                             f"not {self.delivery!r}")
        if self.source not in SOURCES:
            raise ValueError(f"beam arrangement: source must be one of {SOURCES}, "
                             f"not {self.source!r}")
        if not self.energy_mv > 0:
            raise ValueError(f"beam arrangement: energy_mv must be > 0, got {self.energy_mv}")

    @property
    def coplanar(self) -> bool:
        return all(abs(c) < 1e-6 for c in self.couch_deg)

    def to_meta(self) -> dict:
        """The JSON form stored in ``meta["beams"]``."""
        out = asdict(self)
        out["gantry_deg"] = [float(a) for a in self.gantry_deg]
        out["couch_deg"] = [float(a) for a in self.couch_deg]
        out["isocentre_mm"] = [float(v) for v in self.isocentre_mm]
        return out

    @classmethod
    def from_meta(cls, value: Mapping) -> BeamArrangement:
        """Inverse of :meth:`to_meta`; ``ValueError`` naming the bad field."""
        try:
            gantry = tuple(float(a) for a in value["gantry_deg"])
            couch = tuple(float(a) for a in value.get("couch_deg", [0.0] * len(gantry)))
            iso = tuple(float(v) for v in value["isocentre_mm"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"meta['beams'] is malformed ({err!r}); expected gantry_deg, "
                             "couch_deg, isocentre_mm lists") from err
        return cls(gantry, couch, iso, float(value.get("energy_mv", 6.0)),
                   str(value.get("delivery", "static")), str(value.get("source", "rtplan")))


def equispaced_gantry_deg(n: int, start_deg: float = 0.0) -> list[float]:
    """``n`` gantry angles, equally spaced over a full turn from ``start_deg``."""
    return [float((start_deg + 360.0 * i / n) % 360.0) for i in range(n)]


def targets_centroid_mm(masks: np.ndarray, spacing_mm: Sequence[float],
                        origin_mm: Sequence[float]) -> tuple[float, float, float]:
    """(z, y, x) patient-mm centroid of the union of ``masks`` (T, Z, Y, X)."""
    union = np.asarray(masks).astype(bool).any(0)
    if not union.any():
        raise ValueError("no target voxels: cannot place the isocentre at the targets")
    idx = np.argwhere(union).mean(0)
    return tuple(float(o + i * s) for o, i, s in zip(origin_mm, idx, spacing_mm))


def default_arrangement(protocol_beams: Mapping, isocentre_mm: Sequence[float],
                        source: str = "protocol") -> BeamArrangement:
    """The protocol's ``beams`` settings (``gantry_deg`` list or ``n_beams`` equispaced,
    ``couch_deg``, ``energy_mv``, ``delivery``) around ``isocentre_mm``."""
    gantry = protocol_beams.get("gantry_deg")
    if gantry is None:
        gantry = equispaced_gantry_deg(int(protocol_beams["n_beams"]),
                                       float(protocol_beams.get("start_deg", 0.0)))
    couch = float(protocol_beams.get("couch_deg", 0.0))
    return BeamArrangement(tuple(float(g) for g in gantry), (couch,) * len(gantry),
                           tuple(float(v) for v in isocentre_mm),
                           float(protocol_beams.get("energy_mv", 6.0)),
                           str(protocol_beams.get("delivery", "static")), source)
