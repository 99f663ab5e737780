"""Re-draw the figures of experiments/figures.md: one 48x64x96 phantom case, a blurred,
1-voxel-shifted, 3 % low "prediction", and its gamma 3%/3mm map.

    PYTHONPATH=. python experiments/figures/render.py experiments/figures after 60
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from vmatdose.data.case import load_case
from vmatdose.data.phantom import generate_phantom_dataset
from vmatdose.evaluation import figures
from vmatdose.metrics.gamma import gamma_index

out, tag = Path(sys.argv[1]), sys.argv[2]
dpi = int(sys.argv[3]) if len(sys.argv) > 3 else 70
with tempfile.TemporaryDirectory() as folder:
    path = generate_phantom_dataset(folder, n_cases=1, shape=(48, 64, 96),
                                    spacing_mm=(3.0, 4.0, 4.0), num_workers=0,
                                    progress=False)[0]
    case = load_case(path)
pred = np.roll(ndimage.gaussian_filter(case.dose, 1.2) * 0.97, 1, axis=2).astype(np.float32)
gamma = gamma_index(case.dose, pred, case.spacing_mm, dose_percent=3.0, distance_mm=3.0,
                    lower_percent_dose_cutoff=10.0, mask=case.body > 0)
targets = list(case.prescriptions_gy)
figures.dose_slices_figure(case, pred, targets, gamma).savefig(out / f"slices_{tag}.png",
                                                               dpi=dpi)
figures.dvh_figure(case, pred).savefig(out / f"dvh_{tag}.png", dpi=dpi)
