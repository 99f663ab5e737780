"""The mean-dose baseline every model must beat.

Each voxel gets the training set's mean dose of its structure class. A voxel's class is
the first structure (in data-config order, targets first) that contains it, else
"body", else "outside".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from vmatdose.data.case import Case


def structure_classes(case: Case, structures: Sequence[str]) -> np.ndarray:
    """(Z, Y, X) int16 class index: i for ``structures[i]``, len for body, len+1 outside."""
    n = len(structures)
    classes = np.where(case.body > 0, n, n + 1).astype(np.int16)
    for i in reversed(range(n)):
        if case.has_structure(structures[i]):
            classes[case.mask(structures[i]) > 0] = i
    return classes


class StructureMeanBaseline:
    """Predicts the training set's mean dose (Gy) of each voxel's structure class."""

    def __init__(self, structures: Sequence[str]):
        self.structures = list(structures)
        self.class_means_gy: np.ndarray | None = None

    def fit(self, cases: Iterable[Case]) -> StructureMeanBaseline:
        n_classes = len(self.structures) + 2
        sums = np.zeros(n_classes)
        counts = np.zeros(n_classes)
        for case in cases:
            classes = structure_classes(case, self.structures)
            sums += np.bincount(classes.ravel(), weights=case.dose.ravel(), minlength=n_classes)
            counts += np.bincount(classes.ravel(), minlength=n_classes)
        self.class_means_gy = np.divide(sums, counts, out=np.zeros(n_classes), where=counts > 0)
        return self

    def predict(self, case: Case) -> np.ndarray:
        """(Z, Y, X) float32 dose in Gy."""
        if self.class_means_gy is None:
            raise RuntimeError("StructureMeanBaseline.predict called before fit")
        return self.class_means_gy[structure_classes(case, self.structures)].astype(np.float32)
