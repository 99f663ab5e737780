"""OpenKBP (AAPM 2020 challenge) patients -> case files.

The challenge ships each patient as sparse CSVs on a 128^3 grid (see the sample's README):
``ct.csv``, ``dose.csv``, ``possible_dose_mask.csv``, ``voxel_dimensions.csv`` and one
``<ROI>.csv`` per contoured structure. The flat index is C order over axes
``(row, column, slice)``: rows run anterior -> posterior, columns patient right -> left,
slices superior -> inferior (checked on the sample: Mandible anterior of SpinalCord,
LeftParotid at higher columns, Brainstem above SpinalCord). Import reorders to the
canonical ``(Z, Y, X)`` (z superior, y posterior, x left).

CT values are stored with a +1024 offset (some files in 16-bit): clipped to [0, 4095]
then shifted to HU. The possible-dose mask becomes ``body``, the scoring region of the
OpenKBP dose score. Structures and prescriptions come from the ``head_neck`` protocol
(:class:`vmatdose.protocol.Protocol`); nothing here repeats them.

The challenge's split is the folder a patient sits in (``train-pats``, ``validation-pats``,
``test-pats``): :func:`import_openkbp_dataset` records it in the case's ``meta`` and in
``openkbp_split.json`` beside the case files. :func:`resolve_openkbp_source` unpacks the
challenge archives (``*-pats.tar.xz``) into the data folder on first use.
"""

from __future__ import annotations

import functools
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from vmatdose.data.atomic import write_json_atomic
from vmatdose.data.beams import BeamArrangement, default_arrangement, targets_centroid_mm
from vmatdose.data.case import Case, list_case_files
from vmatdose.errors import InputError
from vmatdose.protocol import Protocol

log = logging.getLogger(__name__)

GRID_SHAPE = (128, 128, 128)
PROTOCOL = "head_neck"
CT_OFFSET_HU = 1024
REQUIRED_FILES = ("ct.csv", "dose.csv", "possible_dose_mask.csv", "voxel_dimensions.csv")
#: The challenge's folders, in split order (test-pats is not public: validation stands in).
SPLIT_FOLDERS = {"train": "train-pats", "val": "validation-pats", "test": "test-pats"}
SPLIT_FILE = "openkbp_split.json"
#: Shared data (relative to the repository's parent): the full archives, else the sample.
FULL_ARCHIVES = Path(__file__).resolve().parents[3].parent / "shared/data/openkbp-full"
SAMPLE = Path(__file__).resolve().parents[3].parent / "shared/data/openkbp-sample"


@functools.lru_cache(maxsize=4)
def load_protocol(name: str = PROTOCOL) -> Protocol:
    """The site protocol the import reads its structures and prescriptions from."""
    return Protocol.load(name)


class OpenKBPFormatError(InputError):
    """A patient folder that does not follow the OpenKBP layout (a ``ValueError``)."""


def read_sparse(path: Path, shape: tuple[int, int, int] = GRID_SHAPE,
                dtype: type = np.float32) -> np.ndarray:
    """A sparse ``flat_index,value`` CSV -> dense array in the file's axis order.

    Files without values (masks) give 1 at every listed index.
    """
    try:
        table = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise OpenKBPFormatError(f"{path}: not a sparse OpenKBP CSV ({err})") from err
    index = table.index.to_numpy()
    if index.size and (index.min() < 0 or index.max() >= np.prod(shape)):
        raise OpenKBPFormatError(f"{path}: flat index outside a {shape} grid")
    values = table["data"].to_numpy() if "data" in table else np.array([])
    if values.size == 0 or np.all(np.isnan(values)):
        values = np.ones(index.size)
    if not np.all(np.isfinite(values)):
        raise OpenKBPFormatError(f"{path}: {int(np.sum(~np.isfinite(values)))} non-finite values")
    dense = np.zeros(int(np.prod(shape)), dtype=dtype)
    dense[index] = values
    return dense.reshape(shape)


