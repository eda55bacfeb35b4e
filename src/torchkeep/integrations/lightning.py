"""Lightning writes and resumes torchkeep checkpoints.

``Trainer(plugins=[TorchkeepCheckpointIO()])`` makes every checkpoint Lightning writes (through
``ModelCheckpoint``, ``trainer.save_checkpoint`` or on a signal) a torchkeep file: atomic,
checksummed, pickle-free; ``trainer.fit(model, ckpt_path=...)`` reads it back with
:func:`torchkeep.load` (every checksum verified) and resumes bit-exactly, global random
generators included (Lightning itself does not save them).

:class:`TorchkeepCallback` checks at ``on_fit_start`` that everything a checkpoint will hold can
be saved, so an unsavable hyperparameter fails before the first training step instead of at
the first checkpoint. :func:`load_lightning_module` replaces ``MyModule.load_from_checkpoint``
(which always calls ``torch.load``, whatever the Trainer's plugin).

Importing this module imports Lightning (``lightning``, or the standalone ``pytorch_lightning``
package); ``import torchkeep`` does not. Without either installed, importing it raises an
``ImportError`` that says ``pip install 'torchkeep[lightning]'``.

Example:
    >>> from torchkeep.integrations.lightning import TorchkeepCallback, TorchkeepCheckpointIO
    >>> plugins, callbacks = [TorchkeepCheckpointIO()], [TorchkeepCallback()]
    >>> # trainer = lightning.Trainer(plugins=plugins, callbacks=callbacks)
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from torchkeep.api import load, save
from torchkeep.errors import InvalidArgumentError, UnsupportedDtypeError, UnsupportedObjectError
from torchkeep.rng import RNGState
from torchkeep.tree import flatten

__all__ = ["RNG_KEY", "TorchkeepCallback", "TorchkeepCheckpointIO", "check_checkpoint", "load_lightning_module"]

INSTALL_HINT = "pip install 'torchkeep[lightning]'"

#: the checkpoint entry that holds the global random generators (Python, NumPy, torch, CUDA)
RNG_KEY = "torchkeep_rng"


def _import_lightning() -> tuple[Any, str]:
    """The Lightning package to build on: the one already imported, else ``lightning``, else
    ``pytorch_lightning`` (each has its own ``CheckpointIO`` class, and a Trainer accepts only
    plugins of its own package's)."""
    order = ["lightning.pytorch", "pytorch_lightning"]
    if "pytorch_lightning" in sys.modules and "lightning.pytorch" not in sys.modules:
        order.reverse()
    for name in order:
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
    raise ImportError(
        f"torchkeep.integrations.lightning needs Lightning (the lightning or pytorch_lightning package): {INSTALL_HINT}",
        name="lightning",
    )


_pl, _PL_NAME = _import_lightning()
_CheckpointIO = importlib.import_module(f"{_PL_NAME}.plugins.io").CheckpointIO
_Callback = _pl.Callback


def _local_path(path: Any, argument: str = "path") -> Any:
    """A local path (``file://`` stripped); an open binary file is passed through (``tk.load`` reads them)."""
    if hasattr(path, "read"):
        return path
    text = os.fspath(path)
    if "://" in text:
        if not text.startswith("file://"):
            raise InvalidArgumentError(
                argument,
                text,
                "TorchkeepCheckpointIO writes local files; for object stores save to a local directory "
                "and upload, or use tk.CheckpointManager with an fsspec URL.",
            )
        text = text[len("file://") :]
    return Path(text)


class TorchkeepCheckpointIO(_CheckpointIO):  # type: ignore[misc,valid-type]
    """A Lightning ``CheckpointIO`` that writes and reads torchkeep files.

    Args:
        rng: save the global random generators (Python ``random``, NumPy, torch CPU and CUDA)
            with each checkpoint and restore them when one is loaded, so that a resumed run
            draws the same dropout masks and shuffles as an uninterrupted one. Lightning does
            not save them itself.
        durable: fsync each file and its directory (``tk.save(durable=...)``).
        map_location: where loaded tensors go (``tk.load(map_location=...)``); CPU by default,
            Lightning moves model and optimizer state to the training device afterwards.
        metadata: JSON-serialisable metadata written into every checkpoint's header
            (``tk.open(path).metadata``).

    ``trainer.save_checkpoint(path, storage_options={"metadata": {...}})`` adds metadata to one
    checkpoint; ``durable`` is accepted there too.

    Example:
        >>> from torchkeep.integrations.lightning import TorchkeepCheckpointIO
        >>> io = TorchkeepCheckpointIO(metadata={"run": "exp1"})
        >>> # lightning.Trainer(plugins=[io])
    """

    def __init__(
        self,
        *,
        rng: bool = True,
        durable: bool = True,
        map_location: Any = "cpu",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.rng = rng
        self.durable = durable
        self.map_location = map_location
        self.metadata = dict(metadata or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write Lightning's checkpoint dict atomically to ``path`` (torchkeep format).

        Raises:
            UnsupportedObjectError: a value cannot be saved without pickle (its place in the
                checkpoint is named); nothing is written.
        """
        options = dict(storage_options or {})
        unknown = set(options) - {"metadata", "durable"}
        if unknown:
            raise InvalidArgumentError(
                "storage_options",
                options,
                f"TorchkeepCheckpointIO accepts only 'metadata' and 'durable' there, not {sorted(unknown)}.",
            )
        tree = checkpoint
        if self.rng and RNG_KEY not in checkpoint:
            tree = {**checkpoint, RNG_KEY: RNGState().state_dict()}
        metadata = {**self.metadata, **(options.get("metadata") or {})}
        save(
            tree,
            _local_path(path),
            metadata=metadata or None,
            durable=options.get("durable", self.durable),
        )

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Read a checkpoint with :func:`torchkeep.load` (checksums verified, nothing unpickled).

        ``weights_only`` is accepted and ignored: torchkeep files never run code when loaded.
        Older ``torch.save`` checkpoints load too, through ``tk.load``'s allowlist unpickler.
        The random generators saved with the checkpoint are restored (``rng=True``).
        """
        checkpoint = load(_local_path(path), map_location=self.map_location if map_location is None else map_location)
        rng = checkpoint.pop(RNG_KEY, None) if isinstance(checkpoint, dict) else None
        if rng is not None and self.rng:
            RNGState().load_state_dict(rng)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint (a file, or a directory); a missing one is not an error."""
        p = _local_path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _checkpoint_parts(trainer: Any) -> dict[str, Any]:
    """What Lightning's ``dump_checkpoint`` will put in a full checkpoint, from public APIs,
    without calling any ``on_save_checkpoint`` hook."""
    module = trainer.lightning_module
    datamodule = getattr(trainer, "datamodule", None)
    strategy = trainer.strategy
    parts: dict[str, Any] = {"state_dict": strategy.lightning_module_state_dict()}
    parts["loops"] = {"fit_loop": trainer.fit_loop.state_dict()}
    parts["callbacks"] = {cb.state_key: cb.state_dict() for cb in trainer.callbacks}
    parts["optimizer_states"] = [strategy.optimizer_state(opt) for opt in trainer.optimizers]
    parts["lr_schedulers"] = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    precision = trainer.precision_plugin
    parts[type(precision).__qualname__] = precision.state_dict()
    for owner in (module, datamodule):
        hparams = getattr(owner, "hparams", None) if owner is not None else None
        if hparams:
            parts.setdefault("hyper_parameters", {}).update(dict(hparams))
    if datamodule is not None:
        parts[type(datamodule).__qualname__] = datamodule.state_dict()
    return parts


def check_checkpoint(trainer: Any) -> None:
    """Raise now if a checkpoint of this run could not be saved: hyperparameters, model state,
    callbacks' states, optimizers, schedulers, loops and precision plugin are flattened
    (nothing is written, no tensor is copied).

    Raises:
        UnsupportedObjectError: naming the value's place in the checkpoint, e.g.
            ``hyper_parameters.loss_fn``.
        UnsupportedDtypeError: a tensor of a dtype safetensors cannot hold.

    Example::

        trainer = L.Trainer(plugins=[TorchkeepCheckpointIO()])
        trainer.strategy.connect(model)  # what fit() does first; TorchkeepCallback calls this at fit start
        check_checkpoint(trainer)
    """
    for key, part in _checkpoint_parts(trainer).items():
        try:
            flatten({key: part})
        except (UnsupportedObjectError, UnsupportedDtypeError) as e:
            fix = (
                "Leave it out of the checkpoint with self.save_hyperparameters(ignore=[...]), or pass plain values."
                if key == "hyper_parameters"
                else "Make that state plain data (tensors, numbers, strings, lists, dicts)."
            )
            e.args = (
                f"{e} Every Lightning checkpoint of this run would hold this value, so TorchkeepCallback stopped the "
                f"run at fit start, before any training step. {fix}",
            )
            raise


class TorchkeepCallback(_Callback):  # type: ignore[misc,valid-type]
    """Fails fast: at ``on_fit_start`` every part of a future checkpoint is checked with a dry-run
    flatten (:func:`check_checkpoint`), so an unsavable value is reported, with its place in
    the checkpoint, before training starts instead of after the first epoch.

    It also records the random generators in each checkpoint as it is assembled
    (``on_save_checkpoint``), which keeps them exact when the plugin writes later (e.g. wrapped in
    Lightning's ``AsyncCheckpointIO``).

    Example:
        >>> from torchkeep.integrations.lightning import TorchkeepCallback
        >>> cb = TorchkeepCallback()
        >>> # lightning.Trainer(plugins=[TorchkeepCheckpointIO()], callbacks=[cb])
    """

    def __init__(self, *, rng: bool = True) -> None:
        super().__init__()
        self.rng = rng

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        check_checkpoint(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.rng:
            checkpoint[RNG_KEY] = RNGState().state_dict()


def load_lightning_module(
    cls: type,
    path: Any,
    *,
    map_location: Any = "cpu",
    strict: bool | None = None,
    **overrides: Any,
) -> Any:
    """Build ``cls`` from a torchkeep Lightning checkpoint: the pickle-free
    ``cls.load_from_checkpoint(path, **overrides)``.

    The module is constructed from the saved ``hyper_parameters`` (updated with ``overrides``),
    exactly as Lightning does it (``configure_model`` and ``on_load_checkpoint`` are called,
    ``strict`` as in ``load_from_checkpoint``), and its ``state_dict`` is loaded. Also works for a
    ``LightningDataModule`` (hyperparameters and its saved state).

    Args:
        cls: the ``LightningModule`` (or ``LightningDataModule``) subclass.
        path: a checkpoint written through :class:`TorchkeepCheckpointIO` (or an open binary file of one).
        map_location: where the tensors go (``tk.load(map_location=...)``).
        strict: as in ``load_from_checkpoint``; the module's ``strict_loading`` by default.
        overrides: hyperparameters that replace the saved ones.

    Example:
        >>> from torchkeep.integrations.lightning import load_lightning_module
        >>> # model = load_lightning_module(MyModule, "checkpoints/last.ckpt", lr=1e-4)
    """
    saving = importlib.import_module(f"{_PL_NAME}.core.saving")
    checkpoint = load(_local_path(path), map_location=map_location)
    checkpoint.pop(RNG_KEY, None)
    hparams_key = cls.CHECKPOINT_HYPER_PARAMS_KEY  # type: ignore[attr-defined]
    checkpoint.setdefault(hparams_key, {})
    checkpoint[hparams_key].update(overrides)
    if issubclass(cls, _pl.LightningDataModule):
        return saving._load_state(cls, checkpoint, **overrides)
    model = saving._load_state(cls, checkpoint, strict=strict, **overrides)
    state_dict = checkpoint.get("state_dict") or {}
    tensor = next((t for t in state_dict.values() if hasattr(t, "device")), None)
    return model.to(tensor.device) if tensor is not None else model
