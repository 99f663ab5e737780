"""Synthetic DICOM-RT patients for tests and benchmarks, with their analytic truth.

    spec = PatientSpec(orientation="FFS")
    truth = write_patient(tmp_path / "pt", spec)   # CT series, RTSTRUCT, RTDOSE(s), RTPLAN
    truth.masks["PTV56"], truth.dose, truth.ct      # (Z, Y, X) on the canonical CT grid

The scene (shapes in mm around the centre of the CT's field of view, z extents as
fractions of the scanned length): an elliptic body; PTV56 a ring with a hole (two contours
per slice) around PTV70; CTV70 inside PTV70; rectum, bladder, two femoral heads, and a
bowel made of two separate polygons per slice. ROI names are clinical spellings
(``PTV_70``, ``Left Femur``, ...) that the prostate structure-name mapping must resolve.
The dose is smooth (linear ramps + a broad Gaussian, Gy) and sampled on a coarser, offset
dose grid; the CT is an exact integer pattern stored through RescaleSlope/Intercept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

ORIENTATIONS = {"HFS": (1, 0, 0, 0, 1, 0), "FFS": (-1, 0, 0, 0, 1, 0),
                "HFP": (-1, 0, 0, 0, -1, 0), "FFP": (1, 0, 0, 0, -1, 0)}
PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE = "Doe^Jane", "PID-7731-XQ", "19480229"
RESCALE_SLOPE, RESCALE_INTERCEPT = 2.0, -1024.0
_CONTOUR_DATA = Tag(0x3006, 0x0050)

# name -> (ROI name in the RTSTRUCT, [(cx, cy, a, b) ellipses, even-odd], (z from, z to))
SCENE = {
    "Body": ("External", [(5, 0, 75, 55)], (0.0, 1.0)),
    "PTV56": ("ptv 56Gy", [(10, 0, 26, 26), (10, 0, 17, 17)], (0.2, 0.8)),
    "PTV70": ("PTV_70", [(10, 0, 14, 14)], (0.25, 0.75)),
    "CTV70": ("CTV70", [(10, 0, 9, 9)], (0.3, 0.7)),
    "Rectum": ("RECTUM", [(10, 36, 7, 7)], (0.1, 0.7)),
    "Bladder": ("Bladder", [(10, -36, 11, 9)], (0.4, 0.9)),
    "Femur_L": ("Left Femur", [(55, 5, 9, 9)], (0.0, 0.45)),
    "Femur_R": ("FemoralHead_R", [(-38, 5, 9, 9)], (0.0, 0.45)),
    "Bowel": ("Bowel_Bag", [(-20, -30, 6, 6), (40, -30, 6, 6)], (0.6, 1.0)),
    "Couch": ("Couch", [(5, 62, 70, 3)], (0.0, 1.0)),
}

# Head and neck (protocol head_neck): three nested dose levels, a thin spinal cord (about
# 3 voxels wide), paired parotids, a mandible with a hole; ROI names are synonyms.
HEAD_NECK_SCENE = {
    "Body": ("External", [(0, 0, 72, 60)], (0.0, 1.0)),
    "PTV56": ("ptv_56", [(0, -8, 48, 30), (0, -8, 38, 22)], (0.15, 0.85)),
    "PTV70": ("PTV_70", [(-14, -8, 12, 10)], (0.3, 0.7)),
    "PTV63": ("PTV 63Gy", [(18, -8, 10, 9)], (0.25, 0.75)),
    "Brainstem": ("BrainStem", [(0, 30, 7, 6)], (0.7, 1.0)),
    "SpinalCord": ("Spinal_Cord", [(0, 42, 2.6, 2.6)], (0.0, 0.75)),
    "RightParotid": ("Parotid_R", [(-45, 15, 9, 11)], (0.45, 0.9)),
    "LeftParotid": ("Parotid_L", [(45, 15, 9, 11)], (0.45, 0.9)),
    "Esophagus": ("Oesophagus", [(0, 28, 5, 4)], (0.0, 0.4)),
    "Larynx": ("Larynx", [(0, -12, 7, 6)], (0.2, 0.5)),
    "Mandible": ("Bone_Mandible", [(0, -40, 32, 14), (0, -40, 26, 9)], (0.5, 0.8)),
    "CTV70": ("CTV_high", [(-14, -8, 8, 7)], (0.35, 0.65)),
    "Couch": ("Couch", [(0, 66, 70, 3)], (0.0, 1.0)),
}
HEAD_NECK_PRESCRIPTIONS = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}


@dataclass
class GridSpec:
    """A canonical grid: ``shape`` (Z, Y, X), ``spacing`` (dz, dy, dx) mm, ``origin``
    (z, y, x) mm of voxel [0, 0, 0]."""

    shape: tuple[int, int, int] = (16, 72, 96)
    spacing: tuple[float, float, float] = (2.5, 2.0, 1.75)
    origin: tuple[float, float, float] = (-20.0, -70.0, -80.0)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D voxel-centre coordinates (z, y, x) in mm."""
        return tuple(o + s * np.arange(n) for o, s, n in
                     zip(self.origin, self.spacing, self.shape))

    def centre_xy(self) -> tuple[float, float]:
        z, y, x = self.axes()
        return float((x[0] + x[-1]) / 2), float((y[0] + y[-1]) / 2)