def to_canonical(volume: np.ndarray) -> np.ndarray:
    """OpenKBP ``(row=y, column=x, slice=-z)`` -> canonical ``(Z, Y, X)``, z superior."""
    return np.ascontiguousarray(np.transpose(volume, (2, 0, 1))[::-1])


def import_openkbp_patient(patient_dir: str | os.PathLike, case_id: str | None = None,
                           protocol: str | Protocol = PROTOCOL) -> Case:
    """One OpenKBP patient folder (``pt_N/``) -> :class:`Case` (dose in Gy, CT in HU).

    Prescriptions are the protocol's (70/63/56 Gy) for the targets the patient has;
    ``meta["openkbp_split"]`` is the challenge folder above the patient (``train-pats``...).
    A folder without ``dose.csv`` (a case to predict) gives a case without dose. A patient
    without the protocol's required targets is refused (:class:`OpenKBPFormatError`).
    """
    folder = Path(patient_dir)
    site = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    missing = [name for name in REQUIRED_FILES
               if name != "dose.csv" and not (folder / name).is_file()]
    if missing:
        raise OpenKBPFormatError(f"{folder}: not an OpenKBP patient folder, missing {missing}")
    contoured = [name for name in site.structures if (folder / f"{name}.csv").is_file()]
    lacking = site.missing_targets(contoured)
    if lacking:
        raise OpenKBPFormatError(f"{folder.name}: missing required target "
                                 f"{', '.join(lacking)} ({site.name} needs "
                                 f"{site.requirement_text()})")
    spacing_xyz = np.loadtxt(folder / "voxel_dimensions.csv")
    if spacing_xyz.shape != (3,) or np.any(spacing_xyz <= 0):
        raise OpenKBPFormatError(f"{folder / 'voxel_dimensions.csv'}: expected 3 positive "
                                 f"voxel sizes, got {spacing_xyz}")
    spacing = np.array([spacing_xyz[2], spacing_xyz[0], spacing_xyz[1]], float)
    ct = np.clip(read_sparse(folder / "ct.csv"), 0, 4095) - CT_OFFSET_HU
    present = [name for name in site.structures if (folder / f"{name}.csv").is_file()]
    masks = np.stack([to_canonical(read_sparse(folder / f"{n}.csv", dtype=np.uint8))
                      for n in present]) if present else np.zeros((0, *GRID_SHAPE), np.uint8)
    shape = np.asarray(GRID_SHAPE)
    origin = -(shape - 1) / 2.0 * spacing  # OpenKBP keeps no patient position
    meta = {"source": "openkbp", "protocol": site.name, "fractions": site.fractions,
            "source_folder": folder.name, "openkbp_split": folder.parent.name}
    targets = [i for i, name in enumerate(present) if name in site.prescriptions_gy]
    if targets and masks[targets].any():
        meta["beams"] = openkbp_beams(site, masks[targets], spacing, origin).to_meta()
    return Case(
        case_id=case_id or f"openkbp_{folder.name}",
        ct=to_canonical(ct).astype(np.int16),
        masks=masks,
        structures=present,
        body=to_canonical(read_sparse(folder / "possible_dose_mask.csv", dtype=np.uint8)),
        spacing_mm=spacing,
        origin_mm=origin,
        prescriptions_gy={t: gy for t, gy in site.prescriptions_gy.items() if t in present},
        dose=(to_canonical(read_sparse(folder / "dose.csv"))
              if (folder / "dose.csv").is_file() else None),
        meta=meta,
    )


