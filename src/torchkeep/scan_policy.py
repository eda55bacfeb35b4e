"""Which globals a pickle may import: torch's weights-only allowlist, the user's ``allow_globals``, and a denylist.

:mod:`torchkeep.scan` judges every global a pickle imports by these tables. The allowlist is
torch's own (read from the installed torch, only when a pickle imports something), so the scan
and ``torch.load(weights_only=True)`` agree; :func:`check_allow_globals` / :func:`allowed_by`
add the classes a user names for one load. The *dangerous* table is defence in depth only: no
denylist can name every callable that runs code, so it never makes a file safe to unpickle.
"""

from __future__ import annotations

import re
import sys

from torchkeep.errors import ArgumentTypeError, InvalidArgumentError

__all__ = [
    "NUMPY_GLOBALS",
    "allowed_by",
    "check_allow_globals",
    "dangerous_reason",
    "numpy_dtype_problem",
    "numpy_dtype_state_problem",
    "numpy_loadable",
    "reached_through",
    "safe_globals",
]

_SHELL = "runs shell commands or touches the process"
_EVAL = "evaluates or compiles Python code"
_IMPORT = "imports arbitrary modules"
_ATTR = "reaches arbitrary attributes (a getattr chain)"
_CALL = "builds a deferred call to anything"
_NESTED = "nested deserializer: unpickles or loads more, unchecked, data"
_FILES = "reads, writes or deletes files"
_NET = "opens network connections"
_NATIVE = "loads or calls native code"
_JIT = "compiles or runs TorchScript / generated code"

