"""Registered model classes for tests/test_registry.py (also imported alone by a fresh subprocess)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

import torchkeep as tk


@tk.register_model("test-tiny-net")
class TinyNet(nn.Module):
    """An MLP whose config is nested: tuples, lists, dicts and a dtype."""

    def __init__(self, sizes=(4, 8, 3), opts=None, dtype=torch.float32, names=("a", "b")):
        super().__init__()
        opts = opts or {"act": "tanh", "drop": [0.0, {"p": 0.0}]}
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype) for a, b in itertools.pairwise(sizes))
        self.act = getattr(torch, opts["act"])
        self.norm = nn.LayerNorm(sizes[-1], dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.norm(x)


@tk.register_model("test-custom-config")
class CustomConfig(nn.Module):
    """A constructor argument (a callable) that cannot be recorded, described by to_config/from_config."""

    def __init__(self, width: int, activation=torch.relu):
        super().__init__()
        self.width = width
        self.activation = activation
        self.fc = nn.Linear(width, width)

    def to_config(self) -> dict:
        return {"width": self.width, "activation": self.activation.__name__}

    @classmethod
    def from_config(cls, config: dict) -> CustomConfig:
        return cls(config["width"], activation=getattr(torch, config["activation"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.fc(x))


@tk.register_model("test-non-persistent")
class WithNonPersistent(nn.Module):
    """A non-persistent buffer: meta construction would leave it uninitialised, so load_model builds normally."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.register_buffer("scale", torch.full((n,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale
