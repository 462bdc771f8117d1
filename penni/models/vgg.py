"""VGG-style networks in the CIFAR layout (3x3 convs with BatchNorm, global pooling, one Linear)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

VGG16_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
FASHION_CNN_CFG: tuple = (16, 16, "M", 32, 32, "M", 64, 64)


class VGG(nn.Module):
    """``features`` (conv/bn/relu named ``conv<stage>_<i>`` as the paper's tables) + a Linear head."""

    def __init__(self, cfg: Sequence, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        stage, index, channels = 1, 1, in_channels
        for item in cfg:
            if item == "M":
                layers[f"pool{stage}"] = nn.MaxPool2d(2)
                stage, index = stage + 1, 1
                continue
            tag = f"{stage}_{index}"
            layers[f"conv{tag}"] = nn.Conv2d(channels, item, 3, padding=1, bias=False)
            layers[f"bn{tag}"] = nn.BatchNorm2d(item)
            layers[f"relu{tag}"] = nn.ReLU(inplace=True)
            channels, index = item, index + 1
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(x.flatten(1))


def vgg16(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """CIFAR-layout VGG16 with BatchNorm (13 convs; 32x32 inputs reach 1x1 before the head)."""
    return VGG(VGG16_CFG, in_channels, num_classes)


def fashion_cnn(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)) -> VGG:
    """A small VGG-style net (3 stages of two 3x3 convs) for the CPU quickstart on Fashion-MNIST."""
    w1, w2, w3 = widths
    return VGG((w1, w1, "M", w2, w2, "M", w3, w3), in_channels, num_classes)
