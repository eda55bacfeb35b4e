"""Legacy ``torch.save`` files: detected by content, read only through ``weights_only=True``."""

from __future__ import annotations

import copy
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, DeviceUnavailableError, UnsafeCheckpointError, format_names
from torchkeep.format.header import MAX_HEADER_SIZE

__all__ = ["MAX_ZIP_ENTRIES", "check_zip", "is_legacy", "load_legacy"]

_ZIP_MAGIC = b"PK\x03\x04"

#: More entries than this is not a checkpoint (torch.save writes about two per tensor).
MAX_ZIP_ENTRIES = 1_000_000
#: Stored (uncompressed) entries cannot hold more bytes than the file has; this covers rounding only.
_ZIP_SLACK = 4096
#: The smallest central directory record: 46 bytes plus the name.
_CENTRAL_RECORD = 46
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def is_legacy(head: bytes) -> bool:
    """True when the first 8 bytes are a ``torch.save`` zip archive or a raw pickle (torch < 1.6).

    A safetensors file also may start with ``0x80``: its first 8 bytes are the header length,
    and 1 in 256 lengths has ``0x80`` as low byte. So a raw pickle (``0x80``, protocol 2-5) only
    counts when those 8 bytes, read as a header length, exceed any header a reader accepts;
    a pickle's next opcodes make that number huge (torch's own magic number gives ~5e18).
    """
    if head.startswith(_ZIP_MAGIC):
        return True
    return (
        len(head) >= 8
        and head[0] == 0x80
        and 2 <= head[1] <= 5
        and int.from_bytes(head[:8], "little") > MAX_HEADER_SIZE
    )


def check_zip(path: str | os.PathLike[str]) -> None:
    """Refuse a zip archive that could make a reader allocate more than the file holds.

    Reads the central directory and each entry's 30-byte local header only; nothing is
    decompressed. ``torch.save`` writes stored (uncompressed) entries, so every entry must be
    stored, lie inside the file, and all entries together cannot claim more bytes than the file
    has (overlapping entries, the classic zip bomb). Called before any ``torch.load`` of a zip.

    Raises:
        CorruptCheckpointError: naming the file and the first problem found.

    Example:
        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save({"w": torch.ones(2)}, p)
        >>> check_zip(p)  # a real torch.save file passes
    """
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        try:
            end = zipfile._EndRecData(fh)  # type: ignore[attr-defined]  # reads only the file's tail
        except (OSError, struct.error, ValueError):
            end = None
        if not end:
            raise CorruptCheckpointError(path, "not a zip archive (no end-of-central-directory record)")
        count, cd_size = int(end[4]), int(end[5])
        if count > MAX_ZIP_ENTRIES or count * _CENTRAL_RECORD > size or cd_size > size:
            raise CorruptCheckpointError(
                path,
                f"the zip directory claims {count:,} entries in {cd_size:,} bytes, more than a {size:,}-byte file holds",
            )
        try:
            with zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error) as e:
            raise CorruptCheckpointError(path, f"not a readable zip archive ({_first_line(e)})") from None
        if len(infos) > MAX_ZIP_ENTRIES:
            raise CorruptCheckpointError(path, f"{len(infos):,} zip entries, more than {MAX_ZIP_ENTRIES:,}")
        seen: set[str] = set()
        total = 0
        for info in infos:
            name = info.filename
            if name in seen:
                raise CorruptCheckpointError(path, f"zip entry {name!r} appears twice")
            seen.add(name)
            if info.flag_bits & 0x1:
                raise CorruptCheckpointError(path, f"zip entry {name!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CorruptCheckpointError(
                    path,
                    f"zip entry {name!r} is compressed (method {info.compress_type}); torch.save stores entries uncompressed",
                )
            if info.compress_size != info.file_size:
                raise CorruptCheckpointError(
                    path, f"zip entry {name!r} is stored but claims {info.file_size:,} bytes in {info.compress_size:,}"
                )
            fh.seek(info.header_offset)
            local = fh.read(_LOCAL_HEADER.size)
            if len(local) < _LOCAL_HEADER.size or local[:4] != _ZIP_MAGIC:
                raise CorruptCheckpointError(
                    path, f"zip entry {name!r} has no local header at offset {info.header_offset:,}"
                )
            name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
            end_of_data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.file_size
            if end_of_data > size:
                raise CorruptCheckpointError(
                    path, f"zip entry {name!r} claims {info.file_size:,} bytes, past the end of the {size:,}-byte file"
                )
            total += info.file_size
            if total > size + _ZIP_SLACK:
                raise CorruptCheckpointError(
                    path, f"the zip entries claim more bytes than the {size:,}-byte file holds (overlapping entries)"
                )


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
    from torchkeep.scan import scan  # scan imports check_zip from here

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
            raise DeviceUnavailableError(path, device, requested, _first_line(e)) from None
        raise CorruptCheckpointError(path, f"torch.load could not read it ({_first_line(e)})") from None
    if fn is not None:
        tree = _apply(tree, lambda t: fn(t, saved.get(t.untyped_storage().data_ptr(), "cpu")))
    return tree


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
