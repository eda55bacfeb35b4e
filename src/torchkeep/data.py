"""A sampler that checkpoints its place in the epoch, so a resumed run neither repeats nor skips samples.

A ``DataLoader`` with ``shuffle=True`` draws a new permutation each epoch from its
generator; saving that generator (a ``torch.Generator`` leaf in the tree) resumes exactly
at an epoch boundary. To resume *inside* an epoch, the loader must also know how many
samples of the current permutation were already used: :class:`ResumableSampler` keeps
both, and is a Stateful leaf like any other.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> data = list(range(10))
    >>> sampler = ResumableSampler(data, seed=0)
    >>> loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    >>> it = iter(loader); first = next(it)          # 4 samples used
    >>> p = tk.save({"sampler": sampler}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> rest = [b.tolist() for b in it]               # what an uninterrupted run sees next
    >>> resumed = ResumableSampler(data, seed=0)
    >>> _ = tk.restore(p, {"sampler": resumed})
    >>> [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=4, sampler=resumed)] == rest
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch

from torchkeep.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles like ``RandomSampler`` (a permutation per epoch from ``seed + epoch``) and
    remembers how many indices of the current epoch it has handed out.

    Args:
        data_source: the dataset (anything with ``len()``), or its length.
        shuffle: ``False`` walks ``0..n-1`` in order (still resumable).
        seed: the base seed; epoch ``e`` uses ``seed + e``, so runs are reproducible
            without any global RNG state.

    ``state_dict()`` records ``epoch`` and ``position`` (indices already handed out). With
    ``num_workers=0`` that is exactly what the training loop consumed. With worker
    processes the ``DataLoader`` prefetches ahead of the loop; then set
    ``sampler.position = batches_done * batch_size`` just before saving (or save right
    after a fresh ``iter(loader)``), so that prefetched-but-unused samples are not skipped.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        if isinstance(data_source, bool) or not (isinstance(data_source, int) or hasattr(data_source, "__len__")):
            raise ArgumentTypeError("data_source", data_source, "a dataset with len() or its length (an int)")
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        if self.n < 0:
            raise InvalidArgumentError("data_source", data_source, "pass a dataset, or its length as an int >= 0")
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.n:  # the previous epoch was used up: start the next one
            self.epoch += 1
            self.position = 0
        order = self._order()
        while self.position < self.n:
            i = order[self.position]
            self.position += 1
            yield i

    def __len__(self) -> int:
        return self.n - self.position if self.position < self.n else self.n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "shuffle": self.shuffle, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise InvalidArgumentError(
                "state['n']",
                state["n"],
                f"the checkpoint's sampler covered {state['n']} samples, this dataset has {self.n}; "
                "resume on the same dataset, or start a fresh epoch with a new sampler",
            )
        self.shuffle = bool(state["shuffle"])
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __repr__(self) -> str:
        return f"ResumableSampler(n={self.n}, epoch={self.epoch}, position={self.position}, seed={self.seed})"