@dataclass
class PatientSpec:
    """What :func:`write_patient` writes; defaults give a valid prostate SIB patient."""

    orientation: str = "HFS"
    scene: dict = field(default_factory=lambda: SCENE)
    ct: GridSpec = field(default_factory=GridSpec)
    dose_grid: GridSpec | None = None  # default: coarser, offset, covering the CT
    gfov: str = "relative"  # or "absolute"
    beam_weights: tuple[float, ...] = (1.0,)  # one PLAN dose, or BEAM doses summing to 1
    structures: tuple[str, ...] = tuple(SCENE)
    scale: float = 1.0  # shape size factor (mm)
    with_plan: bool = True
    plan_prescriptions: dict[str, float] = field(
        default_factory=lambda: {"PTV70": 70.0, "PTV56": 56.0})
    fractions: int = 28
    struct_frame_uid: str | None = None  # another frame of reference for the RTSTRUCT
    dose_frame_uid: str | None = None
    skip_slices: tuple[int, ...] = ()
    with_struct: bool = True
    with_dose: bool = True
    vertices: int = 96
    # RTPLAN BeamSequence: dicts of gantry_deg (one angle, or an arc's control points,
    # see vmat_arc), couch_deg, isocentre_xyz (DICOM patient mm), energy_mv, rotation
    # (NONE, CW, CC), delivery (TREATMENT, SETUP), meterset (an arc's cumulative weights)
    beams: tuple = ()
    plan_dose_too: bool = False  # with BEAM doses: also the PLAN dose (RD_plan.dcm)
    # other CT series in the folder (same frame of reference and geometry, CT + 100 HU
    # each), which the RTSTRUCT does not reference
    extra_ct_series: int = 0
    # whether the RTSTRUCT names its CT series (RTReferencedSeriesSequence); without, only
    # the ContourImageSequence of each contour points at the CT images
    struct_names_series: bool = True
    ct_hu: float | None = None  # uniform HU inside the body instead of the ramp pattern
    patient_name: str = PATIENT_NAME  # identity every file carries
    patient_id: str = PATIENT_ID


def head_neck_spec(targets: tuple[str, ...] = ("PTV70", "PTV63", "PTV56"), **kwargs
                   ) -> PatientSpec:
    """A head-and-neck patient (protocol ``head_neck``) with the given subset of targets."""
    dropped = {"PTV70", "PTV63", "PTV56"} - set(targets)
    structures = tuple(n for n in HEAD_NECK_SCENE if n not in dropped)
    defaults = {"scene": HEAD_NECK_SCENE, "structures": structures, "fractions": 35,
                "plan_prescriptions": {t: g for t, g in HEAD_NECK_PRESCRIPTIONS.items()
                                       if t in targets}}
    return PatientSpec(**{**defaults, **kwargs})


