"""Phantom cases and data sets: anatomy + dose per seed, written as case files.

The protocol (default ``prostate_sib``) gives the structure order, the prescriptions and
the fractions; the phantom draws the structures of :data:`~.anatomy.STRUCTURES` and refuses
a protocol that names others. ``second_level_gy`` gives a share of the cases other
prescriptions (e.g. ``{PTV70: 60, PTV56: 50}``): the dose is planned to them and the case's
``prescriptions_gy`` records them, so a model conditioned on the prescription can learn
both levels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from vmatdose.config import CONFIG_DIR
from vmatdose.config_schema import PHANTOM_SHAPE, PHANTOM_SPACING_MM
from vmatdose.data.atomic import write_json_atomic
from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import Case
from vmatdose.data.ingest.batch import convert_cases
from vmatdose.data.phantom.anatomy import BOOST, ELECTIVE, STRUCTURES, make_anatomy
from vmatdose.data.phantom.dose import compute_vmat_dose
from vmatdose.protocol import Protocol

log = logging.getLogger(__name__)

DEFAULT_SHAPE = PHANTOM_SHAPE
DEFAULT_SPACING_MM = PHANTOM_SPACING_MM
DEFAULT_PROTOCOL = "prostate_sib"
DATASET_FILE = "dataset.json"
GENERATOR_VERSION = 2  # bump when the anatomy or dose model changes: old folders are refused
# dataset.json keys added after version 2 first shipped, with the value every folder
# written before then had (so those folders stay valid)
_RECORDED_LATER = {"protocol": DEFAULT_PROTOCOL,
                   "prescriptions_gy": {BOOST: 70.0, ELECTIVE: 56.0},
                   "second_level_gy": None, "second_level_fraction": 0.0}
_LEVEL_STREAM = 1  # the per-case draw of the prescription level, apart from the anatomy's

ProtocolLike = Protocol | Mapping | str | None


def phantom_protocol(protocol: ProtocolLike = None) -> Protocol:
    """The :class:`Protocol` (a protocol config mapping, a name or ``None`` for
    ``prostate_sib``), checked against what the phantom can draw."""
    if protocol is None or isinstance(protocol, str):
        protocol = _load_protocol(protocol or DEFAULT_PROTOCOL)
    if not isinstance(protocol, Protocol):
        protocol = Protocol.from_dict(protocol)
    unknown = [s for s in protocol.structures if s not in STRUCTURES]
    if unknown or protocol.targets != (BOOST, ELECTIVE):
        raise ValueError(
            f"protocol {protocol.name!r}: the phantom draws targets {BOOST}, {ELECTIVE} (in "
            f"that order) and organs {STRUCTURES[2:]}; the protocol has targets "
            f"{list(protocol.targets)} and structures it cannot draw: {unknown}")
    return protocol


def _load_protocol(name: str) -> Protocol | Mapping:
    """``conf/protocol/<name>.yaml``: composed with Hydra, or, inside a running Hydra app
    (which cannot compose another config), read as a file (enough for a protocol that
    does not build on another; the data config passes ``${protocol}`` there anyway)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return Protocol.load(name)
    path = Path(CONFIG_DIR) / "protocol" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: no such protocol")
    return OmegaConf.load(path)


def case_prescriptions(protocol: Protocol, override: Mapping[str, float] | None
                       ) -> dict[str, float]:
    """The protocol's prescriptions (Gy), or ``override`` checked to name the same targets."""
    if override is None:
        return dict(protocol.prescriptions_gy)
    override = {str(k): float(v) for k, v in dict(override).items()}
    if set(override) != set(protocol.targets) or min(override.values()) <= 0:
        raise ValueError(f"phantom prescriptions {override}: give a positive dose (Gy) for "
                         f"each of the protocol's targets {list(protocol.targets)}")
    return {t: override[t] for t in protocol.targets}


def generate_phantom_case(seed: int, shape: Sequence[int] = DEFAULT_SHAPE,
                          spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
                          case_id: str | None = None, n_beams: int = 36,
                          protocol: ProtocolLike = None,
                          prescriptions_gy: Mapping[str, float] | None = None) -> Case:
    """One phantom case, fully determined by ``seed``, the grid and the prescriptions.

    Args:
        seed: random seed (anatomy and CT noise).
        shape: grid ``(Z, Y, X)`` in voxels.
        spacing_mm: voxel size ``(dz, dy, dx)`` in mm.
        case_id: identifier written into the case (default ``phantom_<seed>``).
        n_beams: beam angles sampling the arc.
        protocol: structure order, prescriptions and fractions (default ``prostate_sib``).
        prescriptions_gy: this case's levels instead of the protocol's (same targets).
    """
    protocol = phantom_protocol(protocol)
    prescriptions = case_prescriptions(protocol, prescriptions_gy)
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing_mm)
    with _single_threaded_torch():
        anatomy = make_anatomy(rng, shape, spacing)
        dose = compute_vmat_dose(anatomy, spacing, prescriptions, n_beams)
    ct = np.clip(np.round(anatomy.hu), -1024, 3071).astype(np.int16)
    origin = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return Case(
        case_id=case_id or f"phantom_{seed}",
        ct=ct,
        masks=np.stack([anatomy.masks[s] for s in protocol.structures]).astype(np.uint8),
        structures=list(protocol.structures),
        body=anatomy.body.astype(np.uint8),
        spacing_mm=np.asarray(spacing, float),
        origin_mm=origin,
        prescriptions_gy=prescriptions,
        dose=dose,
        meta={"source": "phantom", "seed": int(seed), "fractions": protocol.fractions,
              "n_beams": n_beams, "protocol": protocol.name,
              "beams": phantom_arc(n_beams, anatomy.isocentre_mm).to_meta()},
    )


