"""Which region a case's ``body`` is: the fact a model trained on one kind and applied to
the other must be told about.

OpenKBP ships no external contour: its ``body`` is the challenge's possible-dose mask, the
patient inside the plan's dose grid (the slices and in-plane box the dose was computed
on; the CT outline beyond it, shoulders or the skull, is left out). A DICOM case's
``body`` is the RTSTRUCT's External (or the CT above a threshold), the whole scanned
patient. The mask cannot be rebuilt from a DICOM case to predict (it has no dose grid),
and the body enters the model's input through the prior channel (zero outside it, the
beams traced through it), so the same model on the same patient gives another dose by the
two routes (``experiments/route_invariance.md``: 0.1-1.1 Gy mean inside the mask on
three OpenKBP patients). The checkpoint records the kinds it was trained on
(:func:`body_kinds`), and the predictor says when a case's kind is not among them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from vmatdose.data.case import read_case_header

POSSIBLE_DOSE_MASK = "possible-dose mask"
EXTERNAL = "external contour"
#: ``meta["source"]`` -> the region its ``body`` is.
BY_SOURCE = {"openkbp": POSSIBLE_DOSE_MASK, "dicom": EXTERNAL, "phantom": EXTERNAL}


def body_kind(meta: Mapping) -> str:
    """The kind of region a case's ``body`` is, from its ``meta["source"]``
    (``unknown`` for another source)."""
    return BY_SOURCE.get(str(meta.get("source")), "unknown")


def body_kinds(paths: Iterable[str | Path]) -> list[str]:
    """The sorted kinds of body among the case files ``paths`` (headers only)."""
    return sorted({body_kind(read_case_header(p).meta) for p in paths})


def body_mismatch(case_meta: Mapping, trained_on: Iterable[str]) -> str | None:
    """A sentence saying the case's body is another kind of region than the model was
    trained on, or ``None`` (also when the training kinds are not recorded)."""
    trained = list(trained_on)
    kind = body_kind(case_meta)
    if not trained or kind in trained or kind == "unknown":
        return None
    return (f"its body is the {kind} but the model was trained on cases whose body is the "
            f"{' / '.join(trained)}: the prior channel and the zeroing see another region, "
            "so the dose differs from the training route's (0.1-1.1 Gy mean inside the "
            "body on OpenKBP patients, experiments/route_invariance.md)")
