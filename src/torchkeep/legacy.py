"""Legacy ``torch.save`` files: detected by content, read only through ``weights_only=True``."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import math
import os
import pickle
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep.errors import (
    ArgumentTypeError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    UnsafeCheckpointError,
    format_names,
)
from torchkeep.scan import scan
from torchkeep.scan_policy import (
    NUMPY_RECONSTRUCT,
    NUMPY_SCALAR,
    PLAIN_ONLY,
    check_allow_globals,
    numpy_dtype_problem,
    numpy_dtype_state_problem,
)

__all__ = ["load_legacy"]


def load_legacy(
    path: str | os.PathLike[str], *, map_location: Any = "cpu", trust_pickle: bool = False, allow_globals: Any = None
) -> Any:
    """Load a ``torch.save`` file.

    ``weights_only=True`` is always passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    in the environment cannot turn it off. A refused safe load is never retried unsafely:
    only ``trust_pickle=True`` from the caller runs the full unpickler, and that runs the file's
    code: nothing torchkeep checks beforehand can make an untrusted pickle safe to unpickle.

    ``allow_globals=["mypkg.models.*", "argparse.Namespace"]`` is the middle way: the file is
    still read by torch's weights-only unpickler, which also accepts the globals those patterns
    name, for this one load only (a context-local addition, never a process-wide registration).
    A file needing any other global is refused, naming it.

    Before ``torch.load`` runs, the static scan (:func:`torchkeep.scan.scan`) reads the file as
    torch will: a zip archive that two readers could see differently, or a pickle whose frames
    the C unpickler reads differently, is refused as corrupt, as are structural tricks (several
    PROTO opcodes, bytes after STOP, a truncated pickle); a file that imports something on the
    dangerous list (``os.system``, ``builtins.eval``, nested deserializers, ...) or that torch
    would read as the pre-0.4 tar format is refused whatever the options.

    Raises:
        UnsafeCheckpointError: the pickle needs more than tensors, plain containers and the
            allowed globals (the message names them), or imports something dangerous.
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
    patterns = check_allow_globals(allow_globals)
    report = scan(path, allow_globals=patterns) if patterns else scan(path)
    if report.dangerous:  # never handed to torch.load, whatever the options
        raise _dangerous(path, report.dangerous, trust_pickle)
    if report.issues and not report.dangerous:
        raise CorruptCheckpointError(path, "the pickle is malformed: " + "; ".join(report.issues[:3]))
    extra: dict[str, Any] = {}
    if patterns and not trust_pickle:
        if report.unsafe:
            raise _not_allowed(path, report.unsafe, report.reasons, patterns)
        extra = _resolve(path, report.allowed)
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
                with _numpy_arrays(extra) as arrays:
                    tree = torch.load(fh, map_location=map_location, weights_only=True)
                    if arrays is not None:
                        tree = arrays.finish(tree)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise CorruptCheckpointError(path, f"the pickle could not be read ({_first_line(e)})") from None
        if report.dangerous:  # weights_only refused it too; say why nothing will unlock it
            raise _dangerous(path, report.dangerous, trust_pickle) from None
        err = UnsafeCheckpointError(path, _needs(report.unsafe, _first_line(e), report.reasons))
        err.unsafe_globals = list(report.unsafe)  # type: ignore[attr-defined]
        if report.reasons:  # e.g. an object-dtype array: no torchkeep file can hold it, so no convert advice
            err.args = (
                f"{path}: refused to unpickle: {_needs(report.unsafe, '', report.reasons, convert=False)}. "
                "Loading it could run arbitrary code. If, and only if, you trust where this file came from, "
                "pass trust_pickle=True; to keep it as a torchkeep file, turn those values into plain arrays first.",
            )
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
        with open(path, "rb") as fh, contextlib.ExitStack() as scope:
            if not trust_pickle:
                scope.enter_context(_numpy_arrays())
            torch.load(fh, map_location=probe, weights_only=not trust_pickle)
    except _Found as found:
        return str(found.args[0])
    except Exception:  # the probe never got that far: say what is known
        pass
    return "an unknown device"


