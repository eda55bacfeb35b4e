"""Static pickle scan: which globals a ``torch.save`` file or raw pickle imports, without running it.

Nothing from the file is ever imported or executed: the pickle's opcodes are walked with
:func:`pickletools.genops` over an abstract stack and memo, so ``STACK_GLOBAL`` operands that
arrive through the memo (``BINGET``) are still resolved. The walk is checked against how the C
unpickler reads the same bytes (frames, raw ``GLOBAL`` lines, string decoding) and zip archives are
read as torch's reader reads them (:func:`torchkeep.container.read_zip`): where two readers could
disagree the file is refused, never called clean. Safety is an allowlist: every global outside
the set ``torch.load(weights_only=True)`` accepts (plus the user's ``allow_globals``) is *unsafe*;
a second list marks some *dangerous* ones with a reason, as defence in depth only.

Example:
    >>> import torch, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "sd.pt")
    >>> torch.save(torch.nn.Linear(2, 2).state_dict(), p)
    >>> report = scan(p)
    >>> report.ok, report.unsafe
    (True, [])
"""

from __future__ import annotations

import io
import os
import pickletools
import tarfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter
from pathlib import Path
from typing import Any

from torchkeep import kinds
from torchkeep.container import ZipView, is_legacy, read_zip
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedSourceError
from torchkeep.scan_policy import (
    NUMPY_GLOBALS,
    NUMPY_RECONSTRUCT,
    NUMPY_SCALAR,
    allowed_by,
    check_allow_globals,
    dangerous_reason,
    numpy_dtype_problem,
    numpy_dtype_state_problem,
    numpy_loadable,
    reached_through,
    safe_globals,
)
from torchkeep.scan_report import ScanReport
from torchkeep.storage.files import open_regular
from torchkeep.storage.paths import as_path

__all__ = ["ScanReport", "dangerous_reason", "safe_globals", "scan"]

#: Opcodes that call or build objects; counted in :attr:`ScanReport.calls` (only globals decide safety).
CALL_OPCODES = ("REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX")

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: the pre-1.6 (non-zip) format
_UNRESOLVED = "<unresolvable STACK_GLOBAL>"

# --------------------------------------------------------------------------------------------- the opcode walker


