"""Structure (ROI) names -> canonical names, from a YAML mapping in ``conf/structure_names``.

The YAML maps each canonical name to its synonyms, plus a ``body`` list for the external
contour::

    structures:
      PTV70: [PTV70, PTV 70Gy, PTV_7000]
      Femur_L: [Femur_L, FemoralHead_L, Left Femur]
    body: [Body, External]

Matching is case-insensitive and ignores spaces, ``_``, ``-`` and ``.``: the synonym
``PTV70`` also matches ``ptv_70`` and ``PTV-70``. The canonical name always matches itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from vmatdose.config import CONFIG_DIR

#: Canonical name given to the external contour (becomes ``Case.body``).
BODY = "Body"
_SEPARATORS = re.compile(r"[\s_\-.]+")


def normalise(name: str) -> str:
    """Lower case, separators (space, ``_``, ``-``, ``.``) removed: the matching key."""
    return _SEPARATORS.sub("", str(name)).lower()


@dataclass(frozen=True)
class StructureNameMap:
    """Case-insensitive synonym lookup; build with :meth:`load` or :meth:`from_dict`.

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
    def load(cls, name_or_path: str | os.PathLike) -> StructureNameMap:
        """A YAML file path, or the name of a file in ``conf/structure_names/``."""
        path = resolve_mapping_path(name_or_path)
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        return cls.from_dict(data, where=str(path))

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


def resolve_mapping_path(name_or_path: str | os.PathLike) -> Path:
    """``prostate`` -> ``conf/structure_names/prostate.yaml``; an existing path as is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = Path(CONFIG_DIR) / "structure_names" / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in (Path(CONFIG_DIR) / "structure_names").glob("*.yaml"))
    raise FileNotFoundError(f"structure name mapping {str(name_or_path)!r}: neither a file nor "
                            f"one of conf/structure_names/ ({', '.join(available)})")


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]