def _needs(
    unsafe: list[str], torch_reason: str, reasons: Mapping[str, str] | None = None, *, convert: bool = True
) -> str:
    """The refusal reason: every class the pickle imports beyond plain weights, and what to do.

    torch's own reason only when the scan named nothing. Every suggestion here works on the file:
    ``tk.convert`` refuses it too unless given ``trust_pickle=True``, so that is what it shows.
    """
    if not unsafe:
        return torch_reason
    whole_model = any(".nn.modules." in name or name.endswith("Module") for name in unsafe)
    what = "a whole pickled model (torch.save(model))" if whole_model else "objects beyond plain weights"
    why = "".join(f"; {name}: {reason}" for name, reason in sorted((reasons or {}).items()))
    head = (
        f"it holds {what} and imports {len(unsafe)} global(s) outside the weights-only allowlist: "
        f"{format_names(unsafe)}{why}. "
    )
    if not convert:
        return head + "`torchkeep scan FILE` lists everything it imports"
    return (
        head + f"If those are classes you know to be plain data, pass allow_globals=[{unsafe[0]!r}] (one entry per "
        "class) to load it without running other code; if you trust the whole file (trust_pickle=True runs any code it holds), "
        "tk.convert(path, 'model.safetensors', trust_pickle=True) turns it into a safe file once; "
        "`torchkeep scan FILE` lists everything it imports"
    )


def _dangerous(path: Path, dangerous: Mapping[str, str], trust_pickle: bool) -> UnsafeCheckpointError:
    """The error for a pickle that imports something only malicious or unsafe files need."""
    shown = [f"{name} ({why})" for name, why in sorted(dangerous.items())[:10]]
    more = f", ... ({len(dangerous) - 10} more)" if len(dangerous) > 10 else ""
    err = UnsafeCheckpointError(path, f"it imports dangerous globals: {', '.join(shown)}{more}")
    err.dangerous = dict(dangerous)  # type: ignore[attr-defined]
    err.unsafe_globals = sorted(dangerous)  # type: ignore[attr-defined]
    even = " even with trust_pickle=True" if trust_pickle else ""
    # the usual "pass trust_pickle=True" advice would be wrong here: torchkeep never unpickles these
    err.args = (
        f"{path}: refused to unpickle{even}: it imports {', '.join(shown)}{more}. "
        "Checkpoints never need these; malicious files do, and trust_pickle=True does not unlock them. "
        "Nothing was executed. "
        "`torchkeep scan FILE` lists everything the file imports; if the file is yours, re-save its state_dict().",
    )
    return err


def _not_allowed(
    path: Path, unsafe: list[str], reasons: Mapping[str, str], patterns: tuple[str, ...]
) -> UnsafeCheckpointError:
    """The error for a pickle that needs globals beyond torch's allowlist and the user's ``allow_globals``."""
    err = UnsafeCheckpointError(path, _needs(unsafe, "", reasons, convert=False))
    err.unsafe_globals = list(unsafe)  # type: ignore[attr-defined]
    err.args = (
        f"{path}: refused to unpickle: it needs {len(unsafe)} global(s) that neither torch's weights-only "
        f"allowlist nor allow_globals={list(patterns)!r} accepts: {format_names(unsafe)}. Nothing was executed. "
        "Add the classes you know to be plain data to allow_globals (e.g. allow_globals=[..., "
        f"{unsafe[0]!r}]); trust_pickle=True would run any code the file holds.",
    )
    return err


def _resolve(path: Path, names: list[str]) -> dict[str, Any]:
    """``{"module.name": object}`` for the allowed globals a file needs, importing only their modules."""
    out: dict[str, Any] = {}
    for full in names:
        parts = full.split(".")
        for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj: Any = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            out[full] = obj
            break
        else:
            err = UnsafeCheckpointError(path, f"it needs {full}, which allow_globals names but cannot be imported")
            err.args = (
                f"{path}: refused to unpickle: it needs {full}, which allow_globals names but which cannot be "
                "imported here; import the package that defines it (is it installed?) and load again.",
            )
            raise err
    return out


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


# --------------------------------------------------------------------------------------------- NumPy arrays
#
# Training files hold NumPy arrays (``np.random.get_state()`` in Hugging Face's rng_state.pth and
# Accelerate's random_states_0.pkl). torch.load(weights_only=True) refuses the globals they import.
# torch's own way to allow them, ``torch.serialization.safe_globals([...])``, is NOT scoped: it adds
# to the module-level set ``torch._weights_only_unpickler._marked_safe_globals_set`` on enter and
# removes on exit (a non-atomic read-modify-write, with no lock). While it is entered every thread's
# torch.load accepts those globals, a concurrent add_safe_globals can be lost, and the exit removes
# entries the user had registered themselves. A lock would only order torchkeep's own loads.
#
# So torchkeep never touches that set. During its own load it wraps the function torch's
# weights-only unpickler consults for user-allowed globals (``_get_user_allowed_globals``, looked
# up in its module on every GLOBAL, REDUCE, NEWOBJ and BUILD): the wrapper returns torch's answer
# unchanged, plus the entries below only in the context (thread / task, a ContextVar) that runs a
# torchkeep load. A reference count puts torch's function back when the last such load ends, so
# outside a torchkeep load torch is exactly as it was; get_safe_globals() never changes.
#
# The entries are not NumPy's own functions but validating stand-ins: numpy.dtype accepts only the
# plain specs of torchkeep.scan_policy (and only the BUILD state NumPy writes for them), arrays are
# rebuilt with np.frombuffer from checked bytes, and numpy.ndarray is a marker that cannot be called.
# NumPy never sees an argument from the file that is not a checked string or byte buffer. Object,
# structured, string and datetime dtypes are refused (the scan reports why). On a torch without
# that function NumPy arrays stay refused (scan_policy.numpy_loadable).

