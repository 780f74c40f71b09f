"""Classifiers: a small CNN for 8×8 digits and the CIFAR ResNet-18 (3×3 stem, no max-pool; He et al., 2016).

Each model carries ``target_presets`` (name -> regex over parameter names) for ``--targets`` and Scissorhands'
``trim_only``; ``last`` names the final blocks, as the reference code re-initialises only those.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """conv3×3(16) → conv3×3(32) → max-pool 2 → fc(64) → fc(classes); about 38k parameters on 8×8 inputs."""

    target_presets = {"conv": r"conv\d\..*", "fc": r"fc\d\..*", "last": r"fc\d\..*", "head": r"fc2\..*"}

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 16, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (image_size // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs: 3×3 stride-1 stem, no max-pool, four stages of two basic blocks."""

    target_presets = {"last": r"(layer4\..*|fc\..*)", "head": r"fc\..*", "nonorm": r"(?!.*\.bn\d|.*shortcut\.1).*"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


MODELS = {"small_cnn": SmallCNN, "resnet18": ResNet18}
DEFAULT_MODEL = {"digits": "small_cnn", "cifar10": "resnet18", "cifar100": "resnet18", "svhn": "resnet18"}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if name == "small_cnn":
        return SmallCNN(num_classes, in_channels, image_size)
    return ResNet18(num_classes, in_channels)
