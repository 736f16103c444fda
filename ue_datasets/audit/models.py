"""Classifiers that audits train from scratch on (protected) images.

Every model takes float input ``(B, C, H, W)`` in ``[0, 1]`` (no normalisation is applied, as in the
CUDA evaluation script) and returns logits ``(B, num_classes)``:

- ``small-cnn``: four 3x3 conv-BN-ReLU layers (32, 32, 64, 64 channels, a 2x2 max-pool after each
  pair), global average pooling and one linear layer. The CPU-fast default: about 0.1 M parameters.
- ``resnet18``: the CIFAR-style ResNet-18 of the CUDA and APBench evaluations (3x3 stride-1 stem, no
  max-pool, BasicBlocks ``[2, 2, 2, 2]`` of widths 64-512, global average pooling).
- any other name: a torchvision classifier, ``torchvision.models.get_model(name, weights=None,
  num_classes=num_classes)``, randomly initialised (weights are never downloaded). One-channel input is
  repeated to three channels. ``torchvision/NAME`` forces torchvision's model where a name above
  shadows it (``torchvision/resnet18`` is the ImageNet-style ResNet-18 with a 7x7 stride-2 stem).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from ..errors import UEDatasetsError

#: The built-in models and what they are, for ``--help`` texts.
MODELS: dict[str, str] = {
    "small-cnn": "4 conv-BN-ReLU layers (32-32-64-64) + linear; fast on CPU (default)",
    "resnet18": "CIFAR-style ResNet-18 (3x3 stem, no max-pool), as in the CUDA/APBench evaluations",
}
#: Prefix that selects a torchvision model even where a built-in name shadows it.
TORCHVISION_PREFIX = "torchvision/"


def torchvision_models() -> list[str]:
    """Names of torchvision's image classifiers (``torchvision.models.list_models``), sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every accepted model name: the built-ins first, then torchvision's classifiers."""
    return list(MODELS) + [n for n in torchvision_models() if n not in MODELS]


def models_help() -> str:
    """A short paragraph for a command line's ``--help``."""
    builtins = "; ".join(f"{name}: {text}" for name, text in MODELS.items())
    return (
        f"{builtins}; or any torchvision classifier, randomly initialised (e.g. resnet50, vgg16_bn, "
        f"mobilenet_v3_small, densenet121; '{TORCHVISION_PREFIX}resnet18' is torchvision's ImageNet-style one)"
    )


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool-avgpool-linear, each conv 3x3 + BN + ReLU.

    ``features`` maps ``(B, C, H, W)`` to ``(B, 2 * width)`` (the encoder an SSL attacker trains) and
    ``fc`` maps those features to logits. Any ``H, W >= 4`` works.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width),
            *_conv_bn_relu(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 2 * width
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18/34 (expansion 1), projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, stages of widths 64/128/256/512 (strides
    1/2/2/2) of two BasicBlocks each, global average pooling, linear. 11.2 M parameters at 10 classes.

    ``features`` maps ``(B, C, H, W)`` to ``(B, 512)``; ``fc`` maps those to logits.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        ]
        cin = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
            cin = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = 512
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier behind the audit interface.

    One-channel input ``(B, 1, H, W)`` is repeated to three channels; a model that returns a named tuple
    with ``logits`` (GoogLeNet, Inception v3 in training mode) returns just the logits.
    """

    def __init__(self, model: nn.Module, in_channels: int):
        super().__init__()
        self.model = model
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


def _torchvision_kwargs(name: str, image_size: int) -> dict:
    """Extra builder arguments some torchvision families need at a non-default image size."""
    if name.startswith("vit_"):
        return {"image_size": image_size}
    if name.startswith("maxvit"):
        return {"input_size": (image_size, image_size)}
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, check: bool = True) -> nn.Module:
    """Build a randomly initialised classifier (uses the global torch RNG: seed it first).

    Args:
        name: ``small-cnn``, ``resnet18``, a torchvision classifier name (see `list_models`), or
            ``torchvision/NAME``.
        num_classes: number of logits.
        in_channels: channels of the input images; torchvision models take 1 or 3.
        image_size: side of the (square) input images; some torchvision families (ViT, MaxViT) are
            built for it and every torchvision model is checked against it.
        check: run one ``(1, in_channels, image_size, image_size)`` forward pass through a torchvision
            model (eval mode, no grad) to turn a size mismatch into a clear error.

    Returns:
        The model in training mode, on CPU. Input float ``(B, in_channels, H, W)`` in ``[0, 1]``,
        output float logits ``(B, num_classes)``.

    Raises:
        UEDatasetsError: unknown name, bad sizes, or a torchvision model that cannot take the input.
    """
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UEDatasetsError(f"{label} must be a positive integer, got {value!r}")
    if name == "small-cnn":
        if image_size < 4:
            raise UEDatasetsError(f"small-cnn needs images of at least 4x4 pixels, got {image_size}")
        return SmallCNN(in_channels, num_classes)
    if name == "resnet18":
        return CifarResNet18(in_channels, num_classes)
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    available = torchvision_models()
    if tv_name not in available:
        raise UEDatasetsError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)} (built in), or a torchvision "
            f"classifier: {', '.join(available)}"
        )
    if in_channels not in (1, 3):
        raise UEDatasetsError(f"torchvision model {tv_name!r} takes 1- or 3-channel images, got {in_channels} channels")
    try:
        kwargs = _torchvision_kwargs(tv_name, image_size)
        net = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    except Exception as exc:  # builders reject some settings with ValueError/TypeError/AssertionError
        raise UEDatasetsError(f"cannot build torchvision model {tv_name!r}: {exc}") from exc
    model = TorchvisionClassifier(net, in_channels)
    if check:
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, in_channels, image_size, image_size))
        except Exception as exc:
            raise UEDatasetsError(
                f"torchvision model {tv_name!r} cannot take {image_size}x{image_size} images: {exc}; "
                f"use small-cnn or resnet18, or upsample the images"
            ) from exc
        finally:
            model.train()
        if tuple(out.shape) != (1, num_classes):
            raise UEDatasetsError(f"torchvision model {tv_name!r} returned shape {tuple(out.shape)}, expected (1, {num_classes})")
    return model
