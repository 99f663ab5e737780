"""The training grid: one target spacing for every case, cropped to the body with a margin.

nnU-Net's answer to clinical data of mixed resolution, applied at ingest: every case is
put on the same voxel spacing (``spacing_mm``, chosen once per dataset from its
fingerprint, see :mod:`~vmatdose.data.ingest.fingerprint`) and cropped to its body's
bounding box plus ``margin_mm``:

* CT: linear resampling of the native HU volume (SimpleITK);
* contours: rasterised directly on the target grid
  (:func:`~vmatdose.data.ingest.dicom_struct.rasterize_roi` with ``target=``);
* dose: resampled once, from the RTDOSE grid straight onto the target grid.

The full-field target grid keeps the CT's field of view: the same outer corner, ``round``
(extent / spacing) voxels per axis. The case records where it came from
(``meta["source_grids"]``: the CT grid and the RTDOSE grid as :func:`itk_geometry` dicts)
so a prediction can be put back on the patient's own geometry
(:mod:`vmatdose.data.export.rtdose`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from vmatdose.data.grid_rule import GridRule
from vmatdose.data.ingest.dicom_ct import CanonicalGrid
from vmatdose.data.ingest.dicom_dose import frame_offsets
from vmatdose.data.ingest.dicom_files import require

#: Default margin (mm) around the body's bounding box.
MARGIN_MM = 10.0
#: Default largest number of voxels along any axis of a cropped case.
MAX_VOXELS = 256


@dataclass(frozen=True)
class GridSettings:
    """Where ingest puts a case.

    Attributes:
        spacing_mm: target ``(dz, dy, dx)`` mm; ``None`` keeps the native CT grid (no
            resampling, no crop).
        margin_mm: margin around the body's bounding box (mm).
        field_of_view_voxels: ``N``: the grid follows each CT instead of ``spacing_mm``:
            its whole field of view, ``N`` voxels across, its own slices, not cropped
            (:class:`~vmatdose.data.grid_rule.GridRule`, the rule of OpenKBP's arrays; a
            model with instance normalisation sees the air around the patient too).
    """

    spacing_mm: tuple[float, float, float] | None = None
    margin_mm: float = MARGIN_MM
    field_of_view_voxels: int | None = None

    @property
    def resamples(self) -> bool:
        return self.spacing_mm is not None or self.field_of_view_voxels is not None

    @property
    def crops(self) -> bool:
        """Whether a case is cropped to its body (not under a field-of-view rule)."""
        return self.spacing_mm is not None and self.field_of_view_voxels is None

    def spacing_for(self, ct_grid: CanonicalGrid) -> tuple[float, float, float] | None:
        """The target ``(dz, dy, dx)`` mm for a CT on ``ct_grid`` (``None``: native)."""
        rule = GridRule(self.field_of_view_voxels)
        if rule.follows_ct:
            return rule.spacing_for(ct_grid.shape, ct_grid.spacing_mm)
        return self.spacing_mm


def full_target_grid(ct_grid: CanonicalGrid, spacing_mm: Sequence[float]) -> CanonicalGrid:
    """The CT's field of view at ``spacing_mm``: same outer corner, ``round(extent /
    spacing)`` voxels per axis (at least 1)."""
    spacing = np.asarray(spacing_mm, float)
    src_spacing = np.asarray(ct_grid.spacing_mm, float)
    extent = np.asarray(ct_grid.shape) * src_spacing
    shape = np.maximum(1, np.rint(extent / spacing)).astype(int)
    corner = np.asarray(ct_grid.origin_mm, float) - src_spacing / 2
    origin = corner + spacing / 2
    return CanonicalGrid(tuple(int(v) for v in shape), tuple(float(v) for v in spacing),
                         tuple(float(v) for v in origin))


def source_ct_grid(geometry: dict) -> CanonicalGrid:
    """The canonical grid of a case's recorded source CT (``meta["source_grids"]["ct"]``,
    :func:`canonical_geometry`: identity direction, x, y, z order)."""
    return CanonicalGrid(tuple(int(n) for n in geometry["size"][::-1]),
                         tuple(float(v) for v in geometry["spacing_mm"][::-1]),
                         tuple(float(v) for v in geometry["origin_mm"][::-1]))


def body_box(body: np.ndarray, grid: CanonicalGrid, margin_mm: float
             ) -> tuple[slice, slice, slice]:
    """The body's bounding box on ``grid`` widened by ``margin_mm`` (clipped to the grid);
    the whole grid when the body is empty."""
    if not body.any():
        return tuple(slice(0, n) for n in grid.shape)  # type: ignore[return-value]
    box = []
    for axis, (n, step) in enumerate(zip(grid.shape, grid.spacing_mm)):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(body.any(axis=other))
        pad = int(np.ceil(margin_mm / step - 1e-9))
        box.append(slice(max(0, int(present[0]) - pad), min(n, int(present[-1]) + pad + 1)))
    return tuple(box)  # type: ignore[return-value]


def crop_grid(grid: CanonicalGrid, box: tuple[slice, slice, slice]) -> CanonicalGrid:
    """The sub-grid of ``grid`` that ``box`` cuts out."""
    origin = tuple(o + b.start * s for o, b, s in zip(grid.origin_mm, box, grid.spacing_mm))
    shape = tuple(b.stop - b.start for b in box)
    return CanonicalGrid(shape, grid.spacing_mm, origin)


def canonical_image(volume: np.ndarray, grid: CanonicalGrid) -> sitk.Image:
    """A (Z, Y, X) array on a canonical grid as a SimpleITK image (identity direction)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    image.SetSpacing(tuple(float(v) for v in grid.spacing_mm[::-1]))
    image.SetOrigin(tuple(float(v) for v in grid.origin_mm[::-1]))
    return image