_IN_LOAD: contextvars.ContextVar[_NumpyLoad | None] = contextvars.ContextVar("torchkeep_numpy_load", default=None)
_PATCH_LOCK = threading.Lock()
_patch_users = 0
_torch_user_globals: Callable[[], dict[str, Any]] | None = None


def _refuse(why: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"NumPy data refused: {why}")


class _NdarrayMarker:
    """Stands for ``numpy.ndarray`` in a pickle: only :func:`_np_reconstruct` accepts it; it cannot be called."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _refuse("numpy.ndarray is only accepted as _reconstruct's first argument")


class _Proxy:
    """A NumPy value under construction; replaced by the real one once ``torch.load`` returns."""

    __slots__ = ("used", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.used = False

    def __hash__(self) -> int:  # NumPy arrays are never dict keys or set members
        raise _refuse("a NumPy array or dtype used as a dict key or set member")

    def __eq__(self, other: object) -> bool:
        return self is other

    def __setstate__(self, state: Any) -> None:  # pragma: no cover - each subclass has its own
        raise _refuse("unexpected state")


class _DtypeProxy(_Proxy):
    """``numpy.dtype(spec, align, copy)``: the real dtype exists once NumPy's one valid BUILD state arrives."""

    __slots__ = ("spec",)

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = spec

    def __setstate__(self, state: Any) -> None:
        why = numpy_dtype_state_problem(self.spec, state)
        if why is not None or self.value is not None:
            raise _refuse(why or "numpy.dtype built twice")
        dtype = np.dtype(self.spec).newbyteorder(state[1])
        if dtype.kind not in "biufc" or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise _refuse(f"{dtype!r} is not a plain dtype")  # the spec check makes this unreachable
        self.value = dtype


