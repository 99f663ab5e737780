"""Case files checked against a protocol and a voxel spacing, before long work starts.

Training checks every case file of every split (:func:`check_training_cases`); prediction
and evaluation check every case against the checkpoint's contract
(:class:`vmatdose.inference.Predictor`). Each problem is one phrase; a set of bad files is
reported as one line (:class:`CaseSetError`) naming each file and its problem.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmatdose.data.case import CaseHeader, CaseValidationError, read_case_header
from vmatdose.errors import InputError
from vmatdose.protocol import Protocol

log = logging.getLogger(__name__)

#: Relative spacing difference (per axis) beyond which a case is "at another spacing".
SPACING_TOLERANCE = 0.10


class CaseSetError(InputError):
    """One or more case files are unusable; the message names each file and problem."""


@dataclass(frozen=True)
class SpacingRange:
    """The voxel spacings a model was trained at, per axis ``(dz, dy, dx)`` in mm.

    Attributes:
        median_mm: per-axis median of the training cases (the resampling target).
        low_mm, high_mm: per-axis smallest and largest training spacing.
    """

    median_mm: tuple[float, float, float]
    low_mm: tuple[float, float, float]
    high_mm: tuple[float, float, float]

    @classmethod
    def of(cls, spacings: Sequence[Sequence[float]]) -> SpacingRange:
        arr = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
        return cls(*(tuple(float(v) for v in f(arr, axis=0))
                     for f in (np.median, np.min, np.max)))

    def contains(self, spacing_mm: Sequence[float], tolerance: float = SPACING_TOLERANCE) -> bool:
        """Whether every axis lies within ``tolerance`` (relative) of the training range."""
        s = np.asarray(spacing_mm, dtype=np.float64)
        return bool(np.all(s >= np.asarray(self.low_mm) * (1 - tolerance))
                    and np.all(s <= np.asarray(self.high_mm) * (1 + tolerance)))

    def describe(self) -> str:
        if self.low_mm == self.high_mm:
            return _mm(self.median_mm)
        return f"{_mm(self.low_mm)} to {_mm(self.high_mm)}"

    def to_dict(self) -> dict:
        return {"median_mm": list(self.median_mm), "low_mm": list(self.low_mm),
                "high_mm": list(self.high_mm)}

    @classmethod
    def from_dict(cls, data: Mapping) -> SpacingRange:
        return cls(*(tuple(float(v) for v in data[k]) for k in ("median_mm", "low_mm", "high_mm")))


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in spacing) + " mm"


def protocol_problems(header: CaseHeader, protocol: Protocol,
                      structures: Sequence[str] | None = None) -> list[str]:
    """What stops a case from being used with ``protocol`` and mask channels
    ``structures`` (default: the protocol's); empty when it fits.

    A case may lack OARs (their channel is zero) but not a required target, and may not
    carry structures the channels have no place for, nor another protocol's name.
    """
    structures = list(structures if structures is not None else protocol.structures)
    problems = []
    if header.protocol is not None and header.protocol != protocol.name:
        problems.append(f"case protocol {header.protocol!r} differs from {protocol.name!r}")
    unknown = [s for s in header.structures if s not in structures]
    if unknown:
        problems.append(f"structures {unknown} are not among the {protocol.name} "
                        f"channels ({', '.join(structures)})")
    missing = protocol.missing_targets(header.structures)
    if missing:
        problems.append(f"missing required target {', '.join(missing)} ({protocol.name} "
                        f"needs {protocol.requirement_text()})")
    return problems


def spacing_problem(header: CaseHeader, trained: SpacingRange,
                    tolerance: float = SPACING_TOLERANCE) -> str | None:
    """A phrase when the case's spacing is more than ``tolerance`` off the training range."""
    if trained.contains(header.spacing_mm, tolerance):
        return None
    return (f"voxel spacing {_mm(header.spacing_mm)} differs by more than {tolerance:.0%} "
            f"from the training spacing {trained.describe()}")


def read_headers(paths: Sequence[Path]) -> tuple[dict[Path, CaseHeader], dict[Path, str]]:
    """Headers of the readable case files, and the problem of each unreadable one or one
    with non-finite CT or dose voxels (:func:`nonfinite_problem`)."""
    headers, problems = {}, {}
    for path in paths:
        try:
            header = read_case_header(path)
            problem = nonfinite_problem(path)
        except (CaseValidationError, FileNotFoundError) as err:
            problems[path] = _strip_path(str(err), path)
            continue
        if problem:
            problems[path] = problem
        else:
            headers[path] = header
    return headers, problems


def nonfinite_problem(path: Path) -> str | None:
    """A phrase when the case file's ``dose`` or (float) ``ct`` holds NaN or inf voxels.

    One pass over the two arrays (decompressed one at a time, the masks are not read), so
    a bad file is refused before any training, figure or prediction is made.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            for name in ("dose", "ct"):
                if name not in data.files:
                    continue
                array = data[name]
                if not np.issubdtype(array.dtype, np.floating):
                    continue
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                if bad:
                    return f"{name} has {bad} non-finite voxels (NaN/inf)"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CaseValidationError(f"{path}: unreadable arrays ({err})") from err
    return None


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def raise_for_problems(problems: Mapping[Path, Sequence[str] | str], what: str) -> None:
    """One :class:`CaseSetError` line: ``N case files <what>: <file>: <problem>; ...``."""
    if not problems:
        return
    parts = [f"{path}: {p if isinstance(p, str) else '; '.join(p)}"
             for path, p in problems.items()]
    noun = "case file" if len(parts) == 1 else "case files"
    raise CaseSetError(f"{len(parts)} {noun} {what}: " + " | ".join(parts))


def check_cases(paths: Sequence[Path], protocol: Protocol,
                structures: Sequence[str] | None = None, spacing: SpacingRange | None = None,
                what: str = "not matching the protocol") -> None:
    """Raise one :class:`CaseSetError` naming every case file that is unreadable, of
    another protocol or structure set, lacks a required target, or (with ``spacing``) is
    more than 10 % off those spacings."""
    headers, unreadable = read_headers(list(paths))
    found: dict[Path, list[str]] = {p: [msg] for p, msg in unreadable.items()}
    for path, header in headers.items():
        issues = protocol_problems(header, protocol, structures)
        off = spacing_problem(header, spacing) if spacing is not None else None
        issues += [off] if off else []
        if issues:
            found[path] = issues
    raise_for_problems(found, what)


def check_training_cases(paths_by_split: Mapping[str, Sequence[Path]], protocol: Protocol,
                         structures: Sequence[str] | None = None,
                         spacing_mismatch: str = "resample",
                         tolerance: float = SPACING_TOLERANCE) -> SpacingRange:
    """Check every case file of every split (schema, structures and required targets
    against ``protocol``; val/test spacing against the training spacings) and return the
    training spacing range; raise one :class:`CaseSetError` naming every bad file.

    A val/test case more than ``tolerance`` off the training spacings is an error with
    ``spacing_mismatch="refuse"``; with ``resample`` (evaluation will resample it) it is
    logged as a warning.
    """
    paths = [p for split in paths_by_split.values() for p in split]
    headers, problems = read_headers(paths)
    found: dict[Path, list[str]] = {p: [msg] for p, msg in problems.items()}
    for path, header in headers.items():
        issues = protocol_problems(header, protocol, structures)
        if issues:
            found[path] = issues
    train = [headers[p].spacing_mm for p in paths_by_split.get("train", []) if p in headers]
    if not train:
        raise_for_problems(found, "not usable for training")
        raise CaseSetError("no readable case file in the training split")
    trained = SpacingRange.of(train)
    for split, split_paths in paths_by_split.items():
        for path in split_paths:
            issue = spacing_problem(headers[path], trained, tolerance) if (
                split != "train" and path in headers) else None
            if issue and spacing_mismatch == "refuse":
                found.setdefault(path, []).append(f"{issue} ({split} split)")
            elif issue:
                log.warning("%s: %s (%s split); evaluation resamples it", path, issue, split)
    raise_for_problems(dict(sorted(found.items())), "not usable for training")
    return trained
