"""RNGState: a Stateful that captures and restores every global random generator."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from torchkeep.errors import ArgumentTypeError, KeyMismatchError

__all__ = ["RNGState", "set_global_states"]


class RNGState:
    """Python ``random``, NumPy's global RNG, torch's CPU generator and every CUDA device's.

    Put one in the tree you save; pass one as the target when you restore. The state
    is read when the tree is saved (``state_dict()``) and written back on restore.

    Example:
        >>> import torch, torchkeep as tk
        >>> s = tk.RNGState().state_dict()
        >>> a = torch.rand(2)
        >>> tk.RNGState().load_state_dict(s)
        >>> torch.equal(torch.rand(2), a)
        True
    """

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        state: dict[str, Any] = {
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(
                "state",
                state,
                "the dict RNGState.state_dict() returns (restore an RNGState from the entry that saved one)",
            )
        missing = [k for k in ("python", "numpy", "torch") if k not in state]
        if missing:
            raise KeyMismatchError(
                "RNGState",
                missing=missing,
                unexpected=[str(k) for k in state if k not in ("python", "numpy", "torch", "cuda")],
                fix="this state was not written by RNGState.state_dict(); restore the RNGState from the entry "
                "of the checkpoint that saved one",
            )
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda")
        if cuda:
            if not torch.cuda.is_available():
                warnings.warn(
                    "the checkpoint holds CUDA RNG states but CUDA is not available here; they were not restored",
                    stacklevel=2,
                )
            else:
                count = torch.cuda.device_count()
                if len(cuda) != count:
                    warnings.warn(
                        f"the checkpoint holds {len(cuda)} CUDA RNG states, this machine has {count} devices; "
                        f"restoring the first {min(len(cuda), count)}",
                        stacklevel=2,
                    )
                for i, s in enumerate(cuda[:count]):
                    torch.cuda.set_rng_state(s.cpu(), i)

    def __repr__(self) -> str:
        return "RNGState()"


def set_global_states(python: Any, numpy: Any, torch_cpu: torch.Tensor, cuda: Any = None) -> None:
    """Set the global generators from the raw states frameworks pickle (``random.getstate()``,
    ``np.random.get_state()``, ``torch.get_rng_state()``, one CUDA state or a list of them).

    For stock checkpoints of the Hugging Face Trainer and Accelerate, whose RNG files hold these.
    CUDA states are skipped where CUDA is not available.

    Example:
        >>> import random, numpy as np, torch
        >>> saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        >>> a = torch.rand(1); set_global_states(*saved); torch.equal(torch.rand(1), a)
        True
    """
    version, internal, gauss = python
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(numpy)
    torch.set_rng_state(torch_cpu)
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)
