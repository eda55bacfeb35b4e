"""The torchkeep exception tree.

Every error derives from :class:`TorchkeepError` *and* from the built-in exception a
caller would naturally catch (``KeyError``, ``ValueError``, ``TypeError``, ...), so
existing ``except`` clauses keep working. Each carries its data as attributes and its
message says what to do next.

Example:
    >>> import torchkeep as tk
    >>> try:
    ...     tk.load("missing.safetensors")
    ... except tk.errors.TorchkeepError as e:
    ...     print(type(e).__name__)
    CheckpointNotFoundError
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "AmbiguousCheckpointError",
    "ArgumentTypeError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "ConversionError",
    "CorruptCheckpointError",
    "DeviceUnavailableError",
    "DistributedManagerError",
    "DistributedSaveError",
    "DtypeMismatchError",
    "ExportError",
    "ExportUnavailableError",
    "ExportVerificationError",
    "FileChecksumError",
    "FilenameTemplateError",
    "InsufficientSpaceError",
    "InvalidArgumentError",
    "KeyMismatchError",
    "ManagerClosedError",
    "MissingFilenameFieldError",
    "MissingShardError",
    "ModelVersionError",
    "TargetExistsError",
    "TargetIsDirectoryError",
    "TooFewMatchesError",
    "TorchkeepError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "UnsupportedDtypeError",
    "UnsupportedObjectError",
    "UnsupportedSourceError",
    "UnverifiedCheckpointError",
    "format_names",
]


def format_names(names: Iterable[str], limit: int = 10) -> str:
    """Sorted, comma-separated names, at most ``limit`` of them, with a count of the rest."""
    items = sorted(str(n) for n in names)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


class TorchkeepError(Exception):
    """Root of every error torchkeep raises."""

    def __str__(self) -> str:  # KeyError quotes its message; we never want that
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """The path does not exist."""

    def __init__(self, path: str | Path, hint: str = "") -> None:
        self.path = str(path)
        super().__init__(
            f"{self.path}: no such checkpoint file. "
            + (hint or "Check the path (cwd-relative paths are resolved from the current directory).")
        )


class CorruptCheckpointError(TorchkeepError, ValueError):
    """The file is not a readable checkpoint: truncated, empty, bad header, bad offsets."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{self.path}: corrupt or not a checkpoint: {reason}. "
            "Restore it from a backup or re-save it; `torchkeep verify FILE` checks a file without loading it."
        )


class ChecksumMismatchError(CorruptCheckpointError):
    """Stored bytes do not match their recorded checksum (a flipped bit, a torn write).

    Attributes:
        path: the file.
        key: the tensor name whose data is damaged, or ``"<header>"``.
    """

    def __init__(self, path: str | Path, key: str, expected: str = "", actual: str = "", *, detail: str = "") -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        what = "the header" if key == "<header>" else f"tensor {key!r}"
        if expected:
            detail = f" (expected {expected}, got {actual})"
        elif detail:
            detail = f" ({detail})"
        super().__init__(path, f"checksum mismatch in {what}{detail}")
        fix = (
            "Use an earlier checkpoint: without an intact header nothing in the file can be located."
            if key == "<header>"
            else "Use an earlier checkpoint, or pass verify=False to read it anyway at your own risk."
        )
        self.args = (
            f"{self.path}: checksum mismatch in {what}{detail}: the file was damaged. Nothing was loaded. {fix}",
        )


class UnsupportedDtypeError(TorchkeepError, TypeError):
    """A tensor's dtype cannot be stored in a safetensors file."""

    def __init__(self, path: str, dtype: Any) -> None:
        self.path = path
        self.dtype = dtype
        super().__init__(
            f"{path}: dtype {dtype} cannot be stored in a safetensors file. "
            f"Convert it first, e.g. tensor.to(torch.float32), or store its integer representation."
        )