def resample_ct(ct: np.ndarray, source: CanonicalGrid, target: CanonicalGrid) -> np.ndarray:
    """(Z, Y, X) int16 HU on ``source`` -> on ``target``, linear; air (-1000 HU) outside."""
    reference = sitk.Image([int(n) for n in target.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(v) for v in target.spacing_mm[::-1]))
    reference.SetOrigin(tuple(float(v) for v in target.origin_mm[::-1]))
    out = sitk.Resample(canonical_image(ct.astype(np.float32), source), reference,
                        sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    values = np.rint(sitk.GetArrayFromImage(out))
    return np.clip(values, -32768, 32767).astype(np.int16)


def itk_geometry(origin_xyz: Sequence[float], spacing_xyz: Sequence[float],
                 size_xyz: Sequence[int], direction: Sequence[float]) -> dict:
    """A grid in patient coordinates, as the case's ``meta["source_grids"]`` keeps it:
    ``origin_mm`` (x, y, z) of the first stored voxel, ``spacing_mm`` along the stored
    columns, rows and frames, ``size`` (columns, rows, frames) and ``direction`` (the 3 x 3
    matrix row-major; its columns are the row, column and frame-normal cosines)."""
    return {"origin_mm": [float(v) for v in origin_xyz],
            "spacing_mm": [float(v) for v in spacing_xyz],
            "size": [int(v) for v in size_xyz],
            "direction": [float(v) for v in direction]}


def canonical_geometry(grid: CanonicalGrid) -> dict:
    """:func:`itk_geometry` of a canonical grid (identity direction)."""
    return itk_geometry(grid.origin_mm[::-1], grid.spacing_mm[::-1], grid.shape[::-1],
                        np.eye(3).ravel())


def rtdose_geometry(ds: Dataset, label: str) -> dict:
    """:func:`itk_geometry` of an RTDOSE from its header (no pixel data needed): frames
    sorted along the slice normal, as the dose is read."""
    iop = np.asarray([float(v) for v in require(ds, "ImageOrientationPatient", label)])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    ipp = np.asarray([float(v) for v in require(ds, "ImagePositionPatient", label)])
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    offsets, _ = frame_offsets(ds, ipp, normal, n_frames, label)
    offsets = np.sort(offsets)
    dz = (float(np.mean(np.diff(offsets))) if n_frames > 1
          else float(ds.get("SliceThickness", 1.0) or 1.0))
    dy, dx = (float(v) for v in require(ds, "PixelSpacing", label))
    return itk_geometry(ipp + offsets[0] * normal, (dx, dy, dz),
                        (int(ds.Columns), int(ds.Rows), n_frames),
                        np.column_stack([row, col, normal]).ravel())


def geometry_image(geometry: dict, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
    """An empty SimpleITK image on an :func:`itk_geometry` grid (a resampling reference)."""
    image = sitk.Image([int(v) for v in geometry["size"]], pixel_type)
    image.SetOrigin(tuple(float(v) for v in geometry["origin_mm"]))
    image.SetSpacing(tuple(float(v) for v in geometry["spacing_mm"]))
    image.SetDirection(tuple(float(v) for v in geometry["direction"]))
    return image


def resample_to_geometry(volume: np.ndarray, grid: CanonicalGrid, geometry: dict
                         ) -> np.ndarray:
    """A (Z, Y, X) float volume on a canonical grid -> the stored (frames, rows, columns)
    array of ``geometry``, linear; the edge voxels extend one voxel beyond the grid (a
    voxel is a cube, and a dose grid usually overhangs the CT by a fraction of one), 0
    further out."""
    padded = np.pad(volume.astype(np.float32), 1, mode="edge")
    grid = CanonicalGrid(tuple(n + 2 for n in grid.shape), grid.spacing_mm,
                         tuple(o - s for o, s in zip(grid.origin_mm, grid.spacing_mm)))
    out = sitk.Resample(canonical_image(padded, grid),
                        geometry_image(geometry), sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)