@dataclass
class PatientTruth:
    """The analytic answer, on the canonical CT grid, and what was written."""

    ct: np.ndarray
    masks: dict[str, np.ndarray]
    uids: dict
    files: dict[str, list[Path]]
    spec: PatientSpec

    @cached_property
    def dose(self) -> np.ndarray:
        """(Z, Y, X) float64 Gy on the CT grid, computed when first asked for (a 512 x 512
        patient's is 250 MB that a benchmark writing DICOM never reads)."""
        z, y, x = np.meshgrid(*self.spec.ct.axes(), indexing="ij", sparse=True)
        return dose_function(x, y, z, self.spec.ct.centre_xy(), self.spec.scale)


def dose_function(x, y, z, centre: tuple[float, float], scale: float = 1.0) -> np.ndarray:
    """Reference dose in Gy at patient points (mm): ramps plus a broad Gaussian.

    ``x``, ``y``, ``z`` broadcast against each other (full grids, or the sparse axes of
    ``np.meshgrid(..., sparse=True)``); the Gaussian is evaluated as the product of its
    three 1-D factors, so a 512 x 512 CT grid costs a few passes, not a 3-D ``exp``.
    """
    cx, cy = centre
    two_sigma2 = 2 * (40.0 * scale) ** 2
    gaussian = (50.0 * np.exp(-((x - cx - 10 * scale) ** 2) / two_sigma2)
                * np.exp(-((y - cy - 5 * scale) ** 2) / two_sigma2)
                * np.exp(-((z - 2 * scale) ** 2) / two_sigma2))
    return (20.0 + 0.08 * (y - cy) / scale + 0.05 * (x - cx) / scale + 0.04 * z) + gaussian


def analytic_ct(grid: GridSpec, body: np.ndarray) -> np.ndarray:
    """(Z, Y, X) int16 HU: an even integer pattern varying along every axis in the body."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.int32) for n in grid.shape), indexing="ij",
                          sparse=True)  # broadcast: one full-size array, not three
    return np.where(body, 2 * (i - j) + 10 * k, -1000).astype(np.int16)


def _ellipse(cx, cy, a, b, n) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def _shapes(spec: PatientSpec, name: str) -> list[tuple[float, float, float, float]]:
    cx0, cy0 = spec.ct.centre_xy()
    return [(cx0 + cx * spec.scale, cy0 + cy * spec.scale, a * spec.scale, b * spec.scale)
            for cx, cy, a, b in spec.scene[name][1]]


def _slices_of(spec: PatientSpec, name: str) -> np.ndarray:
    """Canonical CT slice indices a structure is contoured on."""
    lo, hi = spec.scene[name][2]
    n = spec.ct.shape[0]
    return np.arange(int(round(lo * (n - 1))), int(round(hi * (n - 1))) + 1)


def turned_scene(scene: dict) -> dict:
    """``scene`` turned 180 degrees about the head-feet axis through the CT's centre (what
    a supine patient's anatomy is, in patient axes, once the patient lies prone in the
    same place of the room): every shape's centre (cx, cy) -> (-cx, -cy)."""
    return {name: (roi, [(-cx, -cy, a, b) for cx, cy, a, b in shapes], z)
            for name, (roi, shapes, z) in scene.items()}


def analytic_masks(spec: PatientSpec) -> dict[str, np.ndarray]:
    """Canonical name -> (Z, Y, X) bool: voxel centres inside the shapes (even-odd)."""
    z, y, x = spec.ct.axes()
    yy, xx = np.meshgrid(y, x, indexing="ij")
    masks = {}
    for name in spec.structures:
        plane = np.zeros(yy.shape, bool)
        for cx, cy, a, b in _shapes(spec, name):
            plane ^= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
        mask = np.zeros(spec.ct.shape, bool)
        mask[_slices_of(spec, name)] = plane
        masks[name] = mask
    return masks


