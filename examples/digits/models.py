"""The digits models: a CNN teacher (~2.5M parameters, served in the cloud) and an MLP student
(~2.4k parameters, run on the device). Both take the flat 64-pixel input the manifest declares
(``input`` FP32 [batch, 64], values in [0, 1]) and return 10 logits."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and a wide fully connected layer: accurate, and big on purpose so that
    the int8 cloud variant and the edge student have something to win against."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 4 * 4, 512),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(512, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input is flat so edge and cloud share one signature; the image shape is internal.
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


class DigitsMLP(nn.Module):
    """One hidden layer: small enough for any device."""

    def __init__(self, hidden: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
