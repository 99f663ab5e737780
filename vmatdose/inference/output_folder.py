"""The folder ``predict`` writes into: one checkpoint's predictions, never a mix.

A marker file (:data:`MARKER`) records which checkpoint (its SHA-256) wrote the folder's
predictions. A folder holding files from another checkpoint, or files predict did not
write, is refused unless ``overwrite=true``, which first removes every earlier prediction
file (``*.npz``, ``*_rtdose.dcm``, ``pt_*.csv``) so old and new never sit side by side.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vmatdose.data.atomic import write_json_atomic
from vmatdose.errors import InputError

#: The marker naming the checkpoint whose predictions a folder holds.
MARKER = ".vmatdose_predict.json"
#: What predict writes (and ``overwrite=true`` removes).
PREDICTION_PATTERNS = ("*.npz", "*_rtdose.dcm", "pt_*.csv")


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of the checkpoint file (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_output_folder(output_dir: str | Path, ckpt_path: str | Path,
                          overwrite: bool = False,
                          inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Check ``output_dir`` may take ``ckpt_path``'s predictions, clear what an earlier
    checkpoint wrote there (``overwrite``), create it and mark it; return it.

    ``inputs``: folders the command reads (case files, DICOM); writing into one of them
    is refused, whatever ``overwrite`` says.
    """
    output_dir = Path(output_dir)
    for folder in inputs:
        if folder and output_dir.resolve() == Path(folder).resolve():
            raise InputError(f"output_dir={output_dir}: the folder predict reads its cases "
                             "from; give another output_dir")
    digest = checkpoint_digest(ckpt_path)
    earlier = _earlier_files(output_dir)
    if earlier and _marked_digest(output_dir) != digest:
        if not overwrite:
            raise InputError(f"output_dir={output_dir}: holds {len(earlier)} files of another "
                             "checkpoint or run (e.g. {}); give overwrite=true to replace "
                             "them, or an empty output_dir".format(earlier[0].name))
        for path in earlier:
            if any(path.match(p) for p in PREDICTION_PATTERNS):
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"checkpoint": str(Path(ckpt_path).resolve()), "sha256": digest},
                      output_dir / MARKER)
    return output_dir


def _earlier_files(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_file() and p.name != MARKER)


def _marked_digest(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / MARKER).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