class _ArrayProxy(_Proxy):
    """``_reconstruct(numpy.ndarray, (0,), b"b")``: the array is built from its checked BUILD state."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if self.value is not None:
            raise _refuse("an array built twice")
        if type(state) is not tuple or len(state) != 5 or type(state[0]) is not int or state[0] != 1:
            raise _refuse("an ndarray state numpy's own pickles never write")
        _, shape, dtype, fortran, raw = state
        dt = _dtype_of(dtype)
        if type(shape) is not tuple or len(shape) > 64 or any(type(n) is not int or n < 0 for n in shape):
            raise _refuse("an ndarray shape that is not a tuple of sizes")
        if type(fortran) is not bool or type(raw) is not bytes:
            raise _refuse(f"{PLAIN_ONLY} (the array's data is not a byte string)")
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise _refuse(f"an array of shape {shape} and dtype {dt} with {len(raw)} bytes of data")
        flat = np.frombuffer(raw, dtype=dt)
        self.value = flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _dtype_of(value: Any) -> np.dtype[Any]:
    if type(value) is not _DtypeProxy or value.value is None:
        raise _refuse(f"the dtype is not a plain numpy.dtype; {PLAIN_ONLY}")
    value.used = True
    return value.value


def _np_dtype(*args: Any) -> _DtypeProxy:
    why = numpy_dtype_problem(args)
    if why is not None:
        raise _refuse(why)
    return _register(_DtypeProxy(args[0]))


def _np_reconstruct(*args: Any) -> _ArrayProxy:
    if len(args) != 3 or args[0] is not _NdarrayMarker or type(args[1]) is not tuple or args[2] != b"b":
        raise _refuse("_reconstruct called with arguments numpy's own pickles never use")
    return _register(_ArrayProxy())


def _np_scalar(*args: Any) -> Any:
    if len(args) != 2:
        raise _refuse("scalar called with arguments numpy's own pickles never use")
    dt = _dtype_of(args[0])
    if type(args[1]) is not bytes or len(args[1]) != dt.itemsize:
        raise _refuse(f"a {dt} scalar whose data is not {dt.itemsize} bytes")
    return np.frombuffer(args[1], dtype=dt)[0]


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise _refuse("bytes() called with arguments (only the empty data of an empty array is accepted)")
    return b""


def _register(proxy: Any) -> Any:
    load = _IN_LOAD.get()
    if load is None:  # only reachable from inside a torchkeep load
        raise _refuse("outside a torchkeep load")
    load.proxies.append(proxy)
    return proxy


#: What a torchkeep load adds to torch's user-allowed globals. The proxy classes sit under keys without a
#: dot: torch only calls BUILD on types among the values, and no GLOBAL opcode ("module.name") can name them.
_STAND_INS: dict[str, Any] = {
    **dict.fromkeys(sorted(NUMPY_RECONSTRUCT), _np_reconstruct),
    **dict.fromkeys(sorted(NUMPY_SCALAR), _np_scalar),
    "numpy.dtype": _np_dtype,
    "numpy.ndarray": _NdarrayMarker,
    "builtins.bytes": _empty_bytes,
    "<torchkeep numpy dtype>": _DtypeProxy,
    "<torchkeep numpy array>": _ArrayProxy,
}


class _NumpyLoad:
    """The proxies one load creates; :meth:`finish` swaps the real values into the loaded tree."""

    def __init__(self) -> None:
        self.proxies: list[_Proxy] = []
        self.extra: dict[str, Any] = {}

    def finish(self, tree: Any) -> Any:
        if not self.proxies:
            return tree
        done: dict[int, Any] = {}
        try:
            tree = self._swap(tree, done)
        except RecursionError:
            raise _refuse("NumPy values nested too deeply to check") from None
        for proxy in self.proxies:
            if proxy.value is None:
                raise _refuse("a numpy.dtype or array was never given its state")
            if not proxy.used and id(proxy) not in done:
                raise _refuse("a NumPy value in a place torchkeep cannot check (an attribute of a tensor?)")
        return tree

    def _swap(self, o: Any, done: dict[int, Any]) -> Any:
        """Proxies -> values in dicts and lists (in place: torch.load just made them) and tuples (rebuilt)."""
        if id(o) in done:
            return done[id(o)]
        if isinstance(o, _Proxy):
            if o.value is None:
                raise _refuse("a numpy.dtype or array was never given its state")
            done[id(o)] = o.value
            return o.value
        if isinstance(o, dict):
            done[id(o)] = o
            for k, v in o.items():
                new = self._swap(v, done)
                if new is not v:
                    o[k] = new
            attrs = getattr(o, "__dict__", None)  # an OrderedDict's _metadata
            if attrs:
                for k, v in list(attrs.items()):
                    attrs[k] = self._swap(v, done)
            return o
        if isinstance(o, list):
            done[id(o)] = o
            for i, v in enumerate(o):
                new = self._swap(v, done)
                if new is not v:
                    o[i] = new
            return o
        if isinstance(o, tuple):
            items = [self._swap(v, done) for v in o]
            if any(a is not b for a, b in zip(items, o, strict=True)):
                new_tuple = type(o)._make(items) if hasattr(o, "_fields") else type(o)(items)
                done[id(o)] = new_tuple
                return new_tuple
            done[id(o)] = o
            return o
        return o


def _scoped_user_globals() -> dict[str, Any]:
    """torch's user-allowed globals, plus :data:`_STAND_INS` inside a torchkeep load in this context."""
    assert _torch_user_globals is not None
    found = _torch_user_globals()
    load = _IN_LOAD.get()
    if load is not None:
        found.update(load.extra)  # this load's allow_globals
        found.update(_STAND_INS)  # ours win over a user's own numpy registrations, as the scan assumes
    return found


@contextlib.contextmanager
def _numpy_arrays(extra: Mapping[str, Any] | None = None) -> Iterator[_NumpyLoad | None]:
    """Accept plain NumPy arrays (and ``extra``: allow_globals) in the ``torch.load(weights_only=True)`` calls here.

    Yields ``None`` (arrays stay refused) on a torch without ``_get_user_allowed_globals``; then
    ``extra`` cannot be scoped to this load either, and a load that needs it is refused.
    """
    global _patch_users, _torch_user_globals
    try:
        from torch import _weights_only_unpickler as wou

        current = wou._get_user_allowed_globals
    except (ImportError, AttributeError):
        if extra:
            raise pickle.UnpicklingError(
                "allow_globals needs torch._weights_only_unpickler._get_user_allowed_globals"
            ) from None
        yield None
        return
    with _PATCH_LOCK:
        if _patch_users == 0:
            _torch_user_globals = current
            wou._get_user_allowed_globals = _scoped_user_globals
        _patch_users += 1
    load = _NumpyLoad()
    load.extra = dict(extra or {})
    token = _IN_LOAD.set(load)
    try:
        yield load
    finally:
        _IN_LOAD.reset(token)
        with _PATCH_LOCK:
            _patch_users -= 1
            # put torch's function back unless someone else has replaced ours meanwhile (then ours,
            # which adds nothing outside a torchkeep load, stays in their chain)
            if _patch_users == 0 and wou._get_user_allowed_globals is _scoped_user_globals:
                wou._get_user_allowed_globals = _torch_user_globals
