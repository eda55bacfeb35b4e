"""Legacy ``torch.save`` files: detected by content, read only through ``weights_only=True``."""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import (
    ArgumentTypeError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    UnsafeCheckpointError,
    format_names,
)
from torchkeep.scan import scan

__all__ = ["load_legacy"]


def load_legacy(path: str | os.PathLike[str], *, map_location: Any = "cpu", trust_pickle: bool = False) -> Any:
    """Load a ``torch.save`` file.

    ``weights_only=True`` is always passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    in the environment cannot turn it off. A refused safe load is never retried unsafely:
    only ``trust_pickle=True`` from the caller runs the full unpickler.

    Before ``torch.load`` runs, the file goes through :func:`check_zip` (zip files) and the static
    pickle scan (:func:`torchkeep.scan.scan`): structural tricks (several PROTO opcodes, bytes
    after STOP, a truncated pickle) are refused as corrupt, and a pickle that imports anything
    from the dangerous set (``os.system``, ``builtins.eval``, nested deserializers, ...) is
    refused even with ``trust_pickle=True``.

    Raises:
        UnsafeCheckpointError: the pickle needs more than tensors and plain containers (the
            message names the classes it imports), or imports something dangerous.
        CorruptCheckpointError: the archive is damaged or crafted to exhaust memory.
        DeviceUnavailableError: a storage was saved on a device this machine lacks and
            ``map_location`` keeps it there (e.g. ``None`` for a CUDA file without CUDA).
    """
    if not (
        map_location is None or isinstance(map_location, (str, bytes, torch.device, Mapping)) or callable(map_location)
    ):
        raise ArgumentTypeError(
            "map_location",
            map_location,
            "a device, a string such as 'cpu', a dict such as {'cuda:1': 'cuda:0'} or a callable fn(tensor, saved_device)",
        )
    path = Path(path)
    report = scan(path)
    if report.dangerous and trust_pickle:
        raise _dangerous(path, report.dangerous, trust_pickle)
    if report.issues and not report.dangerous:
        raise CorruptCheckpointError(path, "the pickle is malformed: " + "; ".join(report.issues[:3]))
    requested = map_location
    fn = map_location if _is_tensor_fn(map_location) else None
    saved: dict[int, str] = {}
    if fn is not None:
        # torch calls map_location(storage, location); ours is fn(tensor, saved_device): load on
        # CPU, remember each storage's saved location, and apply fn to the tensors afterwards
        def keep_on_cpu(storage: Any, location: str) -> Any:
            saved[storage.data_ptr()] = location
            return storage

        map_location = keep_on_cpu
    try:
        # a file object, not the path: torch.load routes any path ending in ".safetensors" to
        # safetensors, but detection here is by content (a torch.save zip may have any name)
        with open(path, "rb") as fh:
            if trust_pickle:
                tree = torch.load(fh, map_location=map_location, weights_only=False)
            else:
                tree = torch.load(fh, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise CorruptCheckpointError(path, f"the pickle could not be read ({_first_line(e)})") from None
        if report.dangerous:  # weights_only refused it too; say why nothing will unlock it
            raise _dangerous(path, report.dangerous, trust_pickle) from None
        err = UnsafeCheckpointError(path, _needs(report.unsafe, _first_line(e)))
        err.unsafe_globals = list(report.unsafe)  # type: ignore[attr-defined]
        raise err from None
    except (RuntimeError, EOFError, ValueError) as e:
        device = _missing_device(e)
        if device is not None:
            # torch's error names the device it was placing the storage ON (after map_location, and
            # without its index), not the one it was saved from: find that one
            if fn is None:
                device = _saved_device(path, requested, trust_pickle)
            raise DeviceUnavailableError(path, device, requested, _first_line(e)) from None
        raise CorruptCheckpointError(path, f"torch.load could not read it ({_first_line(e)})") from None
    if fn is not None:
        tree = _apply(tree, lambda t: fn(t, saved.get(t.untyped_storage().data_ptr(), "cpu")))
    return tree


class _Found(Exception):
    """The saved location of the first storage that cannot be placed (ends the probe)."""


def _target(map_location: Any, location: str) -> str:
    """Where ``torch.load`` puts a storage saved at ``location`` for a None/str/device/dict ``map_location``."""
    if map_location is None:
        return location
    if isinstance(map_location, Mapping):
        return str(map_location.get(location, location))
    if isinstance(map_location, bytes):
        return map_location.decode()
    return str(map_location)


def _saved_device(path: Path, map_location: Any, trust_pickle: bool) -> str:
    """The saved device of the first storage that ``map_location`` sends to a device this machine lacks.

    Only called after ``torch.load`` failed so: the file is read again up to that storage, each one
    kept on the CPU, and each target tried with torch's own placement.
    """

    def probe(storage: Any, location: str) -> Any:
        try:
            torch.serialization.default_restore_location(storage, _target(map_location, location))
        except Exception:
            raise _Found(location) from None
        return storage

    try:
        with open(path, "rb") as fh:
            torch.load(fh, map_location=probe, weights_only=not trust_pickle)
    except _Found as found:
        return str(found.args[0])
    except Exception:  # the probe never got that far: say what is known
        pass
    return "an unknown device"


def _needs(unsafe: list[str], torch_reason: str) -> str:  # torch's own reason only when the scan named nothing
    """The refusal reason: every class the pickle imports beyond plain weights, and what to do."""
    if not unsafe:
        return torch_reason
    whole_model = any(".nn.modules." in name or name.endswith("Module") for name in unsafe)
    what = "a whole pickled model (torch.save(model))" if whole_model else "objects beyond plain weights"
    return (
        f"it holds {what} and imports {len(unsafe)} global(s) outside the weights-only allowlist: "
        f"{format_names(unsafe)}. tk.convert(path, 'model.safetensors') turns it into a "
        "safe file once; `torchkeep scan FILE` lists everything it imports"
    )


def _dangerous(path: Path, dangerous: Mapping[str, str], trust_pickle: bool) -> UnsafeCheckpointError:
    """The error for a pickle that imports something only malicious or unsafe files need."""
    shown = [f"{name} ({why})" for name, why in sorted(dangerous.items())[:10]]
    more = f", ... ({len(dangerous) - 10} more)" if len(dangerous) > 10 else ""
    err = UnsafeCheckpointError(path, f"it imports dangerous globals: {', '.join(shown)}{more}")
    err.dangerous = dict(dangerous)  # type: ignore[attr-defined]
    err.unsafe_globals = sorted(dangerous)  # type: ignore[attr-defined]
    even = " even with trust_pickle=True" if trust_pickle else ""
    # the usual "pass trust_pickle=True" advice would be wrong here: nothing unlocks these
    err.args = (
        f"{path}: refused to unpickle{even}: it imports {', '.join(shown)}{more}. "
        "Checkpoints never need these; malicious files do, and trust_pickle=True does not unlock them. "
        "Nothing was executed. "
        "`torchkeep scan FILE` lists everything the file imports; if the file is yours, re-save its state_dict().",
    )
    return err


def _is_tensor_fn(map_location: Any) -> bool:
    return callable(map_location) and not isinstance(map_location, (str, torch.device, Mapping))


def _apply(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor of nested dicts / lists / tuples (each tensor object once)."""
    done: dict[int, torch.Tensor] = {}

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            if id(o) not in done:
                done[id(o)] = fn(o)
            return done[id(o)]
        if isinstance(o, dict):
            out = copy.copy(o)  # keeps the type and attributes such as a state dict's _metadata
            for k, v in o.items():
                out[k] = walk(v)
            return out
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, tuple) and not hasattr(o, "_fields"):
            return tuple(walk(v) for v in o)
        return o

    return walk(obj)


_DEVICE_ERROR = re.compile(r"Attempting to deserialize object on (?:a )?(\w+) device(?: (\d+))?", re.IGNORECASE)


def _missing_device(e: BaseException) -> str | None:
    """The device named by torch's 'cannot deserialize on this device' error, if that is what ``e`` is."""
    m = _DEVICE_ERROR.search(str(e))
    if m is None:
        return None
    kind = m.group(1).lower()
    return f"{kind}:{m.group(2)}" if m.group(2) else kind


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        for marker in ("WeightsUnpickler error:", "Unsupported global"):
            at = line.find(marker)
            if at < 0:
                continue
            line = line[at:]
            # torch sometimes puts the reason on the next line ("WeightsUnpickler error: \n\nUnsupported operand 149")
            if line.endswith(":") and i + 1 < len(lines):
                return f"{line} {lines[i + 1]}"
            return line
    return lines[0] if lines else type(e).__name__
