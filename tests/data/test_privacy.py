"""Case-id anonymisation in one module: salted hashes, mapping files, an empty salt refused."""

import json

import pytest

from vmatdose.data import privacy
from vmatdose.data.ingest import dicom
from vmatdose.data.privacy import (
    SaltError,
    anonymous_case_id,
    case_id_for_folder,
    load_case_id_map,
    require_salt,
)


def test_case_id_is_a_salted_hash_that_depends_on_the_salt():
    first = anonymous_case_id("PAT-1", "1.2.3", "salt-a")
    assert first.startswith("dcm_") and len(first) == 16
    assert first == anonymous_case_id("PAT-1", "1.2.3", "salt-a")
    assert first != anonymous_case_id("PAT-1", "1.2.3", "salt-b")
    assert "PAT" not in first


def test_empty_salt_is_refused_unless_a_map_gives_the_ids(tmp_path):
    with pytest.raises(SaltError, match=f"export {privacy.SALT_ENV}="):
        require_salt("  ")
    require_salt("", {"PAT-1": "case_1"})
    folder = tmp_path / "Doe^John"
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    with pytest.raises(SaltError) as err:
        case_id_for_folder(folder, "")
    assert "PAT" not in str(err.value)
    assert case_id_for_folder(folder, "s3cret").startswith("dcm_")
    mapping = tmp_path / "ids.json"
    mapping.write_text(json.dumps({"Doe^John": "prostate_001"}))
    assert case_id_for_folder(folder, "", load_case_id_map(mapping)) == "prostate_001"


def test_ingest_has_no_second_copy_of_the_anonymisation():
    for name in ("SaltError", "require_salt", "anonymous_case_id", "case_id_for_folder",
                 "load_case_id_map", "SALT_ENV"):
        assert getattr(dicom, name, None) in (None, getattr(privacy, name)), name
    assert dicom.anonymous_case_id is privacy.anonymous_case_id
