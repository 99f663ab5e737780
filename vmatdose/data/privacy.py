"""Case-id anonymisation: what stands for a patient once data leaves ingest.

A case id is ``dcm_`` + a salted hash of PatientID and StudyInstanceUID
(:func:`anonymous_case_id`), or the id a mapping file gives (:func:`load_case_id_map`,
keys are PatientIDs or patient folder names). An empty salt is refused
(:func:`require_salt`): without a secret, a guessed PatientID could be confirmed from a
case id. Ingest names the cases with it (:mod:`vmatdose.data.ingest.dicom`); the RTDOSE
export and DICOM prediction find a case's source folder again with
:func:`case_id_for_folder` (:mod:`vmatdose.data.export.rtdose`,
:mod:`vmatdose.inference.dicom_input`). No patient name or ID is in a message here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import pydicom
import yaml

#: Environment variable holding the id salt (keep it private and fixed).
SALT_ENV = "VMATDOSE_ID_SALT"


class SaltError(ValueError):
    """Case ids would be an unsalted hash of PatientID: refused."""


def require_salt(salt: str | None, id_map: Mapping | None = None) -> None:
    """Refuse an empty salt unless a case-id mapping gives every id.

    Raises:
        SaltError: with how to set ``VMATDOSE_ID_SALT``.
    """
    if id_map or (salt and str(salt).strip()):
        return
    raise SaltError(
        "DICOM ingest refuses an empty id salt: case ids are a hash of PatientID and "
        "StudyInstanceUID, and without a secret salt a guessed PatientID can be confirmed "
        f"from a case id. Set one: export {SALT_ENV}=<a private random string> (keep it "
        "fixed, it decides the case ids; e.g. from `python -c \"import secrets; "
        "print(secrets.token_hex(16))\"`), or give source.case_id_map=<CSV/JSON/YAML file "
        "of PatientID or folder name -> case id>.")


def anonymous_case_id(patient_id: str, study_uid: str, salt: str = "") -> str:
    """``dcm_`` + the first 12 hex digits of sha256(salt, PatientID, StudyInstanceUID)."""
    digest = hashlib.sha256("\x00".join([salt, patient_id, study_uid]).encode()).hexdigest()
    return f"dcm_{digest[:12]}"


def patient_keys(ds: pydicom.Dataset) -> tuple[str, str]:
    """(PatientID, StudyInstanceUID) of a DICOM header: what a case id is hashed from."""
    return str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", ""))


def case_id_for_folder(folder: str | os.PathLike, salt: str = "",
                       id_map: Mapping[str, str] | None = None) -> str:
    """The case id of a patient folder without reading it all.

    ``id_map`` (PatientID or folder name -> case id) wins; otherwise the hash of the first
    CT header's PatientID and StudyInstanceUID (as :func:`ingest_dicom_case` computes it);
    the hash of the folder name when the folder holds no readable CT.

    Raises:
        SaltError: the id would be hashed and ``salt`` is empty.
    """
    folder = Path(folder)
    if id_map and folder.name in id_map:
        return str(id_map[folder.name])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():  # pydicom's warnings may quote element values
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["Modality", "PatientID", "StudyInstanceUID"])
        except Exception:  # not DICOM or broken: the full ingest reports it
            continue
        if str(ds.get("Modality", "")) == "CT":
            patient_id, study = patient_keys(ds)
            if id_map and patient_id in id_map:
                return str(id_map[patient_id])
            return _hashed_id(folder, patient_id, study, salt)
    return _hashed_id(folder, f"folder:{folder.name}", "", salt)


def _hashed_id(folder: Path, patient_id: str, study_uid: str, salt: str) -> str:
    if not (salt and str(salt).strip()):
        raise SaltError(f"{folder.name}: not in the case-id map, and case ids need a salt. "
                        f"Add the folder or its PatientID to the map, or export "
                        f"{SALT_ENV}=<a private random string>.")
    return anonymous_case_id(patient_id, study_uid, salt)


def load_case_id_map(path: str | os.PathLike) -> dict[str, str]:
    """A case-id mapping file: ``.csv`` with columns ``key,case_id`` or a ``.json``/``.yaml``
    dict; keys are PatientIDs or patient folder names."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if rows and not {"key", "case_id"} <= set(rows[0]):
            raise ValueError(f"{path}: expected columns 'key,case_id'")
        mapping = {r["key"].strip(): r["case_id"].strip() for r in rows}
    else:
        text = path.read_text(encoding="utf-8")
        mapping = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a key -> case_id mapping")
    ids = list(mapping.values())
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: case ids are not unique")
    return {str(k): str(v) for k, v in mapping.items()}
