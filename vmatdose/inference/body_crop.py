"""The box of the body a network sees (``model.body_crop_margin``).

The loss is taken inside the body and the dose outside it is zeroed (OpenKBP: the
possible-dose mask), yet a whole-volume network computes every voxel of the grid: on the
OpenKBP half-resolution grid the body's bounding box is a fifth of the volume on average.
With a crop margin the network sees only the box holding the body, grown by the margin on
every side and rounded up to its size multiple (more real context, centred, kept inside
the grid), in training, validation and inference alike, so what the network learns and
what it is asked are the same kind of volume. Doses are normalised; boxes are on the
network's grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: (z, y, x) slices of a box on a (Z, Y, X) grid
Box = tuple[slice, slice, slice]


def body_box(body: torch.Tensor, margin: int, multiple: int) -> Box | None:
    """The box holding every body voxel of ``body`` (B, 1, Z, Y, X) of the whole batch,
    grown by ``margin`` voxels on each side, its size rounded up to a multiple of
    ``multiple`` (the extra split evenly) and shifted to lie inside the grid; an axis whose
    rounded size exceeds the grid keeps the whole grid. ``None`` for an empty body or a box
    that is the whole grid."""
    inside = (body > 0).flatten(0, 1).any(0)  # (Z, Y, X)
    if not bool(inside.any()):
        return None
    box = []
    for axis, n in enumerate(inside.shape):
        others = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(inside.any(dim=others)).flatten()
        lo, hi = int(hit[0]) - margin, int(hit[-1]) + 1 + margin
        size = -(-(hi - lo) // multiple) * multiple
        if size >= n:
            box.append(slice(0, n))
            continue
        start = min(max(lo - (size - (hi - lo)) // 2, 0), n - size)
        box.append(slice(start, start + size))
    if all(s.start == 0 and s.stop == n for s, n in zip(box, inside.shape)):
        return None
    return tuple(box)


def crop(volume: torch.Tensor, box: Box) -> torch.Tensor:
    """``volume`` (B, C, Z, Y, X) cut to ``box``, contiguous in the memory format it had
    (a channels-last batch stays channels-last)."""
    channels_last = (volume.is_contiguous(memory_format=torch.channels_last_3d)
                     and not volume.is_contiguous())
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return volume[(slice(None), slice(None), *box)].contiguous(memory_format=fmt)


def crop_batch(batch: dict, box: Box) -> dict:
    """A copy of ``batch`` with every (B, C, Z, Y, X) tensor on the grid of its ``image``
    cut to ``box`` (the rest as is)."""
    grid = tuple(batch["image"].shape[2:])
    return {key: crop(value, box)
            if isinstance(value, torch.Tensor) and value.dim() == 5
            and tuple(value.shape[2:]) == grid else value
            for key, value in batch.items()}


def place(volume: torch.Tensor, box: Box, grid: Sequence[int]) -> torch.Tensor:
    """``volume`` (B, C, z, y, x) put back at ``box`` into zeros of the (Z, Y, X) ``grid``."""
    out = volume.new_zeros((*volume.shape[:2], *grid))
    out[(slice(None), slice(None), *box)] = volume
    return out
