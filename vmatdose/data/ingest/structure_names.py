"""Structure (ROI) names -> canonical names, built from a treatment-site protocol.

The protocol (``conf/protocol/<name>.yaml``, :class:`~vmatdose.protocol.Protocol`) maps
each canonical structure to its DICOM synonyms and names the external contour's synonyms::

    synonyms:
      PTV70: [PTV 70Gy, PTV_7000]
      Femur_L: [FemoralHead_L, Left Femur]
    body_synonyms: [Body, External]

Matching is case-insensitive and ignores spaces, ``_``, ``-`` and ``.``: the synonym
``PTV70`` also matches ``ptv_70`` and ``PTV-70``. The canonical name always matches itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vmatdose.protocol import Protocol

#: Canonical name given to the external contour (becomes ``Case.body``).
BODY = "Body"
_SEPARATORS = re.compile(r"[\s_\-.]+")


def normalise(name: str) -> str:
    """Lower case, separators (space, ``_``, ``-``, ``.``) removed: the matching key."""
    return _SEPARATORS.sub("", str(name)).lower()


@dataclass(frozen=True)
class StructureNameMap:
    """Case-insensitive synonym lookup; build with :meth:`from_protocol`.

    Attributes:
        canonical: canonical structure names in the mapping's order (body excluded).
        lookup: normalised synonym -> canonical name (``BODY`` for the external contour).
    """

    canonical: tuple[str, ...]
    lookup: Mapping[str, str]

    @classmethod
    def from_dict(cls, mapping: Mapping, where: str = "structure name mapping"
                  ) -> StructureNameMap:
        """Build from ``{"structures": {canonical: [synonyms]}, "body": [synonyms]}``."""
        structures = mapping.get("structures")
        if not isinstance(structures, Mapping) or not structures:
            raise ValueError(f"{where}: expected a non-empty 'structures' mapping "
                             "(canonical name -> list of synonyms)")
        lookup: dict[str, str] = {}
        groups = [(str(k), _as_list(v)) for k, v in structures.items()]
        groups.append((BODY, _as_list(mapping.get("body", []))))
        for canonical, synonyms in groups:
            for synonym in [canonical, *synonyms]:
                key = normalise(synonym)
                if lookup.get(key, canonical) != canonical:
                    raise ValueError(f"{where}: synonym {synonym!r} maps to both "
                                     f"{lookup[key]!r} and {canonical!r}")
                lookup[key] = canonical
        return cls(tuple(str(k) for k in structures), lookup)

    @classmethod
    def from_protocol(cls, protocol: Protocol) -> StructureNameMap:
        """The protocol's structures (mask channel order), synonyms and body synonyms."""
        structures = {name: list(protocol.synonyms.get(name, ())) for name in
                      protocol.structures}
        return cls.from_dict({"structures": structures, "body": list(protocol.body_synonyms)},
                             where=f"protocol {protocol.name!r}")

    def canonical_name(self, roi_name: str) -> str | None:
        """The canonical name of ``roi_name`` (``BODY`` for the external), or ``None``."""
        return self.lookup.get(normalise(roi_name))

    def match(self, roi_names: Iterable[str]) -> tuple[dict[str, str], list[str], list[str]]:
        """Map ROI names to canonical names.

        Returns:
            ``(chosen, unmapped, duplicates)``: canonical -> the first ROI name matching it,
            ROI names matching nothing, and ROI names dropped because an earlier ROI already
            matched the same canonical name.
        """
        chosen: dict[str, str] = {}
        unmapped: list[str] = []
        duplicates: list[str] = []
        for roi in roi_names:
            canonical = self.canonical_name(roi)
            if canonical is None:
                unmapped.append(roi)
            elif canonical in chosen:
                duplicates.append(roi)
            else:
                chosen[canonical] = roi
        return chosen, unmapped, duplicates


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]
