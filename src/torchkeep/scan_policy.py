"""Which globals a pickle may import: torch's weights-only allowlist, and the ones only malicious files need.

:mod:`torchkeep.scan` judges every global a pickle imports by these two tables. The allowlist
is torch's own (read from the installed torch, only when a pickle imports something), so the
scan and ``torch.load(weights_only=True)`` agree.
"""

from __future__ import annotations

__all__ = ["dangerous_reason", "reached_through", "safe_globals"]

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
