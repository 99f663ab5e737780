"""``data=openkbp``: the OpenKBP challenge's data and split behind the ordinary data module.

Train on ``train-pats``, validate on ``validation-pats``, test on ``test-pats`` when the
source has it (else on ``validation-pats``), whatever folder ``source_dir`` names; with no
``source_dir``, the full public set (``../shared/data/openkbp-full``, archives unpacked into
the data folder on first use) when it is on disk, else the 17 + 4 sample. Case files go to
``<data_dir>/openkbp/<source folder name>/`` so the sample and the full set never mix.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from vmatdose.config_schema import OpenKBPDataConfig
from vmatdose.data.case import list_case_files
from vmatdose.data.datamodule import DoseDataModule
from vmatdose.data.ingest.openkbp import SPLIT_FILE, default_source, import_openkbp_dataset
from vmatdose.errors import InputError

log = logging.getLogger(__name__)

#: What an OpenKBP import writes into its folder (case files, its lock, temporary files).
_IMPORT_FILES = re.compile(r"^(openkbp_pt_\d+\.npz|\.openkbp_pt_\d+\..*\.npz\.tmp|"
                           r"\.convert\.lock)$")


def openkbp_cases_dir(source_dir: str | Path | None, data_dir: str | Path = "data",
                      cases_dir: str | Path | None = None) -> Path:
    """Where the case files of an OpenKBP source go: ``cases_dir`` when given, else
    ``<data_dir>/openkbp/<source folder name>`` (``None``: the default source)."""
    if cases_dir:
        return Path(cases_dir)
    source = Path(source_dir) if source_dir else default_source()
    return Path(data_dir) / "openkbp" / source.name


class OpenKBPDataModule(DoseDataModule):
    """A :class:`DoseDataModule` on OpenKBP patients with the challenge's split.

    Args:
        source_dir: OpenKBP folder (``train-pats/``, ``validation-pats/``, maybe
            ``test-pats/``, or their ``.tar.xz`` archives); ``None``: the default source.
        data_dir: the project's data folder (case files and unpacked archives go below
            ``data_dir/openkbp``) when ``cases_dir`` is not given.
        cases_dir: where the case files are (``None``: derived from the source).
        max_cases: keep the first ``max_cases`` training cases and at most that many
            validation and test cases (quick runs).
        import_workers: processes of the one-time import.
        **kwargs: :class:`DoseDataModule` arguments (``split.file`` overrides the
            challenge's split).
    """

    def __init__(self, *, data_dir: str, source_dir: str | None = None,
                 cases_dir: str | None = None,
                 import_workers: int = OpenKBPDataConfig.import_workers, **kwargs):
        self.source_dir = Path(source_dir) if source_dir else default_source()
        cases = openkbp_cases_dir(self.source_dir, data_dir, cases_dir)
        self.unpack_dir = Path(data_dir) / "openkbp" / "source"
        self.import_workers = int(import_workers)
        if kwargs.pop("generator", None) is not None:
            raise InputError("data.generator: OpenKBP cases are imported, not generated; "
                             "phantom settings (debug=short, experiment=model_comparison) "
                             "do not combine with data=openkbp")
        super().__init__(cases_dir=str(cases), **kwargs)

    def prepare_data(self) -> None:
        """Unpack and import the source once (idempotent: done cases are not re-read),
        never into a folder holding anything else (:meth:`refuse_foreign_folder`)."""
        if not (self.cases_dir / SPLIT_FILE).is_file():
            self.refuse_foreign_folder()
            import_openkbp_dataset(self.cases_dir, self.source_dir,
                                   num_workers=self.import_workers,
                                   unpack_dir=self.unpack_dir)
        super().prepare_data()

    def refuse_foreign_folder(self) -> None:
        """A ``cases_dir`` without an OpenKBP import (no split file) is only imported into
        when it is empty or holds an unfinished import; anything else is the user's
        folder: refused in one line, untouched."""
        if not self.cases_dir.is_dir():
            return
        foreign = sorted(p.name for p in self.cases_dir.iterdir()
                         if not _IMPORT_FILES.match(p.name))
        if foreign:
            raise InputError(
                f"data.cases_dir={self.cases_dir}: not an OpenKBP import (no {SPLIT_FILE}) "
                f"and not empty ({len(foreign)} entries, e.g. {foreign[0]}); data=openkbp "
                "never imports into a folder of other files: train on your own case files "
                f"with data=clinic data.cases_dir={self.cases_dir}")

    def derive_split(self) -> dict[str, list[str]]:
        """The challenge's split (``openkbp_split.json`` written at import) unless
        ``split.file`` names another one."""
        if self.split_cfg.file:
            return super().derive_split()
        path = self.cases_dir / SPLIT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no OpenKBP split file; run prepare_data() (the "
                                    "import writes it) or give data.split.file=")
        official = json.loads(path.read_text())
        known = set(self.case_paths())
        split = {k: [i for i in official[k] if i in known] for k in ("train", "val", "test")}
        if self.max_cases:
            split = {k: v[: self.max_cases] for k, v in split.items()}
        if not split["train"] or not split["val"]:
            raise ValueError(f"{path}: the OpenKBP split has no train or no validation "
                             f"cases in {self.cases_dir}")
        log.info("OpenKBP split from %s: %d train, %d val, %d test", official.get("source"),
                 *(len(split[k]) for k in ("train", "val", "test")))
        return split

    def case_paths(self) -> dict[str, Path]:
        """Every case file (``max_cases`` applies per split, see :meth:`ensure_split`)."""
        return {p.stem: p for p in list_case_files(self.cases_dir)}