#: Whole modules (and their submodules) nothing in a checkpoint needs.
_DANGEROUS_MODULES: dict[str, str] = {
    **dict.fromkeys(["os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "sys", "signal"], _SHELL),
    **dict.fromkeys(["multiprocessing", "_thread", "threading", "asyncio"], _SHELL),
    **dict.fromkeys(["importlib", "pkgutil", "pydoc", "zipimport"], _IMPORT),
    **dict.fromkeys(["runpy", "code", "codeop", "timeit", "cProfile", "profile", "pdb", "bdb", "trace"], _EVAL),
    **dict.fromkeys(["doctest", "idlelib", "venv", "ensurepip", "pip", "setuptools", "distutils"], _EVAL),
    **dict.fromkeys(["pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"], _NESTED),
    **dict.fromkeys(["shutil", "tempfile", "glob"], _FILES),
    **dict.fromkeys(["socket", "_socket", "ssl", "http", "urllib", "urllib2", "requests", "webbrowser"], _NET),
    **dict.fromkeys(["ftplib", "smtplib", "telnetlib", "xmlrpc", "aiohttp", "httplib"], _NET),
    **dict.fromkeys(["ctypes", "_ctypes", "cffi"], _NATIVE),
    "torch.hub": "downloads and runs code",
    "torch.jit": _JIT,
    "torch._dynamo": _JIT,
    "torch._inductor": _JIT,
    "torch.package": _JIT,
    "torch.utils.cpp_extension": _NATIVE,
    "numpy.testing": _EVAL,  # numpy.testing._private.utils.runstring is exec()
    "numpy.f2py": _NATIVE,
    "numpy.distutils": _NATIVE,
    "numpy.ctypeslib": _NATIVE,
    "antigravity": _NET,  # importing it opens a web browser
    "this": "prints on import",
    "platform": _SHELL,
    "commands": _SHELL,
    "popen2": _SHELL,
    "_io": _FILES,
    "io": _FILES,
    "fileinput": _FILES,
    "zipfile": _FILES,
    "tarfile": _FILES,
    "mmap": _FILES,
    "sqlite3": _FILES,
    "dbm": _FILES,
    "IPython": _EVAL,
    "jinja2": _EVAL,
    "torch.utils.collect_env": _SHELL,
    "torch.utils.benchmark": _EVAL,
    "torch.distributed.rpc": _NET,
}

#: Single names inside otherwise ordinary modules.
_DANGEROUS_NAMES: dict[str, str] = {
    **dict.fromkeys([f"builtins.{n}" for n in ("eval", "exec", "compile", "breakpoint", "input")], _EVAL),
    "builtins.__import__": _IMPORT,
    **dict.fromkeys([f"builtins.{n}" for n in ("getattr", "setattr", "delattr", "globals", "locals", "vars")], _ATTR),
    **dict.fromkeys(["builtins.open", "io.open", "_io.open", "io.FileIO", "_io.FileIO", "codecs.open"], _FILES),
    **dict.fromkeys(["builtins.exit", "builtins.quit"], _SHELL),
    **dict.fromkeys(["operator.attrgetter", "operator.itemgetter", "operator.methodcaller"], _ATTR),
    "operator.call": _CALL,
    "functools.partial": _CALL,
    "functools.reduce": _CALL,
    **dict.fromkeys(
        [f"types.{n}" for n in ("FunctionType", "LambdaType", "CodeType", "MethodType", "ModuleType")], _EVAL
    ),
    "torch.load": _NESTED,
    "torch.serialization.load": _NESTED,
    "torch.serialization._load": _NESTED,
    "torch.storage._load_from_bytes": _NESTED,
    "torch._C._import_ir_module": _JIT,
    "torch._C._import_ir_module_from_package": _JIT,
    "numpy.load": _NESTED,
    "numpy.loads": _NESTED,
    "numpy.lib.npyio.load": _NESTED,
    "numpy.lib._npyio_impl.load": _NESTED,
    "numpy.core.numeric.load": _NESTED,
    # callables outside the modules above that run commands, exec code or write files when called
    # with arguments from the file (found by trying them; the list can never be complete)
    "torch.utils.collect_env.run": _SHELL,
    "torch.utils.collect_env.run_and_read_all": _SHELL,
    "torch.utils.collect_env.run_and_parse_first_match": _SHELL,
    "torch.fx.graph_module.reduce_graph_module": _EVAL,
    "torch.fx.graph_module.reduce_package_graph_module": _EVAL,
    "torch.fx.graph_module._forward_from_src": _EVAL,
    "torch.fx.graph_module._exec_with_source": _EVAL,
    "torch.save": _FILES,
    "torch.serialization.save": _FILES,
    "torch._C._load_for_lite_interpreter": _JIT,
    "logging.config.dictConfig": _EVAL,
    "logging.config.fileConfig": _EVAL,
    "logging.config.listen": _NET,
    "logging.config.valueToStr": _EVAL,
    "uuid._get_command_stdout": _SHELL,
    "numpy.lib.format.read_array": _NESTED,
    "numpy.lib.format.read_array_header_1_0": _NESTED,
    "numpy.save": _FILES,
    "numpy.savez": _FILES,
    "numpy.fromfile": _FILES,
    "numpy.memmap": _FILES,
    "numpy.lib.format.open_memmap": _FILES,
    **dict.fromkeys(
        [
            f"pathlib.{c}.{m}"
            for c in ("Path", "PosixPath", "WindowsPath")
            for m in (
                "write_text",
                "write_bytes",
                "unlink",
                "rename",
                "replace",
                "rmdir",
                "touch",
                "mkdir",
                "symlink_to",
                "hardlink_to",
                "open",
                "chmod",
            )
        ],
        _FILES,
    ),
    "builtins.print": _FILES,
    "site.addsitedir": _IMPORT,
    "torch.cuda.memory._record_memory_history": _FILES,
    "torch.cuda.memory._dump_snapshot": _FILES,
    "antigravity.geohash": _NET,
}


def dangerous_reason(full_name: str) -> str | None:
    """Why ``"module.name"`` is dangerous in a checkpoint, or ``None`` when it is not on the explicit list.

    Example:
        >>> dangerous_reason("posix.system")
        'runs shell commands or touches the process'
        >>> dangerous_reason("collections.OrderedDict") is None
        True
    """
    if full_name in _DANGEROUS_NAMES:
        return _DANGEROUS_NAMES[full_name]
    parts = full_name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # longest module prefix first: torch.jit before torch
        reason = _DANGEROUS_MODULES.get(".".join(parts[:i]))
        if reason is not None:
            return reason
    return None


#: A bare module object reached as an attribute (``GLOBAL pathlib os``) is a foothold for BUILD/getattr.
_MODULE_OBJECTS = frozenset(
    {"os", "posix", "nt", "sys", "subprocess", "builtins", "__builtins__", "importlib", "ctypes", "pickle"}
    | {"marshal", "shutil", "socket", "runpy"}
)


def reached_through(qualname: str) -> str | None:
    """Dangerous things reached by attribute traversal inside the name: ``GLOBAL pathlib os.system``.

    Protocol 4 resolves dotted names attribute by attribute, so ``pathlib`` + ``os.system`` is
    ``os.system`` although the module is harmless. Every tail of a dotted name is checked.
    """
    parts = qualname.split(".")
    if len(parts) == 1:
        return f"the {qualname} module object itself" if qualname in _MODULE_OBJECTS else None
    for i in range(len(parts)):
        tail = ".".join(parts[i:])
        reason = dangerous_reason(tail) or (_DANGEROUS_MODULES.get(tail) if "." not in tail else None)
        if reason is None and parts[i] in _MODULE_OBJECTS:
            reason = f"reaches the {parts[i]} module through attribute access"
        if reason is None and parts[i].startswith("__") and parts[i] not in ("__init__", "__new__"):
            reason = f"reaches {parts[i]} through attribute access"
        if reason is not None:
            return reason
    return None


# --------------------------------------------------------------------------------------------- the allowlist

#: Used only when torch's own weights-only tables cannot be read (a torch without them).
_FALLBACK_ALLOWED = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.Size",
        "torch.device",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "_codecs.encode",
        "builtins.set",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
    }
)