def _file_dataset(sop_class: str, modality: str, uids: dict,
                  spec: PatientSpec | None = None) -> FileDataset:
    """A file's identity and UIDs; the patient of ``spec`` (default: the default one)."""
    spec = spec or PatientSpec()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID = spec.patient_name, spec.patient_id
    ds.PatientBirthDate, ds.PatientSex = PATIENT_BIRTH_DATE, "F"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101500", "S-4417"
    ds.AccessionNumber, ds.ReferringPhysicianName = "ACC-99812", "Welby^Marcus"
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = uids["frame"]
    return ds


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _native(volume: np.ndarray, orientation: str) -> tuple[np.ndarray, tuple[bool, ...]]:
    """Canonical (Z, Y, X) -> stored order (frames along the normal, rows, columns)."""
    iop = np.asarray(ORIENTATIONS[orientation], float)
    normal = np.cross(iop[:3], iop[3:])
    flips = (normal[2] < 0, iop[4] < 0, iop[0] < 0)
    return volume[tuple(slice(None, None, -1) if f else slice(None) for f in flips)], flips


def _first_voxel_xyz(grid: GridSpec, flips: tuple[bool, ...]) -> np.ndarray:
    first = np.array([n - 1 if f else 0 for n, f in zip(grid.shape, flips)], float)
    return (np.asarray(grid.origin) + first * np.asarray(grid.spacing))[::-1]


def vmat_arc(start_deg: float, stop_deg: float, rotation: str = "CW",
             step_deg: float = 2.0) -> list[float]:
    """Control-point gantry angles of an arc from ``start_deg`` to ``stop_deg`` turning
    clockwise (``CW``, increasing angles) or counter-clockwise (``CC``), ``step_deg``
    apart (the last step shorter when the arc is not a whole number of steps)."""
    sign = 1.0 if rotation == "CW" else -1.0
    length = (sign * (stop_deg - start_deg)) % 360.0 or 360.0
    steps = np.append(np.arange(0.0, length, step_deg), length)
    return [float((start_deg + sign * d) % 360.0) for d in steps]


def write_ct(folder: Path, spec: PatientSpec, ct: np.ndarray, uids: dict,
             series_key: str = "ct_series", prefix: str = "CT") -> list[Path]:
    """One file per slice, shuffled instance numbers and file names; HU via slope/intercept.
    The slices' SOPInstanceUIDs go to ``uids[series_key + "_images"]`` (slice index ->
    UID)."""
    iop = ORIENTATIONS[spec.orientation]
    _, flips = _native(ct, spec.orientation)
    z_axis = spec.ct.axes()[0]
    xy = _first_voxel_xyz(spec.ct, flips)[:2]
    rng = np.random.default_rng(len(z_axis))
    names = rng.permutation(len(z_axis))
    paths = []
    images = uids.setdefault(f"{series_key}_images", {})
    for k, z in enumerate(z_axis):
        if k in spec.skip_slices:
            continue
        ds = _file_dataset(CTImageStorage, "CT", uids, spec)
        ds.SeriesInstanceUID = uids[series_key]
        images[k] = ds.SOPInstanceUID
        ds.PatientPosition = spec.orientation
        ds.InstanceNumber = int(names[k]) + 1
        ds.ImagePositionPatient = [_ds(xy[0]), _ds(xy[1]), _ds(z)]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = [_ds(spec.ct.spacing[1]), _ds(spec.ct.spacing[2])]
        ds.SliceThickness = _ds(spec.ct.spacing[0])
        plane = ct[k][::-1 if flips[1] else 1, ::-1 if flips[2] else 1]
        stored = ((plane.astype(np.float64) - RESCALE_INTERCEPT) / RESCALE_SLOPE)
        _set_image(ds, stored.astype("<u2"), bits=16)
        ds.RescaleSlope, ds.RescaleIntercept = _ds(RESCALE_SLOPE), _ds(RESCALE_INTERCEPT)
        ds.RescaleType = "HU"
        path = folder / f"{prefix}_{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _set_image(ds: Dataset, pixels: np.ndarray, bits: int) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()