def phantom_arc(n_beams: int, isocentre_mm: Sequence[float]) -> BeamArrangement:
    """The arc the phantom plan is traced with (:func:`compute_vmat_dose`): ``n_beams``
    control points, IEC gantry 0, 360 - 360/n, ... degrees (the phantom's grid centre is
    the patient origin, so its isocentre is already in patient mm)."""
    gantry = tuple((-360.0 * k / n_beams) % 360.0 for k in range(n_beams))
    return BeamArrangement(gantry, (0.0,) * n_beams, tuple(float(v) for v in isocentre_mm),
                           6.0, "arc", "phantom")


class _single_threaded_torch:
    """Run torch ops on one thread (workers run in parallel; results stay identical)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def uses_second_level(seed: int, index: int, fraction: float) -> bool:
    """Whether case ``index`` of a data set gets the second prescription level: a draw of
    its own per case, so growing ``n_cases`` keeps the earlier cases' levels."""
    draw = np.random.default_rng(np.random.SeedSequence([seed, index, _LEVEL_STREAM]))
    return bool(draw.random() < fraction)


def _phantom_from_job(source: tuple, case_id: str) -> Case:
    """The batch engine's convert function: ``source`` is ``(seed, shape, spacing_mm,
    protocol, prescriptions_gy)``."""
    seed, shape, spacing, protocol, prescriptions = source
    return generate_phantom_case(seed, shape, spacing, case_id, protocol=protocol,
                                 prescriptions_gy=prescriptions)


def _check_dataset_file(folder: Path, params: dict) -> None:
    record = folder / DATASET_FILE
    if record.exists():
        previous = json.loads(record.read_text())
        wanted = {k: v for k, v in params.items() if k != "n_cases"}
        same = {k: previous.get(k, _RECORDED_LATER.get(k)) for k in wanted}
        if same != wanted:
            raise ValueError(
                f"{record}: this folder holds phantoms generated with {previous}, not "
                f"{params}. Use another cases_dir or delete the folder.")


def generate_phantom_dataset(output_dir: str | os.PathLike, n_cases: int = 32,
                             shape: Sequence[int] = DEFAULT_SHAPE,
                             spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
                             seed: int = 0, num_workers: int = 2,
                             progress: bool = True, protocol: ProtocolLike = None,
                             second_level_gy: Mapping[str, float] | None = None,
                             second_level_fraction: float = 0.5) -> list[Path]:
    """Write ``n_cases`` phantom case files ``phantom_000.npz ...`` into ``output_dir``.

    Idempotent and resumable: cases already on disk (valid files) are kept, so a killed
    run continues where it stopped; each file is written atomically. ``dataset.json``
    records the parameters, and a folder generated with other parameters is refused.

    Args:
        protocol: see :func:`generate_phantom_case` (the data config passes ``${protocol}``).
        second_level_gy: other prescriptions (Gy, the protocol's targets) for about
            ``second_level_fraction`` of the cases; ``None``: every case at the protocol's.

    Returns:
        Paths of all ``n_cases`` files.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    protocol = phantom_protocol(protocol)
    second = (case_prescriptions(protocol, second_level_gy) if second_level_gy is not None
              else None)
    fraction = float(second_level_fraction) if second is not None else 0.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"second_level_fraction must be in [0, 1], not {fraction}")
    shape, spacing = [int(s) for s in shape], [float(s) for s in spacing_mm]
    params = {"generator": "vmatdose.data.phantom", "version": GENERATOR_VERSION,
              "n_cases": int(n_cases), "shape": shape,
              "spacing_mm": spacing, "seed": int(seed), "protocol": protocol.name,
              "prescriptions_gy": dict(protocol.prescriptions_gy),
              "second_level_gy": second, "second_level_fraction": fraction}
    _check_dataset_file(folder, params)
    jobs = [(f"phantom_{i:03d}",
             (_case_seed(seed, i), shape, spacing, protocol,
              second if second is not None and uses_second_level(seed, i, fraction) else None))
            for i in range(n_cases)]
    summary = convert_cases(jobs, _phantom_from_job, folder, num_workers=num_workers,
                            progress=progress and "generating phantom cases")
    if summary["failed"]:
        raise RuntimeError(f"{folder}: phantom generation failed: {summary['failed']}")
    write_json_atomic(params, folder / DATASET_FILE)
    return [folder / f"{case_id}.npz" for case_id, _ in jobs]