def safe_globals() -> frozenset[str]:
    """The ``"module.name"`` globals ``torch.load(weights_only=True)`` accepts right now.

    Read from torch at call time (its built-in table plus anything registered with
    ``torch.serialization.add_safe_globals``), so the scan and torch agree; a small fixed set
    (plain containers, tensor rebuild functions, storages, dtypes) stands in on a torch too old
    to have those tables.

    Example:
        >>> "torch._utils._rebuild_tensor_v2" in safe_globals(), "posix.system" in safe_globals()
        (True, False)
    """
    names: set[str] = set()
    try:
        from torch import _weights_only_unpickler as wou

        names.update(wou._get_allowed_globals())
        names.update(wou._get_user_allowed_globals())
    except Exception:  # older or newer torch without these private helpers
        names.update(_FALLBACK_ALLOWED)
        try:
            import torch

            for attr in dir(torch):
                value = getattr(torch, attr, None)
                if isinstance(value, torch.dtype):
                    names.add(str(value))
                elif isinstance(value, type) and attr.endswith(("Storage", "Tensor")):
                    names.add(f"torch.{attr}")
        except Exception:
            pass
    try:
        import torch

        for entry in torch.serialization.get_safe_globals():
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
                names.add(entry[1])
            else:
                names.add(f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', '')}")
    except Exception:
        pass
    return frozenset(names)


# --------------------------------------------------------------------------------------------- NumPy arrays

#: The NumPy globals a ``torch.save`` of plain NumPy arrays and scalars imports (NumPy 1.x spells the
#: module ``numpy.core``, 2.x ``numpy._core``). ``torch.load(weights_only=True)`` refuses them all;
#: torchkeep's own load (:mod:`torchkeep.legacy`) accepts them, mapped to validating stand-ins, for
#: arrays and scalars of the plain dtypes below only. The scan judges them by the same rules.
NUMPY_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "numpy.ndarray",
        "builtins.bytes",  # only as bytes(): protocol 2 spells the empty data of an empty array so
    }
)
NUMPY_RECONSTRUCT = frozenset(n for n in NUMPY_GLOBALS if n.endswith("._reconstruct"))
NUMPY_SCALAR = frozenset(n for n in NUMPY_GLOBALS if n.endswith(".scalar"))

#: ``np.dtype.__reduce__`` spells a plain dtype as ``(np.dtype, (spec, False, True), state)``: these specs
#: are bool, signed/unsigned integers, floats and complex (what :mod:`torchkeep.tree` stores).
_PLAIN_SPEC = re.compile(r"(?:b1|[iu][1248]|f(?:2|4|8|12|16)|c(?:8|16|24|32))\Z")
_NOT_PLAIN = {
    "O": "object dtype: its elements are arbitrary Python objects",
    "V": "structured or void dtype (it may hold objects)",
    "M": "datetime dtype",
    "m": "timedelta dtype",
    "S": "bytes-string dtype",
    "U": "unicode-string dtype",
}
PLAIN_ONLY = "only arrays of bool, int, uint, float and complex dtypes load without trust_pickle=True"


def numpy_dtype_problem(args: object) -> str | None:
    """Why ``numpy.dtype(*args)`` from a pickle is not a plain dtype, or ``None`` when it is.

    Example:
        >>> numpy_dtype_problem(("u4", False, True)) is None
        True
        >>> numpy_dtype_problem(("O8", False, True)).startswith("object dtype")
        True
    """
    if type(args) is not tuple or len(args) != 3 or type(args[1]) is not bool or type(args[2]) is not bool:
        return "numpy.dtype called with arguments numpy's own pickles never use"
    spec = args[0]
    if type(spec) is not str:
        return "numpy.dtype called with a non-string (or unknown) type spec"
    if _PLAIN_SPEC.match(spec) is None:
        what = _NOT_PLAIN.get(spec[:1], "not a plain dtype")
        return f"{what} ({spec[:40]!r}); {PLAIN_ONLY}"
    return None