def write_rtstruct(folder: Path, spec: PatientSpec, uids: dict) -> Path:
    """CLOSED_PLANAR contours of every structure on its CT slices (several per slice)."""
    ds = _file_dataset(RTStructureSetStorage, "RTSTRUCT", uids, spec)
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "RS", "20240102", "1100"
    frame = spec.struct_frame_uid or uids["frame"]
    images = uids.get("ct_series_images", {})
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = frame
    if spec.struct_names_series:
        series = Dataset()
        series.SeriesInstanceUID = uids["ct_series"]
        series.ContourImageSequence = Sequence([_image_ref(images[k]) for k in sorted(images)])
        study = Dataset()
        study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study.ReferencedSOPInstanceUID = uids["study"]
        study.RTReferencedSeriesSequence = Sequence([series])
        ref_frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_frame])
    z_axis = spec.ct.axes()[0]
    rois, contours, observations = [], [], []
    for number, name in enumerate(spec.structures, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, frame
        roi.ROIName, roi.ROIGenerationAlgorithm = spec.scene[name][0], "MANUAL"
        rois.append(roi)
        items = []
        outlines = [[f"{x:.4f}\\{y:.4f}" for x, y in _ellipse(cx, cy, a, b, spec.vertices)]
                    for cx, cy, a, b in _shapes(spec, name)]
        for k in _slices_of(spec, name):
            if k in spec.skip_slices:  # contours are drawn on the slices that exist
                continue
            for xy in outlines:
                item = Dataset()
                item.set_original_encoding(False, True, "iso8859")  # keeps ContourData raw
                if k in images:
                    item.ContourImageSequence = Sequence([_image_ref(images[k])])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(xy)
                item[_CONTOUR_DATA] = _contour_data(xy, z_axis[k])
                items.append(item)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [255, 0, 0]
        roi_contour.ContourSequence = Sequence(items)
        contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "EXTERNAL" if name == "Body" else (
            "PTV" if name.startswith("PTV") else "ORGAN")
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    path = folder / "RS_structures.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _contour_data(xy_text: list[str], z: float) -> RawDataElement:
    """ContourData of one slice's outline, its vertices' ``"x\\y"`` (``%.4f``) given, at
    height ``z`` mm, as the encoded DS bytes.

    Built as raw text: setting a list of strings makes pydicom construct and validate a
    ``DSfloat`` per value, which was most of writing a clinical-size RTSTRUCT (450 k
    values: 16 of 19 s under the profiler). pydicom writes a raw element's bytes as they are when the item's original
    encoding is the file's (explicit VR little endian).
    """
    z_text = f"{z:.4f}"
    text = (f"\\{z_text}\\".join(xy_text) + f"\\{z_text}").encode("ascii")
    text += b" " * (len(text) % 2)  # DICOM values have even length, DS pads with a space
    return RawDataElement(_CONTOUR_DATA, "DS", len(text), text, 0, False, True)


def _image_ref(sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def default_dose_grid(ct: GridSpec) -> GridSpec:
    """Coarser than the CT, offset by a fraction of a voxel, covering all of it."""
    spacing = (ct.spacing[0] * 1.6, ct.spacing[1] * 1.5, ct.spacing[2] * 1.7)
    origin = tuple(o - 0.37 * s for o, s in zip(ct.origin, spacing))
    extent = [(n - 1) * s for n, s in zip(ct.shape, ct.spacing)]
    shape = tuple(int(np.ceil((e + 0.74 * s) / s)) + 1 for e, s in zip(extent, spacing))
    return GridSpec(shape, spacing, origin)


def write_rtdoses(folder: Path, spec: PatientSpec, uids: dict) -> list[Path]:
    """One PLAN dose, or one BEAM dose per weight (summing to the analytic dose; beam
    ``b`` names ReferencedBeamNumber ``b + 1``), and the PLAN dose too if
    ``spec.plan_dose_too``."""
    grid = spec.dose_grid or default_dose_grid(spec.ct)
    z, y, x = np.meshgrid(*grid.axes(), indexing="ij")
    total = dose_function(x, y, z, spec.ct.centre_xy(), spec.scale)
    native, flips = _native(total, spec.orientation)
    iop = np.asarray(ORIENTATIONS[spec.orientation], float)
    normal_z = np.cross(iop[:3], iop[3:])[2]
    ipp = _first_voxel_xyz(grid, flips)
    offsets = np.arange(grid.shape[0]) * grid.spacing[0]
    gfov = offsets if spec.gfov == "relative" else ipp[2] + normal_z * offsets
    paths = []
    per_beam = len(spec.beam_weights) > 1
    weights = list(spec.beam_weights) + ([1.0] if per_beam and spec.plan_dose_too else [])
    for b, weight in enumerate(weights):
        is_beam = per_beam and b < len(spec.beam_weights)
        ds = _file_dataset(RTDoseStorage, "RTDOSE", uids, spec)
        ds.FrameOfReferenceUID = spec.dose_frame_uid or uids["frame"]
        values = native * weight
        scaling = float(_ds(values.max() / 60000.0))
        _set_image(ds, np.rint(values / scaling).astype("<u4"), bits=32)
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = list(ORIENTATIONS[spec.orientation])
        ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[2])]
        ds.NumberOfFrames = grid.shape[0]
        ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
        ds.GridFrameOffsetVector = [_ds(v) for v in gfov]
        ds.DoseGridScaling = _ds(scaling)
        ds.DoseUnits, ds.DoseType = "GY", "PHYSICAL"
        ds.DoseSummationType = "BEAM" if is_beam else "PLAN"
        plan_ref = Dataset()
        plan_ref.ReferencedSOPClassUID = RTPlanStorage
        plan_ref.ReferencedSOPInstanceUID = uids["plan"]
        if is_beam:
            beam_ref, group_ref = Dataset(), Dataset()
            beam_ref.ReferencedBeamNumber = b + 1
            group_ref.ReferencedFractionGroupNumber = 1
            group_ref.ReferencedBeamSequence = Sequence([beam_ref])
            plan_ref.ReferencedFractionGroupSequence = Sequence([group_ref])
        ds.ReferencedRTPlanSequence = Sequence([plan_ref])
        path = folder / (f"RD_{b}.dcm" if is_beam or not per_beam else "RD_plan.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_rtplan(folder: Path, spec: PatientSpec, uids: dict) -> Path:
    """DoseReferenceSequence (TargetPrescriptionDose per target ROI) and fractions."""
    ds = _file_dataset(RTPlanStorage, "RTPLAN", uids, spec)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids["plan"]
    ds.RTPlanLabel, ds.RTPlanGeometry = "SIB", "PATIENT"
    references = []
    for i, (target, gy) in enumerate(spec.plan_prescriptions.items(), start=1):
        item = Dataset()
        item.DoseReferenceNumber = i
        item.DoseReferenceStructureType = "VOLUME"
        item.DoseReferenceType = "TARGET"
        item.DoseReferenceDescription = spec.scene[target][0]
        if target in spec.structures:
            item.ReferencedROINumber = spec.structures.index(target) + 1
        item.TargetPrescriptionDose = _ds(gy)
        references.append(item)
    ds.DoseReferenceSequence = Sequence(references)
    group = Dataset()
    group.FractionGroupNumber, group.NumberOfFractionsPlanned = 1, spec.fractions
    group.NumberOfBeams = len(spec.beam_weights)
    numbers = ([i for i, b in enumerate(spec.beams, start=1)
                if b.get("delivery", "TREATMENT") == "TREATMENT"] if spec.beams
               else list(range(1, len(spec.beam_weights) + 1)))
    group.ReferencedBeamSequence = Sequence([_beam_ref(n) for n in numbers])
    ds.FractionGroupSequence = Sequence([group])
    if spec.beams:
        ds.BeamSequence = Sequence([_beam(i, b) for i, b in enumerate(spec.beams, start=1)])
    path = folder / "RP_plan.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _beam_ref(number: int) -> Dataset:
    item = Dataset()
    item.ReferencedBeamNumber = number
    return item


def _beam(number: int, beam: dict) -> Dataset:
    """One BeamSequence item: a static field or an arc (a control point per angle)."""
    item = Dataset()
    item.BeamNumber, item.BeamName = number, f"B{number}"
    item.RadiationType, item.TreatmentDeliveryType = "PHOTON", beam.get("delivery", "TREATMENT")
    angles = list(beam["gantry_deg"])
    rotation = beam.get("rotation", "NONE")
    item.BeamType = "STATIC" if rotation == "NONE" else "DYNAMIC"
    points = []
    angles = angles if rotation != "NONE" else angles[:1] * 2
    meterset = beam.get("meterset")  # cumulative weight per control point (default: even)
    for k, angle in enumerate(angles):
        point = Dataset()
        point.ControlPointIndex = k
        point.CumulativeMetersetWeight = _ds(meterset[k] if meterset else k / (len(angles) - 1))
        point.GantryAngle = _ds(angle)
        if k == 0:
            point.GantryRotationDirection = rotation
            point.PatientSupportAngle = _ds(beam.get("couch_deg", 0.0))
            point.IsocenterPosition = [_ds(v) for v in beam["isocentre_xyz"]]
            point.NominalBeamEnergy = _ds(beam.get("energy_mv", 6.0))
        points.append(point)
    item.FinalCumulativeMetersetWeight = _ds(1.0)
    item.NumberOfControlPoints = len(points)
    item.ControlPointSequence = Sequence(points)
    return item


def write_patient(folder: str | Path, spec: PatientSpec | None = None) -> PatientTruth:
    """Write one patient folder; return the analytic truth on the canonical CT grid."""
    spec = spec or PatientSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "frame": generate_uid(), "ct_series": generate_uid(),
            "plan": generate_uid()}
    masks = analytic_masks(spec)
    body = masks.get("Body", np.ones(spec.ct.shape, bool))
    ct = analytic_ct(spec.ct, body) if spec.ct_hu is None else \
        np.where(body, spec.ct_hu, -1000).astype(np.int16)
    files = {"CT": write_ct(folder, spec, ct, uids)}
    for n in range(spec.extra_ct_series):
        uids[f"other_ct_series_{n}"] = generate_uid()
        files[f"CT{n + 2}"] = write_ct(folder, spec, ct + np.int16(100 * (n + 1)), uids,
                                       f"other_ct_series_{n}", f"CT{n + 2}")
    if spec.with_struct:
        files["RTSTRUCT"] = [write_rtstruct(folder, spec, uids)]
    if spec.with_dose:
        files["RTDOSE"] = write_rtdoses(folder, spec, uids)
    if spec.with_plan:
        files["RTPLAN"] = [write_rtplan(folder, spec, uids)]
    return PatientTruth(ct, masks, uids, files, spec)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean volumes."""
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def rt_utils_masks(masks: dict[str, np.ndarray], orientation: str) -> dict[str, np.ndarray]:
    """Canonical (Z, Y, X) masks -> rt-utils' layout: (rows, columns, slices) of the
    stored pixels, slices sorted along the slice normal (as rt-utils sorts the series)."""
    return {name: np.ascontiguousarray(np.transpose(_native(mask, orientation)[0], (1, 2, 0)))
            for name, mask in masks.items()}


def write_rt_utils_rtstruct(folder: Path, masks: dict[str, np.ndarray], orientation: str,
                            approximate_contours: bool = True) -> Path:
    """An RTSTRUCT written by rt-utils (OpenCV ``findContours``) from canonical masks, on
    the CT series in ``folder`` (which must hold no other image with pixel data).

    rt-utils scales contour columns by PixelSpacing[0] and rows by PixelSpacing[1], which
    is only right for square pixels: use grids with dy == dx.
    """
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_new(dicom_series_path=str(folder))
    for name, mask in rt_utils_masks(masks, orientation).items():
        rtstruct.add_roi(mask=mask.astype(bool), name=name,
                         approximate_contours=approximate_contours)
    path = folder / "RS_rt_utils.dcm"
    rtstruct.save(str(path))
    return path


def dicom_uids(folder: Path) -> set[str]:
    """Every instance UID (VR UI, nested sequences included) in the DICOM files below
    ``folder``: Study, Series, FrameOfReference, SOP instances, references. The standard's
    own UIDs (SOP classes, transfer syntaxes: ``1.2.840.10008.*``) and pydicom's
    implementation UID are left out: they identify nothing."""
    import pydicom
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    found: set[str] = set()

    def visit(ds: Dataset) -> None:
        for element in ds.iterall():
            if element.VR == "UI" and element.value:
                values = element.value if element.VM > 1 else [element.value]
                found.update(str(v) for v in values)

    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        visit(ds)
        visit(ds.file_meta)
    return {uid for uid in found if not uid.startswith("1.2.840.10008.")
            and uid != PYDICOM_IMPLEMENTATION_UID}
