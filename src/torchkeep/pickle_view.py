"""What a ``torch.save`` zip holds (keys, dtypes, shapes), read from its pickle without unpickling it.

The pickle's opcodes are walked as data (the same way :mod:`torchkeep.scan` walks them): no
global is imported, no constructor is called, nothing in the file runs. Tensors are recognised
by the calls torch's pickler writes for them (``torch._utils._rebuild_tensor_v2`` on a storage
record, ``_rebuild_parameter`` around it); ``OrderedDict`` state dicts, dicts, lists, tuples and
scalars come out as themselves; any other object shows its class name and the state it
carries; a whole pickled module (``torch.save(model)``) shows its parameters and buffers by
their state-dict names. The result is a skeleton in :mod:`torchkeep.tree`'s notation with a
tensor table, so ``inspect`` summarises a ``.pth`` like any other checkpoint. Torch-free.

Example:
    >>> import io, pickle, zipfile, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.pth")
    >>> torch_free = {"epoch": 3, "lr": 0.1}
    >>> with zipfile.ZipFile(p, "w") as z:  # what torch.save writes: stored records in one folder
    ...     z.writestr("x/data.pkl", pickle.dumps(torch_free))
    >>> skeleton, specs = view(p)
    >>> skeleton, specs
    ({'d': {'epoch': 3, 'lr': 0.1}}, {})
"""

from __future__ import annotations

import math
import os
import pickletools
from typing import Any

from torchkeep.container import read_zip
from torchkeep.format.dtypes import ITEMSIZE
from torchkeep.format.header import TensorSpec

__all__ = ["MAX_PICKLE_BYTES", "view"]

#: Pickles larger than this are not walked (a state dict's pickle is a few bytes per tensor).
MAX_PICKLE_BYTES = 256 << 20
_MAX_DEPTH = 200

_STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "UInt16Storage": "U16",
    "UInt32Storage": "U32",
    "UInt64Storage": "U64",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
}
_TENSOR_CALLS = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"}
_PARAMETER_CALLS = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}


class _Unreadable(Exception):
    """An opcode or a shape this view does not follow: the caller falls back to counting storages."""


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype


class _Tensor:
    __slots__ = ("dtype", "param", "shape")

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape, self.param = dtype, shape, False


class _Dict:
    __slots__ = ("items", "metadata", "ordered")

    def __init__(self, ordered: bool = False) -> None:
        self.items: list[list[Any]] = []
        self.ordered = ordered
        self.metadata = False


class _Obj:
    __slots__ = ("args", "cls", "state")

    def __init__(self, cls: str, args: Any = None) -> None:
        self.cls, self.args, self.state = cls, args, None


_MARK = object()
_CONSTANTS = frozenset(
    [
        "INT",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG",
        "LONG1",
        "LONG4",
        "FLOAT",
        "BINFLOAT",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
    ]
)
#: Skeleton nodes made at most (a pickle can repeat one memoised list exponentially often).
_MAX_NODES = 1_000_000


def _reduce(target: Any, args: Any) -> Any:
    name = target.name if isinstance(target, _Global) else "<unknown>"
    if name in _TENSOR_CALLS and isinstance(args, tuple) and len(args) >= 3 and isinstance(args[0], _Storage):
        shape = args[2]
        if args[0].dtype is None or not (isinstance(shape, tuple) and all(type(d) is int for d in shape)):
            raise _Unreadable(f"a tensor of an unknown layout ({name})")
        return _Tensor(args[0].dtype, shape)
    if name in _PARAMETER_CALLS and isinstance(args, tuple) and args and isinstance(args[0], _Tensor):
        args[0].param = True
        return args[0]
    if name == "collections.OrderedDict":
        return _Dict(ordered=True)
    if name == "_codecs.encode" and isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0].encode("latin1", "replace")
    return _Obj(name, args)