def openkbp_beams(site: Protocol, target_masks: np.ndarray, spacing_mm: np.ndarray,
                  origin_mm: np.ndarray) -> BeamArrangement:
    """The arrangement of every OpenKBP plan: nine equispaced coplanar 6 MV fields at 0,
    40, ..., 320 degrees (the challenge's data description, Babier et al., Med. Phys. 48,
    2021; the head-and-neck protocol's ``beams``). The data keep no isocentre: it is put
    at the centroid of the targets, the usual single-isocentre choice (this project's
    convention, not the challenge's)."""
    return default_arrangement(site.beams, targets_centroid_mm(target_masks, spacing_mm,
                                                               origin_mm), source="openkbp")


def find_openkbp_patients(source_dir: str | os.PathLike) -> list[Path]:
    """Patient folders (``pt_*`` holding ``ct.csv``) anywhere below ``source_dir``, sorted."""
    root = Path(source_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: OpenKBP folder not found (expected the challenge's "
                                "train-pats/ and validation-pats/ below it)")
    folders = sorted(p.parent for p in root.glob("**/ct.csv"))
    if not folders:
        raise FileNotFoundError(f"{root}: no OpenKBP patient folders (pt_*/ct.csv) below it")
    return folders


def official_split(patient_folders: list[Path]) -> dict[str, list[str]]:
    """The challenge's split from the folders patients sit in: ``train-pats`` -> train,
    ``validation-pats`` -> val, ``test-pats`` -> test (when there is one, else the
    validation patients are the test split too). Case ids ``openkbp_pt_N``."""
    by_folder: dict[str, list[str]] = {}
    for folder in patient_folders:
        by_folder.setdefault(folder.parent.name, []).append(f"openkbp_{folder.name}")
    split = {name: sorted(by_folder.get(folder, [])) for name, folder in SPLIT_FOLDERS.items()}
    if not split["test"]:
        split["test"] = list(split["val"])
    return split


def import_openkbp_dataset(output_dir: str | os.PathLike,
                           source_dir: str | os.PathLike | None = None,
                           num_workers: int = 2, progress: bool = True,
                           unpack_dir: str | os.PathLike | None = None) -> list[Path]:
    """Import every patient below ``source_dir`` into ``output_dir/openkbp_pt_N.npz`` and
    write the challenge split to ``output_dir/openkbp_split.json``.

    ``source_dir`` may hold the challenge archives (unpacked into ``unpack_dir`` first, see
    :func:`resolve_openkbp_source`); ``None`` takes the full public set when it is on
    disk, else the sample. Idempotent: patients whose case file already exists and loads
    are not re-read.
    """
    from vmatdose.data.ingest.batch import convert_cases

    root = resolve_openkbp_source(source_dir, unpack_dir or Path(output_dir).parent / "source",
                                  progress=progress)
    folders = find_openkbp_patients(root)
    jobs = [(f"openkbp_{folder.name}", folder) for folder in folders]
    summary = convert_cases(jobs, import_openkbp_patient, output_dir, num_workers=num_workers,
                            progress=progress and "importing OpenKBP patients")
    _raise_on_failures(root, summary, len(jobs))  # no split file: the next run resumes
    done = {p.stem for p in list_case_files(output_dir)}
    split = {k: [i for i in ids if i in done] for k, ids in official_split(folders).items()}
    write_json_atomic({**split, "source": root.name}, Path(output_dir) / SPLIT_FILE)
    return list_case_files(output_dir)


def default_source() -> Path:
    """The full public archives when they are on disk, else the 17 + 4 sample."""
    if any(FULL_ARCHIVES.glob("*-pats.tar.xz")):
        return FULL_ARCHIVES
    return SAMPLE


def resolve_openkbp_source(source_dir: str | os.PathLike | None,
                           unpack_dir: str | os.PathLike, progress: bool = True) -> Path:
    """The folder of patient folders for ``source_dir``.

    ``None`` is :func:`default_source`. A folder holding the challenge archives
    (``train-pats.tar.xz``, ``validation-pats.tar.xz``, ...) is unpacked into
    ``unpack_dir/<folder name>`` (once: see :func:`unpack_archive`) and that is returned;
    any other folder is returned as it is.
    """
    root = Path(source_dir) if source_dir else default_source()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: OpenKBP folder not found (expected the challenge's "
                                "train-pats/ and validation-pats/, or their .tar.xz archives)")
    archives = sorted(root.glob("*-pats.tar.xz"))
    if not archives:
        return root
    target = Path(unpack_dir) / root.name
    for archive in archives:
        unpack_archive(archive, target, progress=progress)
    return target


def unpack_archive(archive: Path, dest: Path, progress: bool = True) -> Path:
    """Extract ``archive`` (.tar.xz) into ``dest``: idempotent and resumable.

    A stamp file marks a finished archive, so later calls return at once; an interrupted
    run keeps the files it finished (each is written to a temporary name, then renamed)
    and skips them when restarted. Only regular files below a ``*-pats/`` folder are
    extracted (no links, no absolute or parent paths).
    """
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / f".{archive.name}.done"
    if stamp.is_file():
        return dest
    try:
        with archive.open("rb") as raw, lzma.open(raw) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar, \
                tqdm(total=archive.stat().st_size, unit="B", unit_scale=True,
                     disable=not progress, desc=f"unpack {archive.name}") as bar:
            for member in tar:
                if member.isfile():
                    _extract_member(tar, member, dest, archive)
                bar.update(raw.tell() - bar.n)
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as err:
        raise OpenKBPFormatError(f"{archive}: cannot unpack ({err})") from err
    stamp.write_text("ok\n")
    return dest


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path,
                    archive: Path) -> None:
    parts = Path(member.name).parts
    if member.name.startswith("/") or ".." in parts or not parts[0].endswith("-pats"):
        raise OpenKBPFormatError(f"{archive}: unexpected member {member.name!r}")
    out = dest.joinpath(*parts)
    if out.is_file() and out.stat().st_size == member.size:
        return  # done by an earlier, interrupted run
    out.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
        shutil.copyfileobj(source, tmp)
    os.replace(tmp.name, out)


