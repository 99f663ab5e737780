"""FiLM conditioning of a dose network on the plan's conditioning vector.

Feature-wise linear modulation (Perez et al., AAAI 2018): a small MLP maps the
conditioning vector ``c`` (:mod:`vmatdose.data.conditioning`) to a scale and a shift per
channel of every chosen block, ``h <- h * (1 + gamma(c)) + beta(c)``. The blocks are found
by class name (``ResidualUnit`` for MONAI's UNet, ``ConvBlock`` for AttentionUnet,
``UnetResBlock``/``UnetBasicBlock`` for DynUNet) and modulated by forward hooks, so the
wrapped network's own code and weights are untouched; the heads start at zero, so an
untrained FiLM network computes exactly what the plain one does.

The vector arrives as the last ``D`` constant channels of the input (the one tensor every
predictor passes); :class:`FiLMNet` reads it back as their spatial maximum (zero padding
of sliding windows or of the divisible-by pad cannot lower it: every entry is >= 0) and
feeds the first ``C`` channels to the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vmatdose.data.conditioning import condition_size

CONDITIONINGS = ("none", "film")


class FiLMNet(nn.Module):
    """``net`` with FiLM on the blocks whose class name is in ``blocks``.

    Args:
        net: maps (B, C, Z, Y, X) to the dose (any output structure).
        condition_size: ``D``, the length of the conditioning vector.
        blocks: class names of the modules to modulate (their output channel count is
            found by one forward pass on a zero probe of ``probe_size``^3 voxels).
        hidden: width of the conditioning MLP.
        probe_size: edge of the probe volume (divisible by the network's down-sampling).
    """

    def __init__(self, net: nn.Module, condition_size: int, blocks: Sequence[str],
                 hidden: int = 64, probe_size: int = 16):
        super().__init__()
        if condition_size < 1:
            raise ValueError("FiLM needs a conditioning vector of at least one entry")
        self.net = net
        self.condition_size = int(condition_size)
        targets = [m for m in net.modules() if type(m).__name__ in set(blocks)]
        if not targets:
            found = sorted({type(m).__name__ for m in net.modules()})
            raise ValueError(f"FiLM: no block of {list(blocks)} in {type(net).__name__} "
                             f"(its modules: {found})")
        channels = _output_channels(net, targets, probe_size)
        self.encoder = nn.Sequential(nn.Linear(self.condition_size, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 2 * c) for c in channels)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self._film: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for index, block in enumerate(targets):
            block.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def modulate(module, inputs, output):
            if self._film is None or not torch.is_tensor(output):
                return output
            gamma, beta = self._film[index]
            shape = (*gamma.shape, *([1] * (output.ndim - 2)))
            return output * (1 + gamma.view(shape)) + beta.view(shape)
        return modulate

    def split(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C + D, Z, Y, X) -> (image (B, C, ...), condition (B, D))."""
        d = self.condition_size
        if image.shape[1] <= d:
            raise ValueError(f"FiLM input has {image.shape[1]} channels; expected the image "
                             f"channels plus {d} conditioning channels (is data.conditioning "
                             "set to the model's?)")
        return image[:, :-d], image[:, -d:].amax(dim=(2, 3, 4))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x, condition = self.split(image)
        h = self.encoder(condition.to(x.dtype))
        self._film = [tuple(head(h).chunk(2, dim=1)) for head in self.heads]
        try:
            return self.net(x)
        finally:
            self._film = None


def _output_channels(net: nn.Module, blocks: Sequence[nn.Module], size: int) -> list[int]:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv3d)), None)
    if conv is None:
        raise ValueError(f"FiLM: {type(net).__name__} has no Conv3d to size the probe from")
    seen: dict[int, int] = {}

    def record(index: int):
        def hook(module, inputs, output) -> None:  # returns None: the output stays
            seen.setdefault(index, output.shape[1])
        return hook

    hooks = [b.register_forward_hook(record(k)) for k, b in enumerate(blocks)]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, conv.in_channels, size, size, size))
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    return [seen[k] for k in range(len(blocks))]


def conditioned_network(net: nn.Module, conditioning: str = "none",
                        film: Mapping | None = None) -> nn.Module:
    """``net`` as is (``none``) or wrapped in :class:`FiLMNet` (``film``; ``film`` holds
    ``targets`` and ``constraints`` of the protocol, which size the vector, and the
    :class:`FiLMNet` arguments)."""
    if conditioning == "none":
        return net
    if conditioning != "film":
        raise ValueError(f"model.conditioning must be one of {CONDITIONINGS}, "
                         f"not {conditioning!r}")
    spec = dict(film or {})
    size = condition_size(spec.pop("targets", ()), spec.pop("constraints", ()))
    return FiLMNet(net, size, **spec)