def _walk(data: bytes) -> Any:
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise _Unreadable("an opcode expects a MARK that is not there")

    for op, arg, _ in pickletools.genops(data):
        n = op.name
        if n in ("PROTO", "FRAME"):
            continue
        if n == "STOP":
            return stack.pop()
        if n in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[n])
        elif n in _CONSTANTS:
            stack.append(arg)
        elif n == "EMPTY_DICT":
            stack.append(_Dict())
        elif n == "DICT":
            items = pop_mark()
            d = _Dict()
            d.items = [[items[i], items[i + 1]] for i in range(0, len(items) - 1, 2)]
            stack.append(d)
        elif n in ("SETITEM", "SETITEMS"):
            items = [stack.pop(), stack.pop()][::-1] if n == "SETITEM" else pop_mark()
            target = stack[-1]
            if isinstance(target, _Dict):
                target.items.extend([items[i], items[i + 1]] for i in range(0, len(items) - 1, 2))
        elif n == "EMPTY_LIST":
            stack.append([])
        elif n == "LIST":
            stack.append(pop_mark())
        elif n in ("APPEND", "APPENDS"):
            items = [stack.pop()] if n == "APPEND" else pop_mark()
            if isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif n in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            k = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[n]
            items = [stack.pop() for _ in range(k)][::-1]
            stack.append(tuple(items))
        elif n == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif n == "EMPTY_SET":
            stack.append(_Obj("builtins.set"))
        elif n == "FROZENSET":
            pop_mark()
            stack.append(_Obj("builtins.frozenset"))
        elif n == "ADDITEMS":
            pop_mark()
        elif n == "MARK":
            stack.append(_MARK)
        elif n == "POP":
            stack.pop()
        elif n == "POP_MARK":
            pop_mark()
        elif n == "DUP":
            stack.append(stack[-1])
        elif n in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif n == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif n in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif n == "GLOBAL":
            module, _, qual = str(arg).partition(" ")
            stack.append(_Global(f"{module}.{qual}"))
        elif n == "STACK_GLOBAL":
            qual, module = stack.pop(), stack.pop()
            stack.append(_Global(f"{module}.{qual}"))
        elif n in ("BINPERSID", "PERSID"):
            pid = stack.pop() if n == "BINPERSID" else arg
            kind = pid[1].name.rpartition(".")[2] if isinstance(pid, tuple) and len(pid) > 1 else ""
            ok = isinstance(pid, tuple) and isinstance(pid[1], _Global)
            stack.append(_Storage(_STORAGE_DTYPES.get(kind) if ok else None))
        elif n == "REDUCE":
            args = stack.pop()
            stack.append(_reduce(stack.pop(), args))
        elif n in ("NEWOBJ", "NEWOBJ_EX"):
            if n == "NEWOBJ_EX":
                stack.pop()
            args = stack.pop()
            target = stack.pop()
            stack.append(_Obj(target.name if isinstance(target, _Global) else "<unknown>", args))
        elif n in ("OBJ", "INST"):
            items = pop_mark()
            if n == "INST":
                stack.append(_Obj(str(arg).replace(" ", ".")))
            else:
                stack.append(_Obj(items[0].name if items and isinstance(items[0], _Global) else "<unknown>"))
        elif n == "BUILD":
            state = stack.pop()
            inst = stack[-1]
            if isinstance(inst, _Obj):
                inst.state = state
            elif isinstance(inst, _Dict) and isinstance(state, _Dict):
                inst.metadata = any(k == "_metadata" for k, _ in state.items)
        else:
            raise _Unreadable(f"opcode {n}")
    raise _Unreadable("no STOP opcode")