def numpy_dtype_state(spec: str, endian: object) -> tuple[object, ...] | None:
    """The one ``BUILD`` state ``np.dtype.__reduce__`` writes for a plain ``spec`` in byte order ``endian``.

    ``None`` when the byte order is not valid for that spec. Checked against NumPy in the tests.
    """
    one_byte = spec in ("b1", "i1", "u1")
    if endian not in (("|",) if one_byte else ("<", ">")):
        return None
    return (3, endian, None, None, None, -1, -1, 0)


def numpy_dtype_state_problem(spec: str, state: object) -> str | None:
    """Why a plain dtype's ``BUILD`` state is not the one NumPy writes for it, or ``None``."""
    if type(state) is not tuple or len(state) < 2:
        return "numpy.dtype built with a state numpy's own pickles never write"
    expected = numpy_dtype_state(spec, state[1])
    if expected is None or len(state) != len(expected):
        return "numpy.dtype built with a state numpy's own pickles never write"
    for got, want in zip(state, expected, strict=True):
        if type(got) is not type(want) or got != want:
            return "numpy.dtype built with a state numpy's own pickles never write (fields, flags or sizes)"
    return None


def numpy_loadable() -> bool:
    """Whether torchkeep's load can accept :data:`NUMPY_GLOBALS` with this torch (see :mod:`torchkeep.legacy`).

    It needs torch's ``_weights_only_unpickler._get_user_allowed_globals`` to scope its stand-ins;
    on a torch without it, NumPy arrays are refused by the load and reported unsafe by the scan.
    """
    try:
        from torch import _weights_only_unpickler as wou

        return callable(getattr(wou, "_get_user_allowed_globals", None))
    except Exception:
        return False


# --------------------------------------------------------------------------------------------- allow_globals

_WHOLE_REFUSED = frozenset({"torch", "numpy", "__builtin__", "torchvision", "transformers", "_pickle"})
_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\.\*)?\Z")


def check_allow_globals(patterns: object, argument: str = "allow_globals") -> tuple[str, ...]:
    """The validated ``allow_globals`` patterns: ``"pkg.mod.Class"`` or ``"pkg.mod.*"`` (everything under it).

    A pattern may not be a bare ``*``, a whole module of Python, torch or NumPy (``"os.*"``,
    ``"argparse.*"``, ``"torch.*"``), or name anything on the dangerous list: those need ``trust_pickle=True``, which says what it does.

    Raises:
        InvalidArgumentError: naming the pattern and what to pass instead.

    Example:
        >>> check_allow_globals(["argparse.Namespace", "mypkg.models.*"])
        ('argparse.Namespace', 'mypkg.models.*')
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not hasattr(patterns, "__iter__"):
        raise ArgumentTypeError(argument, patterns, 'a list of "module.Name" or "module.*" strings')
    out = []
    for p in patterns:  # type: ignore[attr-defined]
        if not isinstance(p, str):
            raise ArgumentTypeError(argument, p, 'a list of "module.Name" or "module.*" strings')
        if _PATTERN.match(p) is None or "." not in p:
            raise InvalidArgumentError(
                argument,
                p,
                'pass full names such as "argparse.Namespace", or "mypkg.models.*" for everything under a module',
            )
        base = p[:-2] if p.endswith(".*") else p
        why = dangerous_reason(base) or (dangerous_reason(base + ".x") if p.endswith(".*") else None)
        top = base.split(".")[0]
        if why is None and p.endswith(".*") and (top in sys.stdlib_module_names or top in _WHOLE_REFUSED):
            why = f"everything in {base}, part of Python, torch or NumPy"
        if why is not None:
            raise InvalidArgumentError(
                argument,
                p,
                f"it allows {why}; name the classes the file needs instead, "
                "or, if you trust the file completely, pass trust_pickle=True",
            )
        out.append(p)
    return tuple(out)


def allowed_by(patterns: tuple[str, ...], name: str) -> bool:
    """Whether ``"module.name"`` matches one of the (validated) ``allow_globals`` patterns.

    Example:
        >>> allowed_by(("mypkg.models.*",), "mypkg.models.net.Net"), allowed_by(("mypkg.models.*",), "mypkg.data.X")
        (True, False)
    """
    for p in patterns:
        if p.endswith(".*") and name.startswith(p[:-1]):
            return True
        if name == p:
            return True
    return False
