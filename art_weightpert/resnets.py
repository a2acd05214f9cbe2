"""
Residual networks with torchvision's structure (He et al. 2016; ``torchvision.models.resnet``): :class:`BasicBlock`
(two 3x3 convolutions with batch norm, ``out += identity``, a 1x1-conv + batch-norm shortcut when the shape changes)
and :class:`ResNet`. :func:`resnet18_cifar` is torchvision's ``resnet18(num_classes=...)`` module for module and
parameter name for parameter name (its state dict loads into torchvision's and back), here for 3x32x32 inputs;
:func:`digits_resnet` a small one for the 1x8x8 digits. The reference models of the zoo (:mod:`art_weightpert.zoo`);
torch only.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """
    torchvision's ``ResNet`` with :class:`BasicBlock`: a stem, one stage of blocks per width (the first of each stage
    after the first with stride 2), global average pooling and a Linear classifier.

    :param blocks: blocks per stage (ResNet-18: ``(2, 2, 2, 2)``).
    :param widths: channels per stage (ResNet-18: ``(64, 128, 256, 512)``).
    :param num_classes: outputs of the classifier.
    :param in_channels: input channels.
    :param small_stem: ``False``: torchvision's stem (7x7 conv with stride 2, batch norm, ReLU, 3x3 max pooling with
        stride 2 and padding 1); ``True``: a 3x3 conv with stride 1, batch norm and ReLU (small images).
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        small_stem: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for index, (count, width) in enumerate(zip(blocks, widths)):
            setattr(self, f"layer{index + 1}", self._make_layer(width, count, stride=1 if index == 0 else 2))
        self.nb_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        for index in range(self.nb_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18_cifar(num_classes: int = 10, seed: int = 0) -> ResNet:
    """ResNet-18 with exactly torchvision's structure and parameter names (``torchvision.models.resnet18``), for
    3x32x32 inputs (the stem's stride and max pooling leave 8x8 maps for the first stage)."""
    torch.manual_seed(seed)
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def digits_resnet(widths: tuple[int, ...] = (16, 32), seed: int = 0, num_classes: int = 10) -> ResNet:
    """A small ResNet for the 1x8x8 digits: a 3x3 stem, one :class:`BasicBlock` per width (an identity shortcut in
    the first stage, a 1x1-conv + batch-norm shortcut with stride 2 in the next), global average pooling, Linear."""
    torch.manual_seed(seed)
    return ResNet((1,) * len(widths), widths, num_classes, in_channels=1, small_stem=True)