class _Global:
    """A global reference on the abstract stack."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_UNKNOWN = object()  # any other value: its contents never matter for safety


class _NumpyDtype:
    """What a ``numpy.dtype(spec, ...)`` call leaves on the abstract stack (its BUILD state is checked)."""

    __slots__ = ("built", "spec")

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.built = False


_MARK = object()


class _Bounded:
    """A reader whose ``read(n)`` never asks the file for more than what is left.

    ``BufferedReader.read(n)`` allocates ``n`` bytes up front, so a pickle claiming a 2**60-byte
    ``BINBYTES8`` would otherwise allocate before failing.
    """

    def __init__(self, fh: Any, size: int) -> None:
        self._fh = fh
        self._end = size

    def read(self, n: int = -1) -> bytes:
        left = max(self._end - self._fh.tell(), 0)
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._fh.readline(max(self._end - self._fh.tell(), 0))

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, pos: int) -> int:
        return self._fh.seek(pos)


class _Acc:
    """What the walk of all pickles in one file has found."""

    def __init__(self) -> None:
        self.globals: set[str] = set()
        self.dangerous: dict[str, str] = {}
        self.issues: list[str] = []
        self.calls: Counter[str] = Counter()
        self.called: set[str] = set()
        self.complete = True
        self.numpy: dict[str, str] = {}  # NumPy global -> why this file's use of it is not a plain array
        self.dtypes: list[_NumpyDtype] = []

    def numpy_problem(self, name: str, why: str) -> None:
        self.numpy.setdefault(name, why)

    def add_global(self, module: str, name: str) -> str:
        # the same renames the unpickler applies to protocol 0-2 pickles (__builtin__ -> builtins)
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        self.globals.add(full)
        reason = dangerous_reason(full) or reached_through(name)
        if reason is not None:
            self.dangerous[full] = reason
        return full


def _raw(stream: Any, start: int, end: int) -> bytes:
    """The bytes ``[start, end)`` of the stream, its position kept."""
    here = stream.tell()
    stream.seek(start)
    data = stream.read(end - start)
    stream.seek(here)
    return bytes(data)


def _walk(stream: Any, where: str, acc: _Acc, size: int) -> tuple[int, Any]:
    """Walk one pickle from the stream's position to its STOP; return (offset after STOP, top value).

    ``size`` is where the stream ends. The C unpickler reads a FRAME's bytes into a buffer and drops
    what is left of it when an opcode reaches past its end (it reads that opcode's argument afresh
    from after the frame), while genops reads straight on: an opcode straddling a frame's end, a
    FRAME before the last one ended or past the end of the data, or a frame running past STOP,
    make the two see different opcodes, and are issues.
    """
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    protos = 0
    first = True
    frame_end: int | None = None

    def pop() -> Any:
        return stack.pop() if stack else _UNKNOWN

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        acc.issues.append(f"{where}: an opcode expects a MARK that is not there")
        items = stack[:]
        stack.clear()
        return items

    def note_call(target: Any) -> None:
        if isinstance(target, _Global):
            acc.called.add(target.name)

    try:
        for op, arg, pos in pickletools.genops(stream):
            name = op.name
            end = stream.tell()  # genops yields an opcode once its argument is read
            if frame_end is not None and pos >= frame_end:
                frame_end = None
            if frame_end is not None and end > frame_end:
                acc.issues.append(
                    f"{where}: the {name} opcode at byte {pos} runs past the end of its frame "
                    "(the C unpickler reads it differently)"
                )
            if name == "FRAME":
                if frame_end is not None:
                    acc.issues.append(f"{where}: a FRAME at byte {pos} starts before the previous frame ends")
                frame_end = end + arg
                if frame_end > size:
                    acc.issues.append(f"{where}: the FRAME at byte {pos} claims {arg:,} bytes, past the end")
            if name in CALL_OPCODES:
                acc.calls[name] += 1
            if name == "PROTO":
                protos += 1
                if protos > 1 or not first:
                    acc.issues.append(f"{where}: a PROTO opcode at byte {pos} (only one, first, is valid)")
            elif name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
                if _raw(stream, pos + 1, end) != f"{module}\n{qual}\n".encode():
                    # genops escape-decodes these lines; the C unpickler reads them as they are
                    acc.issues.append(f"{where}: {name} at byte {pos} has escapes or spaces in its module or name")
                ref = _Global(acc.add_global(module, qual))
                if name == "INST":
                    pop_mark()
                    note_call(ref)
                    _not_numpy_call(ref, name, acc)
                    stack.append(_UNKNOWN)
                else:
                    stack.append(ref)
            elif name == "STACK_GLOBAL":
                qual, module = pop(), pop()
                if isinstance(module, str) and isinstance(qual, str):
                    stack.append(_Global(acc.add_global(module, qual)))
                else:
                    acc.dangerous[_UNRESOLVED] = "its module/name are not plain strings, so the import cannot be known"
                    acc.issues.append(f"{where}: STACK_GLOBAL at byte {pos} with operands that are not plain strings")
                    stack.append(_UNKNOWN)
            elif name in _STRING_OPS or name in _BYTES_OPS:
                # genops decodes protocol 0-2 strings as latin-1, torch's unpickler as UTF-8: same only if ASCII
                ascii_ok = name not in ("STRING", "BINSTRING", "SHORT_BINSTRING") or str(arg).isascii()
                stack.append(arg if ascii_ok else _UNKNOWN)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else _UNKNOWN
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else _UNKNOWN
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _UNKNOWN))
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "DUP":
                stack.append(stack[-1] if stack else _UNKNOWN)
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name in ("EXT1", "EXT2", "EXT4"):
                acc.dangerous[f"<extension code {arg}>"] = (
                    "copyreg extension codes name a global only known at load time"
                )
                stack.append(_UNKNOWN)
            elif name == "REDUCE":
                args = pop()
                target = pop()
                note_call(target)
                stack.append(_reduced(target, args, acc))
            elif name == "NEWOBJ":
                pop()
                target = pop()
                note_call(target)
                _not_numpy_call(target, name, acc)
                stack.append(_UNKNOWN)
            elif name == "NEWOBJ_EX":
                pop(), pop()
                target = pop()
                note_call(target)
                _not_numpy_call(target, name, acc)
                stack.append(_UNKNOWN)
            elif name == "OBJ":
                items = pop_mark()
                note_call(items[0] if items else _UNKNOWN)
                _not_numpy_call(items[0] if items else _UNKNOWN, name, acc)
                stack.append(_UNKNOWN)
            elif name == "BUILD":
                state = pop()
                inst = pop()
                if isinstance(inst, _NumpyDtype):
                    inst.built = True
                    why = numpy_dtype_state_problem(inst.spec, state)
                    if why is not None:
                        acc.numpy_problem("numpy.dtype", why)
                stack.append(inst)
            elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                # tuples of constants are kept: NumPy's dtype and array arguments are checked
                if name == "TUPLE":
                    items = pop_mark()
                else:
                    n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
                    items = [pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name == "STOP":
                if frame_end is not None and frame_end > pos + 1:
                    acc.issues.append(f"{where}: a frame runs past the STOP opcode at byte {pos}")
                last = pop()
                return pos + 1, last
            elif name == "FRAME":
                pass
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                value = arg if name in ("LONG1", "LONG4", "LONG", "INT", "BININT", "BININT1", "BININT2") else _UNKNOWN
                stack.extend([value] * len(op.stack_after))
            first = False
    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError, IndexError) as e:
        acc.complete = False
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if any(w in message for w in ("exhausted", "expected", "not enough")) else "malformed"
        acc.issues.append(f"{where}: {kind} pickle ({message})")
        return -1, _UNKNOWN
    acc.complete = False
    acc.issues.append(f"{where}: truncated pickle (no STOP opcode)")
    return -1, _UNKNOWN


def _not_numpy_call(target: Any, opcode: str, acc: _Acc) -> None:
    if isinstance(target, _Global) and target.name in NUMPY_GLOBALS:
        acc.numpy_problem(target.name, f"called by {opcode}; numpy's own pickles only REDUCE it")


def _reduced(target: Any, args: Any, acc: _Acc) -> Any:
    """The abstract value ``REDUCE`` leaves: known for ``_codecs.encode`` and ``numpy.dtype``; NumPy uses checked."""
    if not isinstance(target, _Global):
        return _UNKNOWN
    name = target.name
    if name == "_codecs.encode":  # protocol 2 spells bytes as _codecs.encode(str, "latin1")
        if type(args) is tuple and len(args) == 2 and type(args[0]) is str and args[1] == "latin1":
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                pass
        return _UNKNOWN
    if name not in NUMPY_GLOBALS:
        return _UNKNOWN
    if name == "builtins.bytes":
        if args == ():
            return b""
        acc.numpy_problem(name, "called with arguments (only bytes(), the empty data of an empty array, is accepted)")
    elif name == "numpy.dtype":
        why = numpy_dtype_problem(args)
        if why is None:
            acc.dtypes.append(_NumpyDtype(args[0]))
            return acc.dtypes[-1]
        acc.numpy_problem(name, why)
    elif name in NUMPY_RECONSTRUCT:
        if not (
            type(args) is tuple
            and len(args) == 3
            and isinstance(args[0], _Global)
            and args[0].name == "numpy.ndarray"
            and type(args[1]) is tuple
            and args[2] == b"b"
        ):
            acc.numpy_problem(name, "called with arguments numpy's own pickles never use")
    elif name in NUMPY_SCALAR:
        if not (type(args) is tuple and len(args) == 2 and isinstance(args[0], _NumpyDtype)):
            acc.numpy_problem(name, "called without a plain numpy.dtype, or with extra arguments")
    else:
        acc.numpy_problem(name, "called directly; numpy's own pickles only pass it to _reconstruct")
    return _UNKNOWN


# --------------------------------------------------------------------------------------------- the entry point


def scan(path: str | os.PathLike[str], *, allow_globals: Any = None) -> ScanReport:
    """Statically scan a ``torch.save`` file (zip or pre-1.6) or a raw pickle; never executes it.

    Zip files are first read as torch reads them (:func:`torchkeep.container.read_zip`, which
    refuses any archive two readers could see differently); then every ``*.pkl`` entry is
    walked. A file torch would open as the pre-0.4 tar format is reported with a dangerous
    ``<legacy tar archive>`` entry: its pickles cannot be checked. A pre-1.6 ``torch.save`` file is five pickles followed by raw storage bytes: the five
    are walked. A raw pickle is walked, and bytes after its STOP are reported. A safetensors
    file holds no pickle and is clean.

    A directory is scanned as what it holds (:func:`torchkeep.kinds.detect`): its one checkpoint
    file, or every shard of a shard set (``pytorch_model.bin.index.json`` shards are pickles).

    Args:
        path: the file or directory.
        allow_globals: ``["mypkg.models.*", "argparse.Namespace"]``: globals to count as safe
            besides torch's allowlist (never the dangerous ones); listed in ``report.allowed``.

    Returns:
        A :class:`ScanReport`; ``report.ok`` is True when ``torch.load(weights_only=True)``
        (with ``allow_globals``) would accept every global and the pickles are well formed.

    Raises:
        CheckpointNotFoundError: no such file.
        CorruptCheckpointError: not a pickle, zip or safetensors file, or a zip that fails the
            sanity checks (compressed entries, sizes past the end of the file, too many entries).

    Example:
        >>> import os, pickle, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "evil.pkl")
        >>> with open(p, "wb") as f:
        ...     _ = f.write(b"cposix\\nsystem\\n(S'echo hi'\\ntR.")  # never run by scan
        >>> r = scan(p)
        >>> r.ok, r.dangerous
        (False, {'posix.system': 'runs shell commands or touches the process'})
    """
    path = as_path(path)
    patterns = check_allow_globals(allow_globals)
    if not path.exists():
        raise CheckpointNotFoundError(path)
    if path.is_dir() or _starts_with_brace(path):
        return _scan_detected(path, patterns)
    return _scan_file(path, patterns)


def _starts_with_brace(path: Path) -> bool:
    with os.fdopen(open_regular(path), "rb") as fh:  # a FIFO or device: a typed error, never a hang
        return fh.read(64).lstrip()[:1] == b"{"


def _scan_detected(path: Path, patterns: tuple[str, ...] = ()) -> ScanReport:
    """A directory or shard index is what :func:`torchkeep.kinds.detect` finds: one file, or every shard."""
    found = kinds.detect(path, operation="scan")
    if found.kind in (kinds.DCP, kinds.TORCHKEEP_DCP):
        raise UnsupportedSourceError(
            path,
            found.kind,
            "scan",
            "scan reads single files. A DCP directory's .metadata is read by torchkeep's allowlist unpickler, "
            f"never by pickle; `torchkeep scan {path / '.metadata'}` lists what it imports",
        )
    if found.index is None:
        assert found.file is not None  # detect() names the one file of a non-sharded directory
        return _scan_file(found.file, patterns)
    parts = [_scan_file(f, patterns) for f in found.shards]
    calls: dict[str, int] = {}
    for r in parts:
        for k, n in r.calls.items():
            calls[k] = calls.get(k, 0) + n
    formats = sorted({r.format for r in parts})
    return ScanReport(
        path=str(found.target),
        format="sharded " + "/".join(formats),
        globals=sorted({g for r in parts for g in r.globals}),
        unsafe=sorted({g for r in parts for g in r.unsafe}),
        dangerous=dict(sorted({k: v for r in parts for k, v in r.dangerous.items()}.items())),
        reasons=dict(sorted({k: v for r in parts for k, v in r.reasons.items()}.items())),
        issues=[f"{Path(r.path).name}: {i}" for r in parts for i in r.issues],
        calls={k: calls[k] for k in CALL_OPCODES if calls.get(k)},
        called=sorted({g for r in parts for g in r.called}),
        pickles=[f"{Path(r.path).name}:{p}" for r in parts for p in r.pickles],
        complete=all(r.complete for r in parts),
        allowed=sorted({g for r in parts for g in r.allowed}),
    )


def _scan_file(path: Path, patterns: tuple[str, ...] = ()) -> ScanReport:
    acc = _Acc()
    pickles: list[str] = []
    with os.fdopen(open_regular(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(16)
        if head.startswith(b"PK\x03\x04"):  # torch.load's own test: a zip is what starts so
            fmt = "torch-zip"
            _scan_zip(path, fh, read_zip(path), acc, pickles)
        elif _is_tar(fh):
            # torch.load tries tarfile first on any file that is not a zip: whatever else the bytes
            # look like, torch reads them as the pre-0.4 format, whose pickles interleave raw storage data
            fmt = "torch-tar"
            acc.dangerous["<legacy tar archive>"] = (
                "torch.load reads it as the pre-0.4 tar format, whose pickles torchkeep cannot check"
            )
        elif _looks_like_safetensors(head, size) and not is_legacy(head[:8]):
            fmt = "safetensors"
        elif head[:1] and head[0] in _OPCODE_BYTES:
            fmt = "pickle"
            stream = _Bounded(fh, size)
            fh.seek(0)
            pickles.append("pickle@0")
            end, top = _walk(stream, "pickle@0", acc, size)
            if end >= 0 and top == _TORCH_MAGIC and not isinstance(top, bool):
                # pre-1.6 torch.save: magic, protocol version, sys info, the data, storage keys; then raw bytes
                fmt = "torch-legacy"
                for _ in range(4):
                    fh.seek(end)
                    pickles.append(f"pickle@{end}")
                    end, _ = _walk(stream, f"pickle@{end}", acc, size)
                    if end < 0:
                        break
            elif end >= 0 and end < size:
                acc.issues.append(f"pickle@0: {size - end:,} bytes after the STOP opcode")
        else:
            raise CorruptCheckpointError(path, "not a pickle, a torch.save file or a safetensors file")
    if any(not d.built for d in acc.dtypes):
        acc.numpy_problem("numpy.dtype", "a dtype is never given its state (numpy's own pickles always BUILD it)")
    allowed = safe_globals() if acc.globals else frozenset()  # torch's allowlist only when there is a global to judge
    if acc.globals & NUMPY_GLOBALS and numpy_loadable():
        allowed = allowed | NUMPY_GLOBALS  # tk.load accepts plain NumPy arrays (torchkeep.legacy)
    by_user = {g for g in acc.globals if g not in allowed and g not in acc.dangerous and allowed_by(patterns, g)}
    unsafe = {g for g in acc.globals if g not in allowed and g not in by_user} | set(acc.dangerous) | set(acc.numpy)
    return ScanReport(
        path=str(path),
        format=fmt,
        globals=sorted(acc.globals),
        unsafe=sorted(unsafe),
        dangerous=dict(sorted(acc.dangerous.items())),
        reasons=dict(sorted(acc.numpy.items())),
        issues=acc.issues,
        calls={k: acc.calls[k] for k in CALL_OPCODES if acc.calls[k]},
        called=sorted(acc.called),
        pickles=pickles,
        complete=acc.complete,
        allowed=sorted(by_user),
    )


def _scan_zip(path: Path, fh: Any, view: ZipView, acc: _Acc, pickles: list[str]) -> None:
    """Walk every ``.pkl`` record of the archive torch's reader sees (names ASCII case folded, as it looks up)."""
    records = [r.lower() for r in view.records()]
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        acc.dangerous["<TorchScript archive>"] = (
            "torch.load hands it to torch.jit.load, which compiles and runs its code"
        )
    for entry in view.entries:
        if not entry.raw.lower().endswith(b".pkl"):
            continue
        fh.seek(entry.offset)
        data = fh.read(entry.size)
        if len(data) != entry.size:
            raise CorruptCheckpointError(path, f"zip entry {entry.name!r} is cut short")
        pickles.append(entry.name)
        end, _ = _walk(io.BytesIO(data), entry.name, acc, len(data))
        if end >= 0 and end < len(data):
            acc.issues.append(f"{entry.name}: {len(data) - end:,} bytes after the STOP opcode")


def _is_tar(fh: Any) -> bool:
    """Whether ``torch.load`` would take the file for its legacy tar format (it asks ``tarfile``, as here)."""
    fh.seek(0)
    try:
        tarfile.open(fileobj=fh, mode="r:").close()
    except tarfile.TarError:
        return False
    except Exception:  # tarfile failing otherwise makes torch.load fail too: nothing of it runs
        return False
    finally:
        fh.seek(0)
    return True


_OPCODE_BYTES = frozenset(op.code.encode("latin-1")[0] for op in pickletools.opcodes)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"
