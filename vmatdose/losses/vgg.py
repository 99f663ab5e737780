"""VGG16 convolutional feature stack, layer for layer as torchvision builds it.

torchvision is deliberately not a dependency: its PyPI wheels are built against one exact
torch release and fail to import beside other torch builds (this project's CPU torch among
them). The feature stack is a plain ``nn.Sequential`` of 3x3 convolutions, ReLUs and 2x2
max-pools, so it is rebuilt here with torchvision's exact indices: the keys
``features.<i>.weight`` / ``features.<i>.bias`` of a torchvision ``vgg16`` state_dict (e.g.
``vgg16-397923af.pth``) load into it unchanged. Nothing is ever downloaded.

Checked against the kept libraries (MONAI 1.6.1, 2026-12): MONAI's
``monai.losses.PerceptualLoss`` offers VGG only through the ``lpips`` package (not
installed, and it fetches its own weights) and its other networks through ``torch.hub``
downloads (MedicalNet, RadImageNet) or torchvision (ResNet50); no installed package ships a
VGG16 that loads weights from a local path without torchvision. So the stack stays here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

#: torchvision's configuration "D" (VGG16): output channels of each 3x3 conv, "M" = max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                        512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_layer_names() -> list[str]:
    """Name of every ``features`` index: conv1_1, relu1_1, conv1_2, relu1_2, pool1, ..."""
    names, block, conv = [], 1, 1
    for entry in VGG16_LAYOUT:
        if entry == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


def build_vgg16_features(n_layers: int) -> nn.Sequential:
    """The first ``n_layers`` modules of torchvision's ``vgg16().features``."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            # torchvision uses ReLU(inplace=True); out-of-place keeps tapped features intact.
            layers += [nn.Conv2d(in_channels, int(entry), kernel_size=3, padding=1),
                       nn.ReLU()]
            in_channels = int(entry)
    return nn.Sequential(*layers[:n_layers])


def load_vgg16_features_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision VGG16 state_dict file.

    Accepts a full ``vgg16`` state_dict (classifier keys are dropped) or a features-only one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VGG16 weights file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping), got {type(state).__name__}")
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{path}: no 'features.*' keys; is this a torchvision vgg16 "
                         f"state_dict? First keys: {list(state)[:5]}")
    return features


class VGG16Features(nn.Module):
    """Frozen VGG16 feature extractor returning the activations of named layers.

    Args:
        layers: names from :func:`vgg16_layer_names`, e.g. ``["relu1_2", "relu2_2",
            "relu3_3"]``; the stack is truncated after the deepest one.
    """

    def __init__(self, layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3")):
        super().__init__()
        names = vgg16_layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown or not layers:
            raise ValueError(f"unknown VGG16 layers {unknown or list(layers)}; choose from "
                             f"{names}")
        self.taps = sorted(names.index(name) for name in layers)
        self.features = build_vgg16_features(self.taps[-1] + 1)
        self.requires_grad_(False)

    def load_torchvision_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load ``features.*`` tensors (strict for the layers this truncated stack has)."""
        kept = {k.removeprefix("features."): v for k, v in state.items()
                if k.startswith("features.") and int(k.split(".")[1]) < len(self.features)}
        self.features.load_state_dict(kept, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) ImageNet-normalised images -> activations of the tapped layers."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out