class UnsupportedObjectError(TorchkeepError, TypeError):
    """A leaf of the state tree is neither data nor Stateful, so it cannot be saved without pickle."""

    def __init__(self, path: str, obj: Any, hint: str = "") -> None:
        self.path = path
        self.obj_type = type(obj).__name__
        what = getattr(obj, "__qualname__", None) if callable(obj) else None
        if what:
            shown = what if what.startswith("<") else f"<{what}>"
        else:
            shown = f"object of type {type(obj).__module__}.{type(obj).__qualname__}"
        hint = hint or (
            "Saved trees hold tensors, numbers, strings, bools, None, dtypes, devices, lists/tuples/dicts "
            "and objects with state_dict()/load_state_dict(). Remove it from the tree or give it those two methods."
        )
        super().__init__(f"{path or '<root>'}: cannot save {shown}. {hint}")


class UnsafeCheckpointError(TorchkeepError, RuntimeError):
    """A pickle-based file needs more than plain weights to load: loading it could run code."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{self.path}: refused to unpickle: {reason}. Loading it could run arbitrary code. "
            "If, and only if, you trust where this file came from, pass trust_pickle=True; "
            "then convert it once with tk.save(tk.load(path, trust_pickle=True), 'model.safetensors')."
        )


class KeyMismatchError(TorchkeepError, KeyError):
    """Keys in a checkpoint and in a target do not match.

    Attributes:
        missing: keys the target needs that the checkpoint lacks.
        unexpected: keys the checkpoint has that the target lacks.
        mismatched: ``(key, checkpoint_shape, target_shape)`` triples.
    """

    def __init__(
        self,
        where: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, Any, Any]] = (),
        fix: str = "",
    ) -> None:
        self.where, self.missing, self.unexpected = where, sorted(missing), sorted(unexpected)
        self.mismatched = sorted(mismatched, key=lambda m: m[0])
        lines = [f"{where}: checkpoint and target do not match"]
        if self.missing:
            lines.append(f"  missing in checkpoint ({len(self.missing)}): {format_names(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in checkpoint ({len(self.unexpected)}): {format_names(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched[:10]]
            more = f", ... ({len(self.mismatched) - 10} more)" if len(self.mismatched) > 10 else ""
            lines.append(f"  shape mismatch, checkpoint vs target ({len(self.mismatched)}): {', '.join(shown)}{more}")
        if fix:
            lines.append(f"  fix: {fix}")
        super().__init__("\n".join(lines))


class TooFewMatchesError(KeyMismatchError):
    """A load would fill fewer tensors than ``min_matched`` (often none): the names do not correspond.
    Also carries ``matched`` (tensors it would fill) and ``needed``."""


class DeviceUnavailableError(TorchkeepError, RuntimeError):
    """A tensor cannot be placed on the requested device (e.g. saved on CUDA, no GPU here)."""

    def __init__(self, path: str | Path, saved_device: str, map_location: Any, reason: str) -> None:
        self.path, self.saved_device, self.map_location = str(path), saved_device, map_location
        super().__init__(
            f"{self.path}: cannot place a tensor saved on {saved_device} with map_location={map_location!r}: "
            f"{reason}. Pass map_location='cpu' (the default) or a device this machine has."
        )


class AmbiguousCheckpointError(TorchkeepError, KeyError):
    """Several state dicts inside a checkpoint could be the weights, and none fits the model best.

    Attributes:
        source: the checkpoint (a path or ``"<memory>"``).
        candidates: the dotted keys of the plausible state dicts (``""`` is the top level).
    """

    def __init__(self, source: str, candidates: Iterable[str]) -> None:
        self.source = source
        self.candidates = sorted(candidates)
        shown = format_names(repr(c) for c in self.candidates)
        pick = self.candidates[0] if self.candidates else "model"
        super().__init__(
            f"{source}: holds several state dicts that fit the model equally well: {shown}. "
            f"Pick one with key=, e.g. load_into(model, source, key={pick!r})."
        )


class MissingShardError(TorchkeepError, FileNotFoundError):
    """A sharded checkpoint's index names shard files that do not exist.

    Attributes:
        index: the ``*.index.json`` file.
        missing: the shard file names that are absent.
    """

    def __init__(self, index: str | Path, missing: Iterable[str]) -> None:
        self.index = str(index)
        self.missing = sorted(missing)
        super().__init__(
            f"{self.index}: {len(self.missing)} shard file(s) listed in the index are missing: "
            f"{format_names(self.missing)}. Download or copy them next to the index; nothing was loaded."
        )


class DtypeMismatchError(TorchkeepError, TypeError):
    """Checkpoint tensors have other dtypes than the model's and ``dtype_policy="error"`` was asked for.

    Attributes:
        mismatched: ``(key, checkpoint_dtype, model_dtype)`` triples, as strings.
    """

    def __init__(self, where: str, mismatched: Iterable[tuple[str, str, str]]) -> None:
        self.where = where
        self.mismatched = sorted(mismatched)
        shown = ", ".join(f"{k} {a} -> {b}" for k, a, b in self.mismatched[:10])
        more = f", ... ({len(self.mismatched) - 10} more)" if len(self.mismatched) > 10 else ""
        super().__init__(
            f"{where}: {len(self.mismatched)} tensor(s) have another dtype than the model: {shown}{more}. "
            'Nothing was loaded. Pass dtype_policy="cast" to convert them to the model\'s dtypes, '
            "or convert the model first (e.g. model.half())."
        )


class InvalidArgumentError(TorchkeepError, ValueError):
    """An argument has a value the call cannot use; the message names the argument and what to pass.

    Attributes:
        argument: the keyword (or positional name) at fault.
        value: what was passed.

    Example:
        >>> str(InvalidArgumentError("keep_last", -1, "pass a count of 0 or more"))
        'keep_last=-1: pass a count of 0 or more'
    """

    def __init__(self, argument: str, value: Any, fix: str) -> None:
        self.argument = argument
        self.value = value
        super().__init__(f"{argument}={_short(value)}: {fix}")


class ArgumentTypeError(TorchkeepError, TypeError):
    """An argument has a type the call cannot use; the message names the argument and the accepted types.

    Example:
        >>> str(ArgumentTypeError("path", 42, "a path (a str or os.PathLike)"))
        'path must be a path (a str or os.PathLike), not int'
    """

    def __init__(self, argument: str, value: Any, expected: str) -> None:
        self.argument = argument
        self.value = value
        super().__init__(f"{argument} must be {expected}, not {type(value).__name__}")


class UnsupportedSourceError(TorchkeepError, ValueError):
    """A healthy checkpoint of a kind this operation cannot serve (never "corrupt" for it).

    Attributes:
        path: the file or directory.
        kind: the kind detected from its content (``"torchkeep"``, ``"safetensors"``,
            ``"sharded"``, ``"torch.save (zip)"``, ``"torch.distributed.checkpoint"``, ...).
        operation: what was asked (``"load_model"``, ``"export"``, ...).

    Example:
        >>> e = UnsupportedSourceError("old.pth", "torch.save (zip)", "load_model", "build the model and load_into it")
        >>> e.kind, isinstance(e, ValueError)
        ('torch.save (zip)', True)
    """

    def __init__(self, path: str | Path, kind: str, operation: str, fix: str) -> None:
        self.path = str(path)
        self.kind = kind
        self.operation = operation
        super().__init__(f"{self.path}: a {kind} checkpoint, which {operation} cannot use: {fix}")


class TargetIsDirectoryError(TorchkeepError, IsADirectoryError):
    """A file was to be written where a directory is.

    Example:
        >>> str(TargetIsDirectoryError("runs", "runs/ckpt.safetensors"))
        'runs: is a directory; give a file name such as runs/ckpt.safetensors'
    """

    def __init__(self, path: str | Path, suggestion: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: is a directory; give a file name such as {suggestion}")


class TargetExistsError(TorchkeepError, FileExistsError):
    """Something that a save must not replace is where it would write (a file where a checkpoint
    directory goes, a directory that is not a checkpoint).

    Attributes:
        path: the target.

    Example:
        >>> isinstance(TargetExistsError("ck", "a file is there", "pick another path"), FileExistsError)
        True
    """

    def __init__(self, path: str | Path, what: str, fix: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {what}. {fix}")


class ManagerClosedError(TorchkeepError, RuntimeError):
    """A :class:`~torchkeep.CheckpointManager` was used after ``close()`` (or after its ``with`` block).

    Attributes:
        directory: the run directory.

    Example:
        >>> isinstance(ManagerClosedError("runs/a", "save"), RuntimeError)
        True
    """

    def __init__(self, directory: str | Path, action: str = "") -> None:
        self.directory = str(directory)
        what = f"cannot {action}: " if action else ""
        super().__init__(
            f"{self.directory}: {what}this CheckpointManager is closed. Open a new one on the same directory, "
            f"e.g. tk.CheckpointManager({self.directory!r}), or call it inside the `with` block."
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConversionError(TorchkeepError, ValueError):
    """``convert`` cannot do what was asked: the output would overwrite the input, an unknown
    format, a bad shard size, or weights it cannot find. The message says what to pass instead."""


class UnknownModelError(TorchkeepError, KeyError):
    """``load_model`` cannot find the class a model file names, or ``save_model`` got an unregistered class.

    Attributes:
        name: the registry name (or class path) asked for.
        registered: the names registered in this process, sorted.
        class_path: the ``module.QualName`` recorded in the file, if any.
    """

    def __init__(
        self,
        name: str,
        registered: Iterable[str] = (),
        *,
        class_path: str | None = None,
        tried_import: bool = False,
        detail: str = "",
    ) -> None:
        self.name = name
        self.registered = sorted(registered)
        self.class_path = class_path
        known = format_names(self.registered) if self.registered else "none"
        if detail:
            head = detail
        else:
            head = f"no model class registered as {name!r}"
            if class_path:
                head += f" (saved from {class_path})"
        fix = (
            "import the module that defines it (its @torchkeep.register_model decorator registers it), "
            "install a package that declares it in the 'torchkeep.models' entry-point group"
        )
        if class_path and not tried_import:
            fix += f", or pass allow_import=True to import {class_path} (runs that module's code)"
        super().__init__(f"{head}. Registered models: {known}. To fix: {fix}.")


class ModelVersionError(TorchkeepError, ValueError):
    """A model file was saved by a newer version of its class than the one registered here.

    Attributes:
        name: the registry name.
        file_version: the version recorded in the file.
        registered_version: the version of the class registered in this process.
    """

    def __init__(self, name: str, file_version: int, registered_version: int, path: str = "") -> None:
        self.name = name
        self.file_version = file_version
        self.registered_version = registered_version
        where = f"{path}: " if path else ""
        super().__init__(
            f"{where}model {name!r} was saved by version {file_version} of its class, but version "
            f"{registered_version} is registered here, which cannot know that layout. Upgrade the package that "
            f"defines {name!r} to version {file_version} or later."
        )


class InsufficientSpaceError(TorchkeepError, OSError):
    """A checkpoint does not fit on the disk: found before writing, or the write hit ENOSPC/EFBIG.

    Attributes:
        directory: where the checkpoint was to be written.
        needed: bytes the checkpoint needs (estimate: tensor bytes plus a header estimate).
        available: bytes free for this user when checked (``-1`` when unknown).
        errno: ``ENOSPC``, or the errno of the failed write (``EFBIG`` for a file-size limit).
    """

    def __init__(self, directory: str | Path, needed: int, available: int, *, err: int = 28, detail: str = "") -> None:
        self.directory = str(directory)
        self.needed = int(needed)
        self.available = int(available)
        avail = f"{self.available} bytes available" if self.available >= 0 else "available space unknown"
        what = f"the write failed ({detail})" if detail else "not enough free space"
        super().__init__(
            f"{self.directory}: cannot write a checkpoint of about {self.needed} bytes: {what}; {avail}. "
            "Nothing was written and earlier checkpoints are intact. Free space there, lower keep_last/keep_best, "
            "or point the CheckpointManager at another directory."
        )
        self.errno = err
        self.strerror = str(self)


class CheckpointLockedError(TorchkeepError, RuntimeError):
    """Another process (or manager) holds the run directory's lock file.

    Attributes:
        directory: the run directory.
        pid: the process id recorded in the lock file (``None`` when unreadable).
    """

    def __init__(self, directory: str | Path, pid: int | None, *, host: str | None = None) -> None:
        self.directory = str(directory)
        self.pid = pid
        self.host = host
        holder = f"process {pid}" if pid is not None else "another process"
        if host is None:
            stale = "A lock left by a dead process is released by the OS and taken over automatically."
        else:  # an object store has no lock the OS could release
            holder += f" on host {host}"
            stale = (
                "A lock left by a dead process on this host is taken over automatically; "
                f"if that process on {host} is gone, delete {self.directory.rstrip('/')}/.lock."
            )
        super().__init__(
            f"{self.directory}: locked by {holder} (.lock), which is writing checkpoints there. "
            f"Close that CheckpointManager (mgr.close()) or stop that process, or use another directory. {stale}"
        )


class MissingFilenameFieldError(TorchkeepError, KeyError):
    """A filename template names a field that ``step``, ``metrics`` and ``context`` do not provide.

    Attributes:
        template: the template.
        missing: the field names not found.
        available: the names that were available.
    """

    def __init__(self, template: str, missing: Iterable[str], available: Iterable[str]) -> None:
        self.template = template
        self.missing = sorted(missing)
        self.available = sorted(available)
        super().__init__(
            f"filename template {template!r} needs {format_names(self.missing)}, which neither step, metrics nor "
            f"context provide. Available: {format_names(self.available) or 'none'}. "
            f"Pass them, e.g. mgr.save(state, step=..., context={{{self.missing[0]!r}: ...}})."
        )


class FilenameTemplateError(TorchkeepError, ValueError):
    """A filename template is malformed, or a value does not fit its format spec."""


class ExportError(TorchkeepError, RuntimeError):
    """The exporter could not turn the model into the requested format; nothing was written.

    Attributes:
        format: ``"onnx"``, ``"torchscript"``, ``"torch.export"`` or ``"tensorrt"``.
        reason: the exporter's own first line of explanation; ``hint``: what to do about it.
        path: the artifact that was not written (``None`` when not known yet).
        details / log: everything the exporter printed and its full error, and the file holding them ("" if none).
    """

    def __init__(
        self, format: str, reason: str, hint: str = "", *, path: Any = None, details: str = "", log: str = ""
    ) -> None:
        self.format, self.reason, self.hint, self.details, self.log = format, reason, hint, details, log
        self.path = None if path is None else str(path)
        where = f"{self.path}: " if self.path else ""
        hint = hint or "Try another format (.pt2 for torch.export, .onnx), or see the exporter's output for the cause."
        more = f" The exporter's full output is in {log}." if log else ""
        super().__init__(f"{where}export to {format} failed: {reason.rstrip('.')}. Nothing was written. {hint}{more}")


class ExportUnavailableError(TorchkeepError, ImportError):
    """An export format needs a package (or a device) this machine does not have.

    Attributes:
        format: the requested format.
        missing: what is missing (package names, or ``"an NVIDIA GPU with CUDA"``).
        install: the command that installs what is missing, if a package.
    """

    def __init__(self, format: str, missing: Iterable[str], install: str = "", note: str = "") -> None:
        self.format = format
        self.missing = sorted(missing)
        self.install = install
        todo = f" Install it with: {install}." if install else ""
        super().__init__(
            f"export to {format} is unavailable here: needs {format_names(self.missing)}.{todo}"
            f"{' ' + note if note else ''} Nothing was written."
        )


class ExportVerificationError(TorchkeepError, RuntimeError):
    """An exported artifact does not compute what the eager model computes.

    The artifact is left at ``path`` for inspection; do not ship it.

    Attributes:
        path: the artifact.
        report: the :class:`~torchkeep.export.ExportReport` with every check's numbers.
        failures: ``(check, output, max_abs_error, max_rel_error, reason)`` tuples of the failed outputs.
    """

    def __init__(self, path: str | Path, report: Any, failures: Iterable[tuple[str, str, float, float, str]]) -> None:
        self.path = str(path)
        self.report = report
        self.failures = list(failures)
        shown = "; ".join(
            f"{check}: output {out!r} {why} (max abs error {a:.3g}, max rel error {r:.3g})"
            for check, out, a, r, why in self.failures[:5]
        )
        more = f"; ... ({len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(
            f"{self.path}: the exported model does not match the eager model: {shown}{more} "
            f"({self._tolerances(report)}). The artifact was kept there for inspection; do not ship it. "
            "A value-dependent Python branch frozen by tracing, a size baked in, or an operator the runtime computes "
            "differently are the usual causes: pass method='script' or export to another format (torch.export .pt2), "
            "or set rtol= and set atol= looser if the differences are expected (e.g. float16)."
        )

    @staticmethod
    def _tolerances(report: Any) -> str:
        """The tolerances the failed outputs of an export report were compared with, e.g. ``rtol=0.0001, atol=1e-05``."""
        pairs: dict[tuple[Any, Any], list[str]] = {}
        for check in getattr(report, "checks", None) or []:
            for out in check.outputs:
                if not out.ok and getattr(out, "rtol", None) is not None:
                    pairs.setdefault((out.rtol, out.atol), []).append(out.name)
        if not pairs:
            rtol, atol = getattr(report, "rtol", None), getattr(report, "atol", None)
            if rtol is None and atol is None:
                return "default tolerances per dtype"
            return f"rtol={rtol}, atol={atol}"
        if len(pairs) == 1:
            ((rtol, atol),) = pairs
            return f"rtol={rtol:g}, atol={atol:g}"
        return "; ".join(
            f"{', '.join(dict.fromkeys(names))}: rtol={rtol:g}, atol={atol:g}" for (rtol, atol), names in pairs.items()
        )


class FileChecksumError(ChecksumMismatchError):
    """A file of a distributed checkpoint does not match the digest its manifest records.

    Attributes:
        path: the damaged file; ``key`` is its name inside the checkpoint directory.
    """

    def __init__(self, path: str | Path, expected: str, actual: str) -> None:
        super().__init__(path, Path(path).name, expected, actual)
        self.args = (
            f"{self.path}: does not match the checksum in the checkpoint's manifest (expected {expected}, "
            f"got {actual}): the file was damaged or rewritten after the save. Nothing was loaded. "
            "Use an earlier checkpoint, or pass verify=False to read it anyway at your own risk.",
        )


class UnverifiedCheckpointError(UnsafeCheckpointError):
    """A ``torch.distributed.checkpoint`` directory has no valid torchkeep manifest."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, reason)
        self.args = (
            f"{self.path}: refused: {reason}. DCP's .metadata is a pickle (loading it can run code) and DCP "
            "overwrites data files in place, so without the manifest torchkeep writes last nothing shows that "
            "this directory is complete and untouched. Save checkpoints with torchkeep.distributed.save; "
            "if, and only if, you trust this directory, pass trust_pickle=True.",
        )


