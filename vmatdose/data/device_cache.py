"""The whole training set held on the training device, batched and augmented there.

``data.device_cache=true``: the cached (compact) samples of the training split are
stacked once into one tensor per key on the device; every epoch draws a permutation and
yields batches with left/right (paired channels swapped), anterior/posterior and
superior/inferior flips and random or dose-centred patches done with tensor indexing on
the device, so no loader worker, collation or host-to-device copy runs per step.
Rotations and intensity shifts are not done here (use the ordinary loader for them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from vmatdose.data.input_spec import lr_permutation

VOLUME_KEYS = ("ct", "masks", "body", "sdf", "prior", "dose")


class DeviceBatches:
    """An iterable of training batches over samples stacked on ``device``.

    Args:
        samples: cached samples (dicts of (C, Z, Y, X) tensors of one shape per key, plus
            ``spacing_mm``, ``dose_scale_gy``, ``case_id``).
        batch_size: cases per batch (the last incomplete batch is dropped).
        structures, lr_pairs: mask channel names and the pairs a left/right flip swaps.
        augment: ``flip_lr``, ``flip_ap``, ``flip_si`` probabilities.
        patch_size: (Z, Y, X) random patch, or ``None`` for whole volumes.
        dose_patch_fraction: fraction of patches centred on voxels with normalised dose
            >= ``dose_patch_threshold`` (0 for uniform patches).
        seed: seed of the generator of permutations, flips and patch positions.
        prior_permutation: ``prior`` channel order after a left/right flip (its gantry
            sectors); ``None`` keeps the order.
    """

    def __init__(self, samples: Sequence[Mapping], batch_size: int, device: torch.device | str,
                 structures: Sequence[str], lr_pairs: Sequence[Sequence[str]] = (),
                 augment: Mapping | None = None, patch_size: Sequence[int] | None = None,
                 dose_patch_fraction: float = 0.0, dose_patch_threshold: float = 0.1,
                 seed: int = 0, prior_permutation: Sequence[int] | None = None):
        if not samples:
            raise ValueError("device cache: no training samples")
        self.device = torch.device(device)
        self.keys = [k for k in VOLUME_KEYS if k in samples[0]]
        shapes = {tuple(s["ct"].shape[1:]) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"device cache needs one grid shape for every case, got {shapes}"
                             " (pad the cases or use data.device_cache=false)")
        self.volumes = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(self.device)
                        for k in self.keys}
        self.spacing = torch.stack([torch.as_tensor(s["spacing_mm"]) for s in samples])
        self.scale = torch.tensor([float(s["dose_scale_gy"]) for s in samples])
        self.case_ids = [s["case_id"] for s in samples]
        self.batch_size = min(int(batch_size), len(samples))
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
        flips = {axis: self._coin(self.augment.get(name, 0.0), n) for name, axis in
                 (("flip_lr", -1), ("flip_ap", -2), ("flip_si", -3))}
        corners = self._corners(index)
        out: dict = {}
        for key in self.keys:
            cases = []
            for i, case in enumerate(index.tolist()):
                volume = self.volumes[key][case]
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
        out.update(spacing_mm=self.spacing[index], dose_scale_gy=self.scale[index],
                   case_id=[self.case_ids[i] for i in index.tolist()])
        return out

    def _corners(self, index: torch.Tensor) -> list[list[int]] | None:
        """Patch start (z, y, x) per case: dose-centred with probability
        ``dose_patch_fraction`` (when the case has dose above the threshold), else
        uniform; ``None`` for whole volumes."""
        if self.patch_size is None:
            return None
        grid = self.volumes["ct"].shape[2:]
        if any(p > g for p, g in zip(self.patch_size, grid)):
            raise ValueError(f"patch {self.patch_size} larger than the cached grid {tuple(grid)}")
        corners = []
        for case in index.tolist():
            start = [int(torch.randint(g - p + 1, (1,), generator=self.generator))
                     for g, p in zip(grid, self.patch_size)]
            if "dose" in self.volumes and self._coin(self.dose_patch_fraction, 1)[0]:
                hot = torch.nonzero(self.volumes["dose"][case, 0] >= self.dose_patch_threshold)
                if len(hot):
                    centre = hot[int(torch.randint(len(hot), (1,), generator=self.generator))]
                    start = [min(max(int(c) - p // 2, 0), g - p)
                             for c, p, g in zip(centre.tolist(), self.patch_size, grid)]
            corners.append(start)
        return corners
