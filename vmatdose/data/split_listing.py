"""The case files of one split of a data config, listed read-only.

``evaluate`` scores case files a user points it at: it must not import, generate or write
a split file there, so it does not build a training data module (whose ``prepare_data``
imports OpenKBP sources and generates phantoms). :func:`split_case_paths` reads the
folder and a split the same way the data module would, and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from vmatdose.config_schema import SplitConfig
from vmatdose.data.case import list_case_files
from vmatdose.data.datamodule import make_split, read_split, train_on
from vmatdose.errors import InputError

SPLIT_NAMES = ("train", "val", "test", "all")


def configured_cases_dir(data_cfg: Mapping) -> Path:
    """The folder of case files a ``data`` config names (OpenKBP: derived from its source
    when ``cases_dir`` is not set, as :class:`~vmatdose.data.openkbp.OpenKBPDataModule`)."""
    if str(data_cfg.get("_target_", "")).endswith("OpenKBPDataModule"):
        from vmatdose.data.openkbp import openkbp_cases_dir

        return openkbp_cases_dir(data_cfg.get("source_dir"), data_cfg.get("data_dir", "data"),
                                 data_cfg.get("cases_dir"))
    return Path(data_cfg["cases_dir"])


def split_case_paths(data_cfg: Mapping, split: str, split_file: str | None = None
                     ) -> tuple[list[Path], list[Path]]:
    """``(paths of split, paths of the training split)`` of ``data_cfg``'s case files.

    ``all``: every case file of the folder (and no training cases). Otherwise the split
    comes from ``split_file``, else ``data.split.file``, else the folder's
    ``openkbp_split.json``, else the data config's seeded split (derived, not written).
    A missing or empty folder is an :class:`InputError` naming it.
    """
    if split not in SPLIT_NAMES:
        raise InputError(f"split={split!r}: choose one of {', '.join(SPLIT_NAMES)}")
    cases_dir = configured_cases_dir(data_cfg)
    files = {p.stem: p for p in list_case_files(cases_dir)} if cases_dir.is_dir() else {}
    if not files:
        what = "no such folder" if not cases_dir.is_dir() else "no case files (*.npz)"
        raise InputError(f"data.cases_dir={cases_dir}: {what}; evaluate only reads case "
                         "files (make them with `python -m vmatdose.preprocess`)")
    if split == "all":
        return list(files.values()), []
    ids = _split_ids(data_cfg, cases_dir, list(files), split_file)
    return [files[i] for i in ids[split]], [files[i] for i in ids["train"]]


def _split_ids(data_cfg: Mapping, cases_dir: Path, known: list[str],
               split_file: str | None) -> dict[str, list[str]]:
    """The split as training made it (``data.split.train_on`` applied to ``train``)."""
    split_cfg = SplitConfig(**dict(data_cfg.get("split") or {}))
    return train_on(_listed_ids(split_cfg, cases_dir, known, split_file), split_cfg.train_on)


def _listed_ids(split_cfg: SplitConfig, cases_dir: Path, known: list[str],
                split_file: str | None) -> dict[str, list[str]]:
    chosen = split_file or split_cfg.file
    try:
        if chosen:
            return read_split(chosen, known)
        official = cases_dir / "openkbp_split.json"
        if official.is_file():
            ids = json.loads(official.read_text())
            return {k: [i for i in ids.get(k, []) if i in known] for k in ("train", "val", "test")}
    except (ValueError, OSError) as err:
        raise InputError(str(err)) from err
    return make_split(known, split_cfg.val_fraction, split_cfg.test_fraction, split_cfg.seed)
