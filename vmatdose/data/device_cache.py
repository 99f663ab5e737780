"""The whole training set held on the training device, batched and augmented there.

``data.device_cache=true``: the cached (compact) samples of the training split are
stacked once into one tensor per key on the device; every epoch draws a permutation and
yields batches with left/right (paired channels swapped), anterior/posterior and
superior/inferior flips, rotations about z and CT intensity shifts, and random or
dose-centred patches (and, for cases pooled on several grids, ``data.augment.pool_grids``,
one grid drawn per case), all done with tensor operations on the device, so no loader worker,
collation or host-to-device copy runs per step. The augmentation keys and their meaning
are the ordinary loader's (:class:`~vmatdose.data.pipeline.SamplingSettings`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch.nn import functional as F

from vmatdose.data.input_spec import lr_permutation
from vmatdose.data.pipeline import SMOOTH_KEYS

VOLUME_KEYS = ("ct", "masks", "body", "sdf", "prior", "dose")


def rotation_problem(augment: Mapping | None, patch_size: Sequence[int] | None) -> str | None:
    """Why the device cache cannot rotate as ``augment`` asks (``None``: it can). It turns
    whole volumes only: a patch turned after its cut would fill its corners with its own
    border (the ordinary loader turns the volume, then cuts)."""
    augment = dict(augment or {})
    if patch_size and augment.get("rotate_deg", 0) > 0 and augment.get("rotate_prob", 0) > 0:
        return (f"data.augment.rotate_prob={augment['rotate_prob']} with data.patch_size="
                f"{list(patch_size)}: the device cache rotates whole volumes only; set "
                "data.device_cache=false (the loader rotates, then cuts patches) or "
                "rotate_prob to 0")
    return None


def pool_grids_problem(augment: Mapping | None, resolution_factor: int,
                       device_cache: bool) -> str | None:
    """Why ``augment["pool_grids"]`` cannot be done (``None``: it can): the cases are pooled
    on several grids only for the device cache, and only when they are pooled at all."""
    grids = dict(augment or {}).get("pool_grids", 1)
    factor = int(resolution_factor)
    if not isinstance(grids, int) or isinstance(grids, bool) or not 1 <= grids <= factor ** 3:
        return (f"data.augment.pool_grids={grids}: must be an integer from 1 to "
                f"data.resolution_factor^3 = {factor ** 3} (the grids pooling by "
                f"{factor} can start on)")
    if grids > 1 and not device_cache:
        return (f"data.augment.pool_grids={grids} needs data.device_cache=true (the "
                "device cache holds every case on its grids; the loader pools one)")
    return None


class DeviceBatches:
    """An iterable of training batches over samples stacked on ``device``.

    Args:
        samples: ``count`` samples (``len(samples)`` when not given): dicts of
            (C, Z, Y, X) tensors of one shape per key, or (G, C, Z, Y, X) for cases pooled
            on G grids (each batch draws one per case), plus ``spacing_mm``,
            ``dose_scale_gy``, ``case_id``; read once, each written into tensors allocated
            for all of them, so the stack is the only copy kept.
        batch_size: cases per batch (the last incomplete batch is dropped).
        structures, lr_pairs: mask channel names and the pairs a left/right flip swaps.
        augment: ``flip_lr``, ``flip_ap``, ``flip_si`` probabilities; ``rotate_deg`` and
            ``rotate_prob`` (a rotation about z by an angle uniform in +-rotate_deg, about
            the grid's centre, in patient mm; whole volumes only); ``intensity_shift`` and ``intensity_prob``
            (an offset uniform in +-intensity_shift added to the windowed CT).
        patch_size: (Z, Y, X) random patch, or ``None`` for whole volumes.
        dose_patch_fraction: fraction of patches centred on voxels with normalised dose
            >= ``dose_patch_threshold`` (0 for uniform patches).
        seed: seed of the generator of permutations, flips and patch positions.
        prior_permutation: ``prior`` channel order after a left/right flip (its gantry
            sectors); ``None`` keeps the order.
    """

    def __init__(self, samples: Iterable[Mapping], batch_size: int, device: torch.device | str,
                 structures: Sequence[str], lr_pairs: Sequence[Sequence[str]] = (),
                 augment: Mapping | None = None, patch_size: Sequence[int] | None = None,
                 dose_patch_fraction: float = 0.0, dose_patch_threshold: float = 0.1,
                 seed: int = 0, prior_permutation: Sequence[int] | None = None,
                 count: int | None = None):
        problem = rotation_problem(augment, patch_size)
        if problem:
            raise ValueError(problem)
        self.device = torch.device(device)
        count = len(samples) if count is None else int(count)
        if count < 1:
            raise ValueError("device cache: no training samples")
        # (N, G, C, Z, Y, X): G pooling grids per case (1 for plain samples)
        self.volumes, spacing, scale, self.case_ids = _stack(samples, count, self.device)
        self.keys = list(self.volumes)
        self.grids = self.volumes["ct"].shape[1]
        self.spacing, self.scale = torch.stack(spacing), torch.tensor(scale)
        self.batch_size = min(int(batch_size), count)
        self.permutation = torch.tensor(lr_permutation(structures, lr_pairs), device=self.device)
        self.prior_permutation = (torch.tensor(list(prior_permutation), device=self.device)
                                  if prior_permutation else None)
        self.augment = dict(augment or {})
        self.patch_size = list(patch_size) if patch_size else None
        self.dose_patch_fraction = float(dose_patch_fraction)
        self.dose_patch_threshold = float(dose_patch_threshold)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.case_ids) // self.batch_size

    def nbytes(self) -> int:
        """Bytes the stacked volumes take on the device."""
        return sum(v.numel() * v.element_size() for v in self.volumes.values())

    def __iter__(self) -> Iterator[dict]:
        order = torch.randperm(len(self.case_ids), generator=self.generator)
        for b in range(len(self)):
            yield self.batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def _coin(self, p: float, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < p

    def batch(self, index: torch.Tensor) -> dict:
        """The augmented batch of the cases at ``index`` (B,) (CPU long tensor)."""
        n = len(index)
        # drawn only for several grids, so one grid keeps the generator's earlier stream
        grid = (torch.randint(self.grids, (n,), generator=self.generator) if self.grids > 1
                else torch.zeros(n, dtype=torch.long))
        flips = {axis: self._coin(self.augment.get(name, 0.0), n) for name, axis in
                 (("flip_lr", -1), ("flip_ap", -2), ("flip_si", -3))}
        corners = self._corners(index)
        out: dict = {}
        for key in self.keys:
            cases = []
            for i, case in enumerate(index.tolist()):
                volume = self.volumes[key][case, int(grid[i])]
                if corners is not None:
                    volume = volume[(slice(None), *(slice(c, c + s) for c, s in
                                                    zip(corners[i], self.patch_size)))]
                dims = [axis for axis, flip in flips.items() if flip[i]]
                if dims:
                    volume = torch.flip(volume, dims)
                if flips[-1][i] and key in ("masks", "sdf"):
                    volume = volume[self.permutation]
                elif flips[-1][i] and key == "prior" and self.prior_permutation is not None:
                    volume = volume[self.prior_permutation]
                cases.append(volume)
            out[key] = torch.stack(cases)
        self._rotate(out, index)
        self._shift_intensity(out)
        out.update(spacing_mm=self.spacing[index], dose_scale_gy=self.scale[index],
                   case_id=[self.case_ids[i] for i in index.tolist()])
        return out

    def _draw(self, prob_key: str, size_key: str, n: int) -> torch.Tensor | None:
        """(n,) values uniform in +-``augment[size_key]``, 0 where the coin of probability
        ``augment[prob_key]`` fails; ``None`` (nothing drawn) when either is 0."""
        size, prob = float(self.augment.get(size_key, 0.0)), float(self.augment.get(prob_key, 0.0))
        if size <= 0 or prob <= 0:
            return None
        values = (2 * torch.rand(n, generator=self.generator) - 1) * size
        return torch.where(self._coin(prob, n), values, torch.zeros_like(values))

    def _rotate(self, out: dict, index: torch.Tensor) -> None:
        """Rotate every volume of the cases whose coin came up about z, in place."""
        degrees = self._draw("rotate_prob", "rotate_deg", len(index))
        if degrees is None or not degrees.any():
            return
        spacing = self.spacing[index]
        for key in self.keys:
            mode = "bilinear" if key in SMOOTH_KEYS else "nearest"
            out[key] = rotate_about_z(out[key], torch.deg2rad(degrees), spacing, mode)

    def _shift_intensity(self, out: dict) -> None:
        """Add each case's drawn offset to its windowed CT."""
        offsets = self._draw("intensity_prob", "intensity_shift", out["ct"].shape[0])
        if offsets is not None and offsets.any():
            out["ct"] = (out["ct"].float() + offsets.to(out["ct"].device).view(-1, 1, 1, 1, 1)
                         ).to(out["ct"].dtype)

    def _corners(self, index: torch.Tensor) -> list[list[int]] | None:
        """Patch start (z, y, x) per case: dose-centred with probability
        ``dose_patch_fraction`` (when the case has dose above the threshold), else
        uniform; ``None`` for whole volumes."""
        if self.patch_size is None:
            return None
        grid = self.volumes["ct"].shape[-3:]
        if any(p > g for p, g in zip(self.patch_size, grid)):
            raise ValueError(f"patch {self.patch_size} larger than the cached grid {tuple(grid)}")
        corners = []
        for case in index.tolist():
            start = [int(torch.randint(g - p + 1, (1,), generator=self.generator))
                     for g, p in zip(grid, self.patch_size)]
            if "dose" in self.volumes and self._coin(self.dose_patch_fraction, 1)[0]:
                # on the first grid: the patch is cut from whichever grid the case drew
                hot = torch.nonzero(self.volumes["dose"][case, 0, 0] >=
                                    self.dose_patch_threshold)
                if len(hot):
                    centre = hot[int(torch.randint(len(hot), (1,), generator=self.generator))]
                    start = [min(max(int(c) - p // 2, 0), g - p)
                             for c, p, g in zip(centre.tolist(), self.patch_size, grid)]
            corners.append(start)
        return corners


def _stack(samples: Iterable[Mapping], count: int, device: torch.device
           ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[float], list[str]]:
    """The volumes of ``count`` samples stacked to (N, G, C, Z, Y, X) on ``device``, each
    written into its place as it comes; their spacings, dose scales and case ids."""
    volumes: dict[str, torch.Tensor] = {}
    spacing, scale, case_ids = [], [], []
    for i, sample in enumerate(samples):
        if i == count:
            raise ValueError(f"device cache: more than the {count} samples announced")
        if not volumes:
            volumes = {k: torch.empty((count, *_with_grids(sample[k]).shape),
                                      dtype=torch.as_tensor(sample[k]).dtype, device=device)
                       for k in VOLUME_KEYS if k in sample}
        for key, stack in volumes.items():
            volume = _with_grids(sample[key])
            if volume.shape != stack.shape[1:]:
                raise ValueError(
                    f"device cache needs one grid shape for every case, got {key} "
                    f"{tuple(volume.shape)} in {sample['case_id']} and "
                    f"{tuple(stack.shape[1:])} in {case_ids[0]} (pad the cases or use "
                    "data.device_cache=false)")
            stack[i] = volume
        spacing.append(torch.as_tensor(sample["spacing_mm"]))
        scale.append(float(sample["dose_scale_gy"]))
        case_ids.append(sample["case_id"])
    if len(case_ids) != count:
        raise ValueError(f"device cache: {len(case_ids)} samples, {count} announced")
    return volumes, spacing, scale, case_ids


def _with_grids(volume) -> torch.Tensor:
    """A sample's volume as (G, C, Z, Y, X): (C, Z, Y, X) gets G = 1."""
    volume = torch.as_tensor(volume)
    return volume[None] if volume.ndim == 4 else volume


def rotate_about_z(volumes: torch.Tensor, angles: torch.Tensor, spacing_mm: torch.Tensor,
                   mode: str = "bilinear") -> torch.Tensor:
    """Each case of ``volumes`` (B, C, Z, Y, X) rotated in its axial plane about the grid's
    centre by ``angles`` (B,) radians (0: left as it is), in patient mm (``spacing_mm``
    (B, 3), z y x, so a non-square grid or pixel is rotated without shear; the ordinary
    loader's MONAI rotation turns voxel indices, the same where pixels are square); values
    from outside the grid are those of its border, as there. Same dtype as ``volumes``
    (interpolated in float32)."""
    moved = angles != 0
    if not moved.any():
        return volumes
    on_device = moved.to(volumes.device)
    x = volumes[on_device].float()
    height = x.shape[-2] * spacing_mm[moved.to(spacing_mm.device), 1].to(x)  # extent, mm
    width = x.shape[-1] * spacing_mm[moved.to(spacing_mm.device), 2].to(x)
    turn = angles[moved].to(x)
    cos, sin = torch.cos(turn), torch.sin(turn)
    theta = torch.zeros(len(x), 3, 4, dtype=x.dtype, device=x.device)
    # affine_grid's coordinates run -1..1 across each axis, (x, y, z) order: the rotation
    # in mm, conjugated by each axis' half extent
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    theta[:, 2, 2] = 1.0
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    rotated = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    result = volumes.clone()
    result[on_device] = rotated.to(volumes.dtype)
    return result