class DistributedSaveError(TorchkeepError, RuntimeError):
    """A distributed save failed on some rank, so nothing was committed.

    Attributes:
        path: the checkpoint that was not written.
        rank: the rank that reported the failure (``-1`` when unknown).
    """

    def __init__(self, path: str | Path, rank: int, reason: str) -> None:
        self.path = str(path)
        self.rank = rank
        who = f"rank {rank}" if rank >= 0 else "a rank"
        super().__init__(
            f"{self.path}: the distributed save failed on {who}: {reason}. Nothing was committed; an earlier "
            "checkpoint at this path is intact. Fix the cause on that rank (its own traceback has the details) "
            "and save again."
        )


class CheckpointExistsError(TorchkeepError, FileExistsError):
    """A committed checkpoint already exists where a save would write, and it is not replaced in place.

    Attributes:
        path: the checkpoint location (a URL prefix on object storage).
    """

    def __init__(self, path: str | Path, reason: str = "") -> None:
        self.path = str(path)
        super().__init__(
            f"{self.path}: a committed checkpoint already exists here{': ' + reason if reason else ''}. "
            "Object stores have no atomic rename, so rewriting its files under its manifest could leave a "
            "checkpoint that is neither the old one nor the new one. Save to a new prefix (e.g. one per step), "
            "or delete this one first."
        )


class DistributedManagerError(TorchkeepError, RuntimeError):
    """A CheckpointManager step that rank 0 does for every rank of a distributed run failed there.

    Raised on the other ranks (rank 0 raises the original error), so that every rank stops
    together instead of waiting for each other.

    Attributes:
        path: the run directory.
        rank: the rank that failed (0).
        action: what failed (``"open"``, ``"save"``, ``"prune"``, ...).
    """

    def __init__(self, path: str | Path, rank: int, action: str, reason: str) -> None:
        self.path = str(path)
        self.rank = rank
        self.action = action
        super().__init__(
            f"{self.path}: CheckpointManager {action} failed on rank {rank}: {reason}. Every rank raises this "
            f"error; rank {rank}'s own traceback has the details. Fix the cause there and retry on every rank."
        )
