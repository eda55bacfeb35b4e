"""Accelerate: ``save_state`` / ``load_state`` that write one checksummed torchkeep file.

``accelerator.save_state(dir)`` writes the weights as safetensors but the optimizers,
schedulers, scaler, RNG states and every ``register_for_checkpointing`` object as pickles
(``optimizer.bin``, ``random_states_0.pkl``, ``custom_checkpoint_0.pkl``...). Its
``register_save_state_pre_hook`` only reaches the model weights, so the whole state cannot be
rerouted through hooks. These two functions save the same state through the accelerator's
prepared objects as one torchkeep file instead:

    from torchkeep.integrations.accelerate import save_state, load_state

    save_state(accelerator, "ckpt/step_1000", extra={"epoch": epoch})
    ...
    got = load_state(accelerator, "ckpt/step_1000")   # also reads a stock save_state folder
    epoch = got["extra"]["epoch"]

Accelerate is only imported when a function runs (``import torchkeep`` never imports it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from torchkeep.api import load, restore, save
from torchkeep.errors import CheckpointNotFoundError, InvalidArgumentError
from torchkeep.loading import load_into
from torchkeep.rng import RNGState, set_global_states

__all__ = ["RNG_FILE", "STATE_FILE", "load_state", "loader_state", "save_state"]

STATE_FILE = "torchkeep-state.safetensors"
"""The file :func:`save_state` writes in its folder (the main process's)."""
RNG_FILE = "torchkeep-rng-{rank}.safetensors"
"""With more than one process, each writes its own RNG state here."""

_UNSUPPORTED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


class _LoaderState:
    """The resumable state of one prepared dataloader, as a Stateful leaf.

    A ``DataLoaderShard`` has ``state_dict``/``load_state_dict`` methods, but they only work
    with ``use_stateful_dataloader=True`` (torchdata): on a plain ``DataLoader`` the
    ``dl_state_dict`` attribute they read is never set and ``state_dict()`` raises
    ``AttributeError``. This adapter saves what a resume needs in every case: the epoch counter
    (``iteration``, which sets a seedable sampler's epoch), the sampler's own generator and seed,
    and the torchdata state when there is one.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def _sampler(self) -> Any:
        get = getattr(self.loader, "get_sampler", None)
        return get() if callable(get) else getattr(self.loader, "sampler", None)

    def state_dict(self) -> dict[str, Any]:
        sampler = self._sampler()
        generator = getattr(sampler, "generator", None)
        state: dict[str, Any] = {
            "iteration": int(getattr(self.loader, "iteration", 0)),
            "sampler_epoch": getattr(sampler, "epoch", None),
            "sampler_seed": getattr(sampler, "initial_seed", None),
            "generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
            "loader": None,
        }
        if getattr(self.loader, "use_stateful_dataloader", False):
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.loader, "iteration"):
            self.loader.iteration = int(state["iteration"])
        sampler = self._sampler()
        if state.get("sampler_epoch") is not None and hasattr(sampler, "epoch"):
            sampler.epoch = int(state["sampler_epoch"])
        if state.get("sampler_seed") is not None and hasattr(sampler, "initial_seed"):
            sampler.initial_seed = int(state["sampler_seed"])
        saved = state.get("generator")
        if saved is not None:
            generator = getattr(sampler, "generator", None)
            if not isinstance(generator, torch.Generator):  # a seedable sampler creates its own lazily
                generator = torch.Generator()
                sampler.generator = generator
            generator.set_state(saved)
        if state.get("loader") is not None and getattr(self.loader, "use_stateful_dataloader", False):
            self.loader.load_state_dict(state["loader"])


def loader_state(loader: Any) -> Any:
    """A Stateful view of a prepared dataloader (``DataLoaderShard`` / ``DataLoaderDispatcher``) to put in any tree.

    Example::

        tk.save({"loader": loader_state(train_dl), "epoch": epoch}, "loader.safetensors")
        tk.restore("loader.safetensors", {"loader": loader_state(train_dl)})
    """
    return _LoaderState(loader)


def _check(accelerator: Any) -> None:
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", str(accelerator.distributed_type))
    if kind in _UNSUPPORTED:
        raise InvalidArgumentError(
            "accelerator",
            f"<Accelerator distributed_type={kind}>",
            f"torchkeep's save_state/load_state handle single-process, DDP and multi-GPU runs; {kind} shards or "
            "owns the optimizer state: use accelerator.save_state (or torchkeep.distributed for FSDP)",
        )


def _inner(obj: Any, attr: str) -> Any:
    """The wrapped optimizer / scheduler of an ``AcceleratedOptimizer`` / ``AcceleratedScheduler``."""
    return getattr(obj, attr, obj)


def _tree(accelerator: Any, *, rng: bool) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "models": {str(i): accelerator.unwrap_model(m) for i, m in enumerate(accelerator._models)},
        "optimizers": {str(i): _inner(o, "optimizer") for i, o in enumerate(accelerator._optimizers)},
        "schedulers": {str(i): _inner(s, "scheduler") for i, s in enumerate(accelerator._schedulers)},
        "dataloaders": {str(i): _LoaderState(d) for i, d in enumerate(accelerator._dataloaders)},
        "custom": {str(i): o for i, o in enumerate(accelerator._custom_objects)},
    }
    if accelerator.scaler is not None:
        tree["scaler"] = accelerator.scaler
    if rng:
        tree["rng"] = RNGState()
    return tree


def save_state(accelerator: Any, output_dir: str | os.PathLike[str], *, extra: Any = None) -> Path:
    """Save what ``accelerator.save_state`` saves, as one torchkeep file in ``output_dir``.

    Every prepared model (unwrapped: the keys carry no ``module.``), optimizer, scheduler and
    dataloader, the ``GradScaler``, every ``register_for_checkpointing`` object,
    ``accelerator.step``, the RNG states (Python, NumPy, torch CPU and CUDA) and ``extra`` (any
    state tree: epoch, config...). Call it on every process: the main process writes
    ``torchkeep-state.safetensors``; with more than one process each also writes its RNG state
    to ``torchkeep-rng-<rank>.safetensors``. Returns the folder.

    Example::

        model, opt, dl = accelerator.prepare(model, opt, dl)
        save_state(accelerator, f"ckpt/step-{step}", extra={"epoch": epoch})
    """
    _check(accelerator)
    folder = Path(output_dir)
    many = accelerator.num_processes > 1
    if accelerator.is_main_process:
        tree = _tree(accelerator, rng=not many)
        tree["step"] = int(accelerator.step)
        tree["extra"] = extra
        save(tree, folder / STATE_FILE)
    if many:
        save({"rng": RNGState()}, folder / RNG_FILE.format(rank=accelerator.process_index))
        accelerator.wait_for_everyone()
    return folder


def load_state(
    accelerator: Any,
    input_dir: str | os.PathLike[str],
    *,
    strict: bool = True,
    trust_pickle: bool = False,
    allow_globals: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_state` saved into the accelerator's prepared objects, in place.

    Call it after ``accelerator.prepare`` and ``register_for_checkpointing``, on every process.
    Checksums and every target (keys, shapes, optimizer groups) are checked before anything is
    modified. A folder written by a stock ``accelerator.save_state`` (no torchkeep file in it)
    is read file by file without unpickling code (``optimizer.bin``, ``random_states_0.pkl``...;
    ``allow_globals=["mypkg.State"]`` for ``custom_checkpoint_N.pkl`` states of classes you name,
    ``trust_pickle=True`` for ones that hold arbitrary objects, which runs their code).

    Returns the loaded tree: ``"step"``, ``"extra"`` and the restored entries.

    Example::

        model, opt, dl = accelerator.prepare(model, opt, dl)
        epoch = load_state(accelerator, "ckpt/step-1000")["extra"]["epoch"] + 1
    """
    _check(accelerator)
    folder = Path(input_dir)
    path = folder / STATE_FILE
    if not path.is_file():
        if (folder / "random_states_0.pkl").is_file() or (folder / "optimizer.bin").is_file():
            return _load_stock(accelerator, folder, trust_pickle=trust_pickle, allow_globals=allow_globals)
        raise CheckpointNotFoundError(path)
    many = accelerator.num_processes > 1
    targets = _tree(accelerator, rng=not many)
    got = restore(path, targets, strict=strict)
    accelerator.step = int(got["step"])
    if many:
        restore(folder / RNG_FILE.format(rank=accelerator.process_index), {"rng": RNGState()})
    return got


def _stock_name(stem: str, i: int, suffix: str) -> str:
    return f"{stem}{suffix}" if i == 0 else f"{stem}_{i}{suffix}"


def _load_stock(
    accelerator: Any, folder: Path, *, trust_pickle: bool, allow_globals: Iterable[str] | None
) -> dict[str, Any]:
    """Read every file of a stock ``save_state`` folder first, then apply them (no code is unpickled)."""

    def read(name: str, path: Path | None = None) -> Any:
        return load(path or folder / name, trust_pickle=trust_pickle, allow_globals=allow_globals)

    models = [accelerator.unwrap_model(m) for m in accelerator._models]
    weights = []
    for i in range(len(models)):
        safe = folder / _stock_name("model", i, ".safetensors")
        weights.append(safe if safe.is_file() else folder / _stock_name("pytorch_model", i, ".bin"))
    optimizers = [read(_stock_name("optimizer", i, ".bin")) for i in range(len(accelerator._optimizers))]
    schedulers = [read(_stock_name("scheduler", i, ".bin")) for i in range(len(accelerator._schedulers))]
    loaders = []
    for i, loader in enumerate(accelerator._dataloaders):
        dl_file = folder / ("dl_state_dict.bin" if i == 0 else f"dl_state_dict_{i}.bin")
        use = getattr(loader, "use_stateful_dataloader", False) and dl_file.is_file()
        loaders.append(read("", dl_file) if use else None)
    customs = [read(f"custom_checkpoint_{i}.pkl") for i in range(len(accelerator._custom_objects))]
    scaler = read("scaler.pt") if accelerator.scaler is not None and (folder / "scaler.pt").is_file() else None
    rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
    rng = read("", rng_file) if rng_file.is_file() else None

    for model, source in zip(models, weights, strict=True):
        load_into(model, source)
    for opt, state in zip(accelerator._optimizers, optimizers, strict=True):
        opt.load_state_dict(state)
    for sched, state in zip(accelerator._schedulers, schedulers, strict=True):
        sched.load_state_dict(state)
    for loader, state in zip(accelerator._dataloaders, loaders, strict=True):
        if state is not None:
            loader.load_state_dict(state)
    for obj, state in zip(accelerator._custom_objects, customs, strict=True):
        obj.load_state_dict(state)
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    if rng is not None:
        _apply_stock_rng(rng)
        accelerator.step = int(rng.get("step", accelerator.step))
    return {"step": accelerator.step, "extra": None}


def _apply_stock_rng(states: dict[str, Any]) -> None:
    """Set the generators from the dict Accelerate's ``random_states_N.pkl`` holds."""
    set_global_states(
        states["random_state"],
        states["numpy_random_seed"],
        states["torch_manual_seed"],
        states.get("torch_cuda_manual_seed"),
    )
