"""Static pickle scan: which globals a ``torch.save`` file or raw pickle imports, without running it.

Nothing from the file is ever imported or executed: the pickle's opcodes are walked with
:func:`pickletools.genops` over an abstract stack and memo, so ``STACK_GLOBAL`` operands that
arrive through the memo (``BINGET``) are still resolved. Safety is an allowlist: every global
outside the set ``torch.load(weights_only=True)`` accepts is *unsafe*; a second, explicit list
marks the *dangerous* ones (code execution, imports, nested deserializers, ...) with a reason.

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
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkeep import kinds
from torchkeep.container import check_zip, is_legacy
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedSourceError
from torchkeep.scan_policy import (
    NUMPY_GLOBALS,
    NUMPY_RECONSTRUCT,
    NUMPY_SCALAR,
    dangerous_reason,
    numpy_dtype_problem,
    numpy_dtype_state_problem,
    numpy_loadable,
    reached_through,
    safe_globals,
)
from torchkeep.storage.paths import as_path

__all__ = ["ScanReport", "dangerous_reason", "safe_globals", "scan"]

#: Opcodes that call or build objects; counted in :attr:`ScanReport.calls` (only globals decide safety).
CALL_OPCODES = ("REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX")

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: the pre-1.6 (non-zip) format
_UNRESOLVED = "<unresolvable STACK_GLOBAL>"

# --------------------------------------------------------------------------------------------- the report


@dataclass
class ScanReport:
    """What a file's pickles import, and whether ``torch.load(weights_only=True)`` would accept it.

    Attributes:
        path: the file scanned.
        format: ``"torch-zip"``, ``"torch-legacy"`` (pre-1.6 non-zip torch.save), ``"pickle"`` or
            ``"safetensors"`` (no pickle at all).
        globals: every ``"module.name"`` the pickles import, sorted.
        unsafe: those outside the weights-only allowlist (dangerous ones included), sorted.
            The NumPy globals of plain arrays and scalars (:data:`torchkeep.scan_policy.NUMPY_GLOBALS`)
            count as safe, as ``tk.load`` accepts them, unless the file uses them for anything else
            (an object dtype, say): then they are unsafe, and ``reasons`` says why.
        reasons: ``{name: why}`` for unsafe globals that are unsafe only because of how this file uses them.
        dangerous: the explicitly dangerous ones, ``{name: reason}``.
        issues: structural problems (several PROTO, bytes after STOP, unresolvable STACK_GLOBAL,
            a truncated or malformed pickle).
        calls: how often each call/build opcode appears (``REDUCE``, ``BUILD``, ``NEWOBJ``, ...).
        called: the globals actually invoked by those opcodes, sorted.
        pickles: the pickles scanned (zip entry names, or ``"pickle@offset"``).
        complete: False when a pickle could not be parsed to its end.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save({"w": torch.ones(2)}, p)
        >>> report = tk.scan(p)
        >>> report.format, report.ok, report.unsafe
        ('torch-zip', True, [])
    """

    path: str
    format: str = "pickle"
    globals: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    dangerous: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    called: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    complete: bool = True

    @property
    def ok(self) -> bool:
        """True when nothing is unsafe, nothing dangerous, and the pickles are well formed."""
        return not self.unsafe and not self.dangerous and not self.issues

    @property
    def verdict(self) -> str:
        """``"clean"``, ``"UNSAFE"`` or ``"unreadable"`` (a truncated pickle with nothing dangerous in it)."""
        if self.ok:
            return "clean"
        if self.dangerous or self.unsafe or self.complete:
            return "UNSAFE"
        return "unreadable"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``ok`` and ``verdict``."""
        return {
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "verdict": self.verdict,
            "globals": list(self.globals),
            "unsafe": list(self.unsafe),
            "dangerous": dict(sorted(self.dangerous.items())),
            "reasons": dict(sorted(self.reasons.items())),
            "issues": list(self.issues),
            "calls": dict(self.calls),
            "called": list(self.called),
            "pickles": list(self.pickles),
            "complete": self.complete,
        }

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.verdict} ({self.format}, {len(self.globals)} globals)"]
        for name in self.globals:
            if name in self.dangerous:
                lines.append(f"  DANGEROUS {name}: {self.dangerous[name]}")
            elif name in self.reasons:
                lines.append(f"  unsafe    {name}: {self.reasons[name]}")
            elif name in self.unsafe:
                lines.append(f"  unsafe    {name}")
            else:
                lines.append(f"  ok        {name}")
        for name, why in sorted(self.dangerous.items()):
            if name not in self.globals:
                lines.append(f"  DANGEROUS {name}: {why}")
        lines.extend(f"  issue: {issue}" for issue in self.issues)
        if self.calls:
            lines.append("  calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.calls.items())))
        return "\n".join(lines)


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


def _walk(stream: Any, where: str, acc: _Acc) -> tuple[int, Any]:
    """Walk one pickle from the stream's position to its STOP; return (offset after STOP, top value)."""
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    protos = 0
    first = True

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
            if name in CALL_OPCODES:
                acc.calls[name] += 1
            if name == "PROTO":
                protos += 1
                if protos > 1 or not first:
                    acc.issues.append(f"{where}: a PROTO opcode at byte {pos} (only one, first, is valid)")
            elif name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
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
                stack.append(arg)
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


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Statically scan a ``torch.save`` file (zip or pre-1.6) or a raw pickle; never executes it.

    Zip files first pass :func:`torchkeep.container.check_zip`; then every ``*.pkl`` entry is
    walked. A pre-1.6 ``torch.save`` file is five pickles followed by raw storage bytes: the five
    are walked. A raw pickle is walked, and bytes after its STOP are reported. A safetensors
    file holds no pickle and is clean.

    A directory is scanned as what it holds (:func:`torchkeep.kinds.detect`): its one checkpoint
    file, or every shard of a shard set (``pytorch_model.bin.index.json`` shards are pickles).

    Args:
        path: the file or directory.

    Returns:
        A :class:`ScanReport`; ``report.ok`` is True when ``torch.load(weights_only=True)``
        would accept every global and the pickles are well formed.

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
    if not path.exists():
        raise CheckpointNotFoundError(path)
    if path.is_dir() or _starts_with_brace(path):
        return _scan_detected(path)
    return _scan_file(path)


def _starts_with_brace(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(64).lstrip()[:1] == b"{"


def _scan_detected(path: Path) -> ScanReport:
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
        return _scan_file(found.file)
    parts = [_scan_file(f) for f in found.shards]
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
    )


def _scan_file(path: Path) -> ScanReport:
    size = path.stat().st_size
    acc = _Acc()
    pickles: list[str] = []
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head.startswith(b"PK\x03\x04"):
            fmt = "torch-zip"
            check_zip(path)
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if i.filename.endswith(".pkl")]
                if any("/code/" in i.filename or i.filename.startswith("code/") for i in zf.infolist()):
                    acc.dangerous["<TorchScript archive>"] = "code/ entries are compiled and run by torch.jit.load"
                for info in infos:
                    try:
                        data = zf.read(info)
                    except (zipfile.BadZipFile, OSError, ValueError) as e:
                        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} is damaged ({e})") from None
                    pickles.append(info.filename)
                    end, _ = _walk(io.BytesIO(data), info.filename, acc)
                    if end >= 0 and end < len(data):
                        acc.issues.append(f"{info.filename}: {len(data) - end:,} bytes after the STOP opcode")
        elif _looks_like_safetensors(head, size) and not is_legacy(head[:8]):
            fmt = "safetensors"
        elif head[:1] and head[0] in _OPCODE_BYTES:
            fmt = "pickle"
            stream = _Bounded(fh, size)
            fh.seek(0)
            pickles.append("pickle@0")
            end, top = _walk(stream, "pickle@0", acc)
            if end >= 0 and top == _TORCH_MAGIC and not isinstance(top, bool):
                # pre-1.6 torch.save: magic, protocol version, sys info, the data, storage keys; then raw bytes
                fmt = "torch-legacy"
                for _ in range(4):
                    fh.seek(end)
                    pickles.append(f"pickle@{end}")
                    end, _ = _walk(stream, f"pickle@{end}", acc)
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
    unsafe = {g for g in acc.globals if g not in allowed} | set(acc.dangerous) | set(acc.numpy)
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
    )


_OPCODE_BYTES = frozenset(op.code.encode("latin-1")[0] for op in pickletools.opcodes)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"
