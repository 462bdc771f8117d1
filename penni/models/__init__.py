"""Model registry: ``build_model(arch, ...)`` records its constructor in the penni recipe.

Importing this package registers ``build_model`` as the factory ``"penni.models:build_model"`` (``import penni``
imports it, so ``penni.load`` always finds it). A torchvision classification model is the arch
``"torchvision.models:<name>"``, the name of its builder in the factory registry; the older spelling
``"torchvision:<name>"`` (in files and configs written before) is still accepted and read as the same arch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..recipe import set_constructor
from ..serialization.factories import TORCHVISION_PREFIX, register_factory, without_downloads
from .resnet import ChannelPadShortcut, CifarResNet, resnet18, resnet56
from .vgg import VGG, fashion_cnn, vgg16

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet56": resnet56,
    "fashion_cnn": fashion_cnn,
}

TORCHVISION_ARCH = TORCHVISION_PREFIX + ":"    # the one spelling: "torchvision.models:resnet50"
LEGACY_TORCHVISION_ARCH = "torchvision:"        # accepted, read as TORCHVISION_ARCH


def normalize_arch(arch: str) -> str:
    """``arch`` in its one spelling: ``"torchvision:<name>"`` becomes ``"torchvision.models:<name>"``."""
    if arch.startswith(LEGACY_TORCHVISION_ARCH):
        return TORCHVISION_ARCH + arch[len(LEGACY_TORCHVISION_ARCH):]
    return arch


def _torchvision_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model {name!r}: {err}") from err
    if in_channels != 3:
        stem = getattr(model, "conv1", None)
        if not isinstance(stem, nn.Conv2d):
            raise ValueError(f"cannot change the input channels of {TORCHVISION_ARCH}{name} (no conv1 stem)")
        model.conv1 = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride,
                                stem.padding, bias=stem.bias is not None)
    return model


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build ``arch`` ("vgg16", "resnet18", "resnet56", "fashion_cnn" or "torchvision.models:<name>"; the old
    "torchvision:<name>" is accepted and recorded as "torchvision.models:<name>")."""
    arch = normalize_arch(arch)
    if arch.startswith(TORCHVISION_ARCH):
        model = _torchvision_model(arch[len(TORCHVISION_ARCH):], in_channels, num_classes, **kwargs)
    elif arch in ARCHITECTURES:
        model = ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes, **kwargs)
    else:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown model arch {arch!r}: use one of {known} or '{TORCHVISION_ARCH}<name>'")
    return set_constructor(model, BUILD_MODEL_FACTORY, arch=arch, num_classes=num_classes,
                           in_channels=in_channels, **kwargs)


BUILD_MODEL_FACTORY = "penni.models:build_model"   # the name every penni checkpoint's recipe uses
register_factory(BUILD_MODEL_FACTORY, without_downloads(build_model, BUILD_MODEL_FACTORY))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a state dict (safetensors, or a torch file read with ``weights_only=True``) into ``model``.

    torchvision's published weight files (``resnet50-0676ba61.pth``) load this way without
    unpickling code; a wrapper dict with a ``state_dict``/``model`` key is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError and friends
            raise ValueError(f"{path} is not a plain weights file (refused to unpickle code): {err}") from err
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
    return model


__all__ = ["ARCHITECTURES", "TORCHVISION_ARCH", "build_model", "normalize_arch", "load_weights", "vgg16", "resnet18",
           "resnet56", "fashion_cnn", "VGG", "CifarResNet", "ChannelPadShortcut"]
