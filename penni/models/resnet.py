"""CIFAR-layout ResNets: ResNet18 (kuangliu layout, 1x1 conv shortcuts) and ResNet56 (option A)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dependency import RuleContext, register_channel_rule


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual join; ``downsample`` is a 1x1 conv + BN, a channel pad, or None."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, pad_before: int, pad_after: int) -> None:
        super().__init__()
        self.pad_before, self.pad_after = pad_before, pad_after

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_before, self.pad_after))


def _pad_shortcut_rule(module: ChannelPadShortcut, ctx: RuleContext) -> list[int] | None:
    """Channels of a pad shortcut: its own zero channels around the (followed) input channels."""
    (x,) = ctx.inputs
    if x is None:
        return None
    return ctx.fresh(module.pad_before, zero=True) + list(x) + ctx.fresh(module.pad_after, zero=True)


def _slice_pad_shortcut(module: ChannelPadShortcut, idx: torch.Tensor) -> None:
    """Keep the zero channels ``idx`` of the ``pad_before + pad_after`` this shortcut creates."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    before = int((idx < module.pad_before).sum())
    module.pad_before, module.pad_after = before, len(idx) - before


register_channel_rule(ChannelPadShortcut, _pad_shortcut_rule, _slice_pad_shortcut)


class CifarResNet(nn.Module):
    """3x3 stem without max-pool, stages of BasicBlocks, global average pool, Linear head."""

    def __init__(self, widths, depths, in_channels: int, num_classes: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, (planes, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                downsample = None
                if stride != 1 or inplanes != planes:
                    if shortcut == "conv":
                        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                    else:
                        extra = planes - inplanes
                        downsample = ChannelPadShortcut(extra // 2, extra - extra // 2)
                blocks.append(BasicBlock(inplanes, planes, stride, downsample))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet18 for 32x32 inputs (the PENNI paper's CIFAR10 ResNet18)."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, num_classes, shortcut="conv")


def resnet56(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet56 (He et al. 2016, CIFAR): 3 stages x 9 blocks, widths 16/32/64, option-A shortcuts."""
    return CifarResNet((16, 32, 64), (9, 9, 9), in_channels, num_classes, shortcut="pad")
