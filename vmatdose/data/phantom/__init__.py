"""Synthetic prostate SIB phantoms: the embedded default data set.

Each case is a pelvis with anatomy that varies per seed (:mod:`.anatomy`), a CT in
realistic Hounsfield units, and a dose that looks like a simultaneous-integrated-boost
VMAT plan (:mod:`.dose`) at the protocol's prescriptions (70/56 Gy in 28 fractions for
``prostate_sib``), or per case at a second level; :mod:`.generation` writes them as case
files.
"""

from vmatdose.data.phantom.anatomy import STRUCTURES, Anatomy, make_anatomy
from vmatdose.data.phantom.dose import compute_vmat_dose
from vmatdose.data.phantom.generation import (
    DATASET_FILE,
    DEFAULT_SHAPE,
    DEFAULT_SPACING_MM,
    GENERATOR_VERSION,
    generate_phantom_case,
    generate_phantom_dataset,
    phantom_protocol,
)

__all__ = [
    "DATASET_FILE",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING_MM",
    "GENERATOR_VERSION",
    "STRUCTURES",
    "Anatomy",
    "compute_vmat_dose",
    "generate_phantom_case",
    "generate_phantom_dataset",
    "make_anatomy",
    "phantom_protocol",
]
