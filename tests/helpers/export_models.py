"""Small models for the export and quantize tests (registered, so the CLI can rebuild them from a file)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

import torchkeep as tk


@tk.register_model("test-export-mlp")
class MLP(nn.Module):
    def __init__(self, sizes=(8, 16, 4)):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@tk.register_model("test-export-cnn")
class SmallCNN(nn.Module):
    """BatchNorm and Dropout: exported in training mode it would compute something else."""

    def __init__(self, channels: int = 4, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(x))


class TwoInputs(nn.Module):
    """Two positional inputs, an optional keyword input, and a dict output holding a tuple."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> dict:
        h = self.a(x) + self.b(y)
        if scale is not None:
            h = h * scale
        return {"logits": h, "aux": (torch.tanh(h), h.sum(-1))}


def transformer_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)


class SignBranch(nn.Module):
    """A Python branch on a tensor value: tracing freezes whichever side the example took."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x) * 2
        return -self.fc(x)


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that train-vs-eval semantics would show in the outputs."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.train()


@tk.register_model("test-export-tiny-lm")
class TinyLM(nn.Module):
    """Token ids in, logits out, with a causal running mean over the sequence: its sequence length is not fixed."""

    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype).unsqueeze(-1)
        return self.head(h.cumsum(1) / steps)