class _Skeleton:
    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}
        self.made = 0

    def tensor(self, t: _Tensor) -> dict[str, Any]:
        name = f"t{len(self.specs)}"
        size = math.prod(t.shape) * ITEMSIZE[t.dtype]
        self.specs[name] = TensorSpec(name, t.dtype, t.shape, 0, size)
        return {"T": name, "P": True} if t.param else {"T": name}

    def node(self, v: Any, depth: int) -> Any:
        self.made += 1
        if depth > _MAX_DEPTH or self.made > _MAX_NODES:
            raise _Unreadable("nested too deeply, or too many values")
        if v is None or type(v) in (bool, int, str):
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"f": str(v)}
        if isinstance(v, (bytes, bytearray)):
            return {"V": "bytes"}
        if isinstance(v, _Tensor):
            return self.tensor(v)
        if isinstance(v, list):
            return {"l": [self.node(x, depth + 1) for x in v]}
        if isinstance(v, tuple):
            return {"t": [self.node(x, depth + 1) for x in v]}
        if isinstance(v, _Dict):
            if v.ordered:
                out: dict[str, Any] = {"o": [[self.node(k, depth + 1), self.node(x, depth + 1)] for k, x in v.items]}
                if v.metadata:
                    out["m"] = {}
                return out
            if all(type(k) is str for k, _ in v.items):
                return {"d": {k: self.node(x, depth + 1) for k, x in v.items}}
            return {"D": [[self.node(k, depth + 1), self.node(x, depth + 1)] for k, x in v.items]}
        if isinstance(v, _Obj):
            state = v.state if v.state is not None else v.args
            if isinstance(state, _Dict) and _is_module_state(state):
                entries: list[list[Any]] = []
                self.module(state, "", entries, depth + 1)
                return {"S": v.cls, "v": {"o": entries, "m": {}}}
            return {"S": v.cls, "v": self.node(state, depth + 1) if state is not None else None}
        return {"V": type(v).__name__}

    def module(self, state: _Dict, prefix: str, entries: list[list[Any]], depth: int) -> None:
        """A pickled ``nn.Module``'s tensors under their ``state_dict`` names."""
        if depth > _MAX_DEPTH:
            raise _Unreadable("modules nested too deeply")
        fields = {k: x for k, x in state.items if isinstance(k, str)}
        for table in ("_parameters", "_buffers"):
            t = fields.get(table)
            for name, x in t.items if isinstance(t, _Dict) else []:
                if isinstance(x, _Tensor):
                    entries.append([f"{prefix}{name}", self.tensor(x)])
        children = fields.get("_modules")
        for name, child in children.items if isinstance(children, _Dict) else []:
            sub = child.state if isinstance(child, _Obj) else None
            if isinstance(sub, _Dict) and _is_module_state(sub):
                self.module(sub, f"{prefix}{name}.", entries, depth + 1)


def _expanded(v: Any, sizes: dict[int, int], depth: int) -> int:
    """How many nodes ``v`` has once shared (memoised) values are repeated: linear in the distinct ones."""
    if depth > _MAX_DEPTH:
        raise _Unreadable("nested too deeply")
    known = sizes.get(id(v))
    if known is not None:
        return known
    if isinstance(v, (list, tuple)):
        children: Any = v
    elif isinstance(v, _Dict):
        children = [x for pair in v.items for x in pair]
    elif isinstance(v, _Obj):
        children = [v.state if v.state is not None else v.args]
    else:
        return 1
    sizes[id(v)] = _MAX_NODES + 1  # a cycle (a list that holds itself) counts as too many
    total = 1
    for c in children:
        total += _expanded(c, sizes, depth + 1)
        if total > _MAX_NODES:
            break
    sizes[id(v)] = total
    return total


def _is_module_state(state: _Dict) -> bool:
    keys = {k for k, _ in state.items if isinstance(k, str)}
    return {"_parameters", "_modules"} <= keys


def view(path: str | os.PathLike[str]) -> tuple[Any, dict[str, TensorSpec]] | None:
    """``(skeleton, tensor specs)`` of a ``torch.save`` zip's pickle, or ``None`` when it cannot be
    followed (a foreign layout, an oversized or damaged pickle). Offsets in the specs are dummies."""
    try:
        archive = read_zip(path)  # the records as torch's reader will see them, or a refusal
        entry = archive.find("data.pkl")
        if entry is None or entry.size > MAX_PICKLE_BYTES:
            return None
        with open(path, "rb") as fh:
            fh.seek(entry.offset)
            data = fh.read(entry.size)
        top = _walk(data)
        if _expanded(top, {}, 0) > _MAX_NODES:
            return None
        skeleton = _Skeleton()
        return skeleton.node(top, 0), skeleton.specs
    except (_Unreadable, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    except RecursionError:
        return None
