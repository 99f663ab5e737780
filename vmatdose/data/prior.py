"""A prior-dose input channel, so a network learns the residual from it instead of the
whole dose: ``data.prior_dose.kind=distance`` (below) or ``kind=beams``, the dose of open
fields from the case's beams (:mod:`vmatdose.data.beam_prior`), optionally blended with
the distance prior. Either can be floored at each target's prescription inside that
target (``target_floor``). Computed once per case, when the data set caches its cases.

The distance prior: each target's prescription, falling off with the distance to that
target,

    prior(v) = body(v) * max_t  p_t / scale * g(d_t(v))

with ``p_t`` the prescription (Gy) of each target the case has, ``d_t(v)`` the Euclidean
distance (mm, anisotropic voxels) from voxel v to target t (0 inside) and ``g`` a falloff
profile (relative dose vs distance) fitted once from training cases with
:func:`fit_falloff_profile` and written into the data config
(``data.prior_dose.{distance_mm, relative_dose}``), so inference rebuilds the same
channel from the config alone.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy import ndimage

from vmatdose.data.beam_model import BeamModelParams
from vmatdose.data.beam_prior import DEFAULT_MAX_BEAMS, beam_prior_channels
from vmatdose.data.beams import BeamArrangement, default_arrangement, targets_centroid_mm
from vmatdose.data.case import load_case

log = logging.getLogger(__name__)

#: Distances (mm) of the fitted profile's knots.
DEFAULT_KNOTS_MM = (0, 2, 4, 6, 8, 10, 13, 16, 20, 25, 30, 35, 40, 50, 60, 70, 80, 100, 120)


def target_distances_mm(masks: np.ndarray, spacing_mm: Sequence[float],
                        region: np.ndarray | None = None) -> np.ndarray:
    """(T, Z, Y, X) float32 distance (mm) to each target mask (0 inside); 1e3 mm for an
    empty mask. Computed inside the bounding box of ``region`` | the targets (the only
    voxels the prior is used in), 1e3 mm outside it.

    Args:
        masks: (T, Z, Y, X) binary target masks.
        region: (Z, Y, X) voxels that need a distance (the possible-dose mask) or ``None``.
    """
    masks = np.asarray(masks) > 0
    out = np.full(masks.shape, 1e3, np.float32)
    cover = masks.any(0) if region is None else (masks.any(0) | (np.asarray(region) > 0))
    if not cover.any():
        return out
    idx = np.argwhere(cover)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
    for t, mask in enumerate(masks):
        if mask[box].any():
            out[(t, *box)] = ndimage.distance_transform_edt(~mask[box], sampling=spacing_mm)
    return out


def prior_dose(masks: np.ndarray, body: np.ndarray, levels: Sequence[float],
               spacing_mm: Sequence[float], distance_mm: Sequence[float],
               relative_dose: Sequence[float]) -> np.ndarray:
    """(Z, Y, X) float32 prior dose in the units of ``levels`` (see the module docstring).

    Args:
        masks: (T, Z, Y, X) target masks; ``levels``: (T,) their prescriptions.
        body: (Z, Y, X) region where the prior is non-zero.
        distance_mm, relative_dose: the falloff profile g (linear between knots, flat
            beyond the last).
    """
    distances = target_distances_mm(masks, spacing_mm, body)
    prior = np.zeros(np.shape(body), np.float32)
    for level, dist in zip(levels, distances):
        np.maximum(prior, level * np.interp(dist, distance_mm, relative_dose), out=prior)
    return prior * (np.asarray(body) > 0)


PRIOR_KINDS = ("distance", "beams")
#: Keys a ``data.prior_dose`` config may hold.
PRIOR_KEYS = ("kind", "distance_mm", "relative_dose", "distance_weight", "beam_model",
              "max_beams", "target_floor", "beam_sectors")


def check_prior_config(prior_dose: Mapping) -> dict:
    """The ``data.prior_dose`` config, checked: ``kind`` (``distance`` by default),
    the falloff profile where the kind needs one; ``ValueError`` naming the bad key."""
    cfg = dict(prior_dose)
    unknown = sorted(set(cfg) - set(PRIOR_KEYS))
    if unknown:
        raise ValueError(f"data.prior_dose: unknown key(s) {unknown}; allowed: {list(PRIOR_KEYS)}")
    cfg.setdefault("kind", "distance")
    if cfg["kind"] not in PRIOR_KINDS:
        raise ValueError(f"data.prior_dose.kind must be one of {PRIOR_KINDS}, got {cfg['kind']!r}")
    weight = float(cfg.get("distance_weight", 0.0 if cfg["kind"] == "beams" else 1.0))
    if cfg["kind"] == "beams" and not 0.0 <= weight <= 1.0:
        raise ValueError(f"data.prior_dose.distance_weight must be in [0, 1], got {weight}")
    cfg["distance_weight"] = weight if cfg["kind"] == "beams" else 1.0
    if cfg["distance_weight"] > 0:
        knots, values = cfg.get("distance_mm"), cfg.get("relative_dose")
        if knots is None or values is None or len(knots) != len(values) or len(knots) < 2:
            raise ValueError("data.prior_dose needs matching distance_mm and relative_dose "
                             "lists (>= 2 knots) for the distance prior")
        if np.any(np.diff(knots) <= 0):
            raise ValueError(f"data.prior_dose.distance_mm must increase, got {list(knots)}")
    sectors = cfg.setdefault("beam_sectors", 0)
    if isinstance(sectors, bool) or not isinstance(sectors, int) or not 0 <= sectors <= 36:
        raise ValueError("data.prior_dose.beam_sectors must be a whole number from 0 to 36, "
                         f"got {sectors!r}")
    if sectors and cfg["kind"] != "beams":
        raise ValueError("data.prior_dose.beam_sectors needs kind=beams (the sectors' "
                         f"fields come from the beam prior), got kind={cfg['kind']!r}")
    if not isinstance(cfg.setdefault("target_floor", False), bool):
        raise ValueError("data.prior_dose.target_floor must be true or false, got "
                         f"{cfg['target_floor']!r}")
    BeamModelParams(**dict(cfg.get("beam_model") or {}))  # unknown beam_model keys fail here
    return cfg


def floor_targets(dose: np.ndarray, masks: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """(Z, Y, X) ``dose`` (a prior or a predicted dose) raised inside each
    target to at least its level (``model.target_dose_floor`` floors a prediction).

    A plan is normalised so that about 95 % of each target gets its prescription (OpenKBP's
    reference plans, 51 PTVs of 20 patients: D95 a median 0.1 Gy above it), while the priors' field edges fall
    off inside the target (the recipe's prior: PTV70 D95 2.3 Gy low), a bias the network
    was measured to correct only half of (experiments/openkbp.md).

    Args:
        dose: (Z, Y, X); ``masks``: (T, Z, Y, X) target masks; ``levels``: (T,) their
            prescriptions (or the floors), in the units of ``dose``.
    """
    out = np.array(dose, np.float32, copy=True)
    for level, mask in zip(levels, np.asarray(masks) > 0):
        np.maximum(out, np.float32(level), out=out, where=mask)
    return out


def stretch_targets(dose: np.ndarray, masks: np.ndarray, levels: Sequence[float],
                    factor: float) -> np.ndarray:
    """(Z, Y, X) ``dose`` (a predicted dose) stretched away from the prescription where it
    lies above it inside the targets: ``Rx + factor * (dose - Rx)``, with ``Rx`` the
    highest level among the targets holding the voxel (``model.target_dose_stretch``).

    A plan's dose inside its targets spreads wider than a network's smooth dose: the boost
    that spills into a lower-level target and the hot spots inside one come out low (the
    recipe, 43 training patients: PTV56 / PTV63 D1 2.0 / 1.8 Gy low; experiments/openkbp.md).
    Dose at or below the prescription is left as it is (the floor handles that side).

    Args:
        dose: (Z, Y, X); ``masks``: (T, Z, Y, X) target masks; ``levels``: (T,) their
            prescriptions, in the units of ``dose``; ``factor``: the stretch (1: none).
    """
    rx = np.zeros(np.shape(dose), np.float32)
    for level, mask in zip(levels, np.asarray(masks) > 0):
        np.maximum(rx, np.float32(level), out=rx, where=mask)
    out = np.array(dose, np.float32, copy=True)
    hot = (rx > 0) & (out > rx)
    out[hot] = rx[hot] + np.float32(factor) * (out[hot] - rx[hot])
    return out


def cap_organs(dose: np.ndarray, masks: np.ndarray, limits: Sequence[float],
               keep: np.ndarray | None = None) -> np.ndarray:
    """(Z, Y, X) ``dose`` (a predicted dose) lowered inside each organ to at most its
    limit (``model.oar_dose_ceiling`` caps a prediction at a fraction of the protocol's
    maximum-dose constraints), except where ``keep`` (Z, Y, X) is set (the targets: a
    target's dose is never lowered).

    A plan meets its organs' hard maximum-dose limits (OpenKBP's reference plans, 56
    training patients: spinal cord D0.1cc at most 46.5 Gy against its 45 Gy limit), while a
    network's smooth dose spills the targets' dose into a nearby organ (the recipe: spinal
    cord D0.1cc 2.9 Gy high on validation; experiments/openkbp.md).

    Args:
        dose: (Z, Y, X); ``masks``: (O, Z, Y, X) organ masks; ``limits``: (O,) their
            ceilings, in the units of ``dose``.
    """
    out = np.array(dose, np.float32, copy=True)
    free = True if keep is None else ~(np.asarray(keep) > 0)
    for limit, mask in zip(limits, np.asarray(masks) > 0):
        np.minimum(out, np.float32(limit), out=out, where=mask & free)
    return out


def scale_organs(dose: np.ndarray, masks: np.ndarray, factors: float | Sequence[float],
                 keep: np.ndarray | None = None) -> np.ndarray:
    """(Z, Y, X) ``dose`` (a predicted dose) times the factor of each organ of ``masks``
    (O, Z, Y, X) inside it (``factors``: one for all, or (O,) one each; a voxel in several
    organs takes the smallest), except where ``keep`` (Z, Y, X) is set (the targets).

    ``model.oar_dose_scale``: a plan's optimiser pushes the dose down inside each organ it
    spares, more sharply than a network's smooth dose follows (the recipe, 43 training
    patients: organ Dmean 0.89 Gy and D0.1cc 0.57 Gy high on average while the error outside
    the targets has median 0; experiments/openkbp.md).
    """
    masks = np.asarray(masks) > 0
    each = np.broadcast_to(np.asarray(factors, np.float32), (len(masks),))
    scale = np.full(np.shape(dose), np.inf, np.float32)
    for factor, mask in zip(each, masks):
        np.minimum(scale, factor, out=scale, where=mask)
    free = np.isfinite(scale) if keep is None else np.isfinite(scale) & ~(np.asarray(keep) > 0)
    out = np.array(dose, np.float32, copy=True)
    np.multiply(out, scale, out=out, where=free)
    return out


class PriorDosed(MapTransform):
    """Add ``prior``: (1 + S, Z, Y, X) float32 prior dose normalised by ``dose_scale_gy``
    (channel 0) and, with ``beam_sectors`` = S > 0, the beam prior's S gantry sectors
    (:func:`~vmatdose.data.beam_prior.beam_prior_channels`), from the sample's ``masks`` (channels in ``structures`` order), ``body`` and
    ``spacing_mm``; the beam prior also reads ``ct`` (HU), ``origin_mm`` and ``beams``
    (the case's ``meta["beams"]`` or ``None``), which it removes from the sample.

    Args:
        prior_dose: the ``data.prior_dose`` config (:func:`check_prior_config`):
            ``kind=distance`` the distance prior; ``kind=beams`` the beam prior
            (:mod:`vmatdose.data.beam_prior`), blended as
            ``(1 - w) * beams + w * distance`` with ``w = distance_weight`` (0 by default);
            ``target_floor=true`` raises the prior inside each target to at least its
            prescription (:func:`floor_targets`); ``beam_sectors`` (``kind=beams``):
            that many more channels, the fields of the beams in each gantry sector.
        default_beams: the protocol's default arrangement (``conf/protocol``, key
            ``beams``) for cases without their own, around the targets' centroid.
    """

    def __init__(self, structures: Sequence[str], prescriptions_gy: Mapping[str, float],
                 dose_scale_gy: float, prior_dose: Mapping,
                 default_beams: Mapping | None = None):
        super().__init__(keys=["masks"])
        cfg = check_prior_config(prior_dose)
        self.kind = cfg["kind"]
        self.distance_weight = cfg["distance_weight"]
        self.target_floor = cfg["target_floor"]
        self.sectors = int(cfg["beam_sectors"])
        self.channels = [i for i, s in enumerate(structures) if s in prescriptions_gy]
        self.levels = [float(prescriptions_gy[structures[i]]) / dose_scale_gy
                       for i in self.channels]
        if self.distance_weight > 0:
            self.distance_mm = np.asarray(cfg["distance_mm"], float)
            self.relative_dose = np.asarray(cfg["relative_dose"], float)
        self.beam_params = BeamModelParams(**dict(cfg.get("beam_model") or {}))
        self.max_beams = int(cfg.get("max_beams", DEFAULT_MAX_BEAMS))
        self.default_beams = dict(default_beams) if default_beams else None
        self._announced = False
        self._said_couch = False

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        origin, beams = out.pop("origin_mm", None), out.pop("beams", None)
        masks = np.asarray(out["masks"])[self.channels]
        body = np.asarray(out["body"])[0]
        spacing = np.asarray(out["spacing_mm"], float)
        prior = np.zeros(body.shape, np.float32)
        sectors = np.zeros((self.sectors, *body.shape), np.float32)
        if self.distance_weight > 0:
            prior += self.distance_weight * prior_dose(
                masks, body, self.levels, spacing, self.distance_mm, self.relative_dose)
        if self.kind == "beams":
            if origin is None:
                raise ValueError("the beam prior needs the case geometry: load cases with "
                                 "LoadCased(with_geometry=True)")
            arrangement = self.arrangement(beams, masks, spacing, origin, out.get("case_id"))
            channels = beam_prior_channels(
                np.asarray(out["ct"])[0], body, masks, self.levels, spacing, origin,
                arrangement, self.beam_params, self.max_beams, self.sectors)
            prior += (1.0 - self.distance_weight) * channels[0]
            sectors = channels[1:]
        if self.target_floor:
            prior = floor_targets(prior, masks, self.levels) * (body > 0)
        out["prior"] = torch.from_numpy(np.concatenate([prior[None], sectors]))
        return out

    def arrangement(self, beams: Mapping | None, masks: np.ndarray, spacing: np.ndarray,
                    origin: np.ndarray, case_id: object) -> BeamArrangement:
        """The case's own beams, else the protocol's default (said once per run)."""
        if beams:
            arrangement = BeamArrangement.from_meta(beams)
            if not arrangement.coplanar and not self._said_couch:
                log.warning("beam prior: case %s has couch angles other than 0; the prior "
                            "traces its beams as coplanar (said once)", case_id)
                self._said_couch = True
            return arrangement
        if not self.default_beams:
            raise ValueError(f"case {case_id}: no beam arrangement (meta['beams']) and no "
                             "protocol default (protocol.beams) for data.prior_dose.kind=beams")
        if not self._announced:
            log.info("beam prior: case %s carries no beam arrangement; cases without one use "
                     "the protocol's default %s around their targets' centroid (said once)",
                     case_id, self.default_beams)
            self._announced = True
        if not masks.any():
            return default_arrangement(self.default_beams, origin)
        return default_arrangement(self.default_beams,
                                   targets_centroid_mm(masks, spacing, origin))


def fit_falloff_profile(case_paths: Sequence[str | Path], prescriptions_gy: Mapping[str, float],
                        knots_mm: Sequence[float] = DEFAULT_KNOTS_MM) -> dict[str, list[float]]:
    """Fit the falloff g from training cases: at each knot distance d, the median over
    possible-dose-mask voxels at distance ~d from the nearest target of dose / that
    target's prescription (the prescription of the target whose ``p * g0(d)`` is largest
    is approximated by the nearest target's).

    Returns:
        ``{"distance_mm": knots, "relative_dose": g(knots)}``, g non-increasing.
    """
    knots = np.asarray(knots_mm, float)
    edges = np.concatenate([[-0.5], (knots[1:] + knots[:-1]) / 2, [knots[-1] + 1e-3]])
    ratios: list[list[np.ndarray]] = [[] for _ in knots]
    for path in case_paths:
        case = load_case(path)
        targets = [t for t in prescriptions_gy if t in case.structures]
        if not targets or case.dose is None:
            continue
        dist = target_distances_mm(np.stack([case.mask(t) for t in targets]),
                                   case.spacing_mm, case.body)
        nearest = dist.argmin(0)
        d = dist.min(0)
        levels = np.asarray([prescriptions_gy[t] for t in targets])[nearest]
        inside = case.body > 0
        bins = np.digitize(d[inside], edges) - 1
        ratio = case.dose[inside] / levels[inside]
        for k in range(len(knots)):
            ratios[k].append(ratio[bins == k])
    g = np.array([np.median(np.concatenate(r)) if r and sum(x.size for x in r) else np.nan
                  for r in ratios])
    if np.isnan(g).all():
        raise ValueError("fit_falloff_profile: no case with a dose and a target")
    g = np.nan_to_num(g, nan=float(np.nanmin(g)))
    g = np.minimum.accumulate(g)  # monotone: dose falls off away from a target
    return {"distance_mm": [float(k) for k in knots],
            "relative_dose": [round(float(v), 4) for v in g]}
