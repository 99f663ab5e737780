"""A case as the planning engine's patient: CT and structure set (pyRadPlan objects).

Case arrays are (Z, Y, X) in canonical LPS orientation with ``spacing_mm`` (dz, dy, dx)
and ``origin_mm`` (z, y, x); a SimpleITK image of the same array has size (X, Y, Z),
spacing (dx, dy, dz), origin (x, y, z) and the identity direction, which is exactly that
geometry in DICOM patient coordinates, the frame pyRadPlan plans in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from vmatdose.data.case import Case
from vmatdose.planning.arrangement import case_targets

BODY = "BODY"


def case_image(case: Case, array: np.ndarray, dtype=np.float32) -> sitk.Image:
    """``array`` (Z, Y, X) on the case grid as a SimpleITK image with the case geometry."""
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetSpacing([float(s) for s in case.spacing_mm[::-1]])
    image.SetOrigin([float(o) for o in case.origin_mm[::-1]])
    return image


def image_array(image: sitk.Image) -> np.ndarray:
    """A SimpleITK image back to a (Z, Y, X) float32 array."""
    return sitk.GetArrayFromImage(image).astype(np.float32)


def build_ct(case: Case) -> Any:
    """pyRadPlan ``CT`` of the case (HU)."""
    from pyRadPlan.ct import CT

    return CT(cube_hu=case_image(case, case.ct))


def build_structure_set(case: Case, ct: Any) -> Any:
    """pyRadPlan ``StructureSet``: the case's targets (overlap priority by prescription,
    highest first), its organs at risk, then the body (``BODY``), all without objectives.

    Overlapping voxels belong to the structure of lowest priority number only while
    optimising, so a target voxel inside an organ is planned as target."""
    from pyRadPlan.cst import StructureSet, create_voi

    targets = case_targets(case)
    vois = []
    for rank, name in enumerate(targets, start=1):
        vois.append(create_voi(name=name, voi_type="TARGET", Priority=rank,
                               mask=case_image(case, case.mask(name), np.uint8), ct_image=ct))
    for name in case.structures:
        if name in case.prescriptions_gy or not case.mask(name).any():
            continue
        vois.append(create_voi(name=name, voi_type="OAR", Priority=len(targets) + 1,
                               mask=case_image(case, case.mask(name), np.uint8), ct_image=ct))
    vois.append(create_voi(name=BODY, voi_type="EXTERNAL", Priority=len(targets) + 2,
                           mask=case_image(case, case.body, np.uint8), ct_image=ct))
    return StructureSet(vois=vois, ct_image=ct)