def openkbp_cases(folder: str | os.PathLike, output_dir: str | os.PathLike,
                  protocol: str | Protocol = PROTOCOL, num_workers: int = 1) -> list[Path]:
    """Case files for an OpenKBP folder (``pt_*/`` with or without ``dose.csv``), imported
    into ``output_dir`` (a folder of the caller's, never ``folder`` itself) with
    ``protocol`` (a :class:`Protocol` is used as is: nothing is composed).

    For ``python -m vmatdose.predict cases_dir=<OpenKBP folder>``. Any patient that fails
    raises one :class:`OpenKBPFormatError` naming the count and the first failure.
    """
    from vmatdose.data.ingest.batch import convert_cases

    jobs = [(f"openkbp_{p.name}", p) for p in find_openkbp_patients(folder)]
    convert = functools.partial(_import_job, protocol=protocol)
    summary = convert_cases(jobs, convert, output_dir, num_workers=num_workers,
                            progress="importing OpenKBP patients", record_sources=False)
    _raise_on_failures(folder, summary, len(jobs))
    return list_case_files(output_dir)


def _raise_on_failures(folder: Path, summary: dict, n_jobs: int) -> None:
    """One :class:`OpenKBPFormatError` naming the count and the first failure, if any."""
    if summary.get("failed"):
        first = summary["failed"][0]
        raise OpenKBPFormatError(f"{folder}: {len(summary['failed'])} of {n_jobs} patients "
                                 f"failed to import, first {first.get('case_id')}: "
                                 f"{first.get('error')}")


def _import_job(patient_dir: Path, case_id: str, protocol: str | Protocol) -> Case:
    return import_openkbp_patient(patient_dir, case_id, protocol)


def is_openkbp_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds OpenKBP patient folders (``pt_*/ct.csv``) below it."""
    root = Path(folder)
    return root.is_dir() and next(root.glob("**/ct.csv"), None) is not None
