"""Hugging Face Trainer: checkpoints whose resumable state is one checksummed torchkeep file.

A stock ``Trainer`` checkpoint (``checkpoint-N/``) holds the weights as ``model.safetensors``
and the rest as ``torch.save`` pickles: ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state.pth`` and ``training_args.bin``. Mix :class:`TorchkeepTrainerMixin` into your
Trainer class (or use :data:`TorchkeepTrainer`) and each checkpoint holds instead:

- ``model.safetensors``, ``config.json``, ``trainer_state.json``: unchanged (``from_pretrained``
  and ``tk.load_into`` read the folder as before);
- ``torchkeep-state.safetensors``: optimizer, LR scheduler, ``GradScaler`` and every RNG state
  (Python, NumPy, torch CPU and CUDA), written atomically and checksummed;
- ``training_args.json`` in place of the pickled ``training_args.bin``.

``trainer.train(resume_from_checkpoint=...)`` resumes from it bit-exactly, and still resumes
from stock checkpoints. Example::

    from torchkeep.integrations.transformers import TorchkeepTrainer

    trainer = TorchkeepTrainer(model=model, args=args, train_dataset=ds)
    trainer.train(resume_from_checkpoint=True)

Why a mixin and not a callback: the Trainer loads the optimizer before any callback runs and
restores the RNG inside its epoch loop, after it has skipped the batches already trained (which
consumes random numbers); a callback can neither stop the pickles from being written nor
restore the RNG at that moment. The mixin overrides exactly the six methods that write and read
those files (``_save_optimizer_and_scheduler``, ``_save_scaler``, ``_save_rng_state`` and their
``_load_*`` twins) plus ``save_model`` for ``training_args``; everything else, including when and
where checkpoints are written, rotated and found, stays the Trainer's.

``transformers`` is imported only when :data:`TorchkeepTrainer` is first used (``import
torchkeep`` never imports it; the mixin itself needs nothing from it).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from torchkeep.api import load, restore, save
from torchkeep.errors import CheckpointNotFoundError
from torchkeep.loading import load_into
from torchkeep.rng import RNGState, set_global_states

__all__ = ["RNG_FILE", "STATE_FILE", "TorchkeepTrainer", "TorchkeepTrainerMixin", "restore_checkpoint"]

STATE_FILE = "torchkeep-state.safetensors"
"""The file each checkpoint folder gets: optimizer, scheduler, scaler and (one process) RNG state."""
RNG_FILE = "torchkeep-rng-{rank}.safetensors"
"""With more than one process, each process's RNG state."""
ARGS_FILE = "training_args.json"

TorchkeepTrainer: type
"""``TorchkeepTrainerMixin`` over ``transformers.Trainer``, built on first use (module ``__getattr__``)."""


class TorchkeepTrainerMixin:
    """Put before ``Trainer`` (or any subclass of it) in the bases: ``class T(TorchkeepTrainerMixin, Trainer)``.

    DeepSpeed, FSDP, XLA and SageMaker model parallelism save sharded or framework-owned state:
    with them the Trainer's own methods run unchanged.

    Example::

        class MyTrainer(TorchkeepTrainerMixin, Seq2SeqTrainer): ...

        trainer = MyTrainer(model=model, args=args, train_dataset=ds)
        trainer.train(resume_from_checkpoint=True)  # resumes bitwise from the newest checkpoint-N
    """

    torchkeep_training_args_json: bool = True
    """Replace the pickled ``training_args.bin`` with ``training_args.json`` (``False`` keeps the pickle)."""

    _torchkeep_cached_rng: tuple[str, Any] | None = None

    # what the Trainer provides
    args: Any
    accelerator: Any
    optimizer: Any
    lr_scheduler: Any
    is_deepspeed_enabled: bool
    is_fsdp_enabled: bool

    def _torchkeep_handles(self) -> bool:
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

        return not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available() or is_sagemaker_mp_enabled()
        )

    def _torchkeep_scaler(self) -> Any:
        return getattr(self.accelerator, "scaler", None)

    # ---- saving ----

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._torchkeep_handles():
            super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
            return
        if not self.args.should_save:
            return
        tree: dict[str, Any] = {"optimizer": self.optimizer, "scheduler": self.lr_scheduler}
        scaler = self._torchkeep_scaler()
        if scaler is not None:
            tree["scaler"] = scaler
        if self.args.world_size <= 1:
            tree["rng"] = RNGState()  # nothing draws a random number between here and the stock RNG save
        save(tree, Path(output_dir) / STATE_FILE)

    def _save_scaler(self, output_dir: str) -> None:
        if not self._torchkeep_handles():
            super()._save_scaler(output_dir)  # type: ignore[misc]
        # else: saved with the optimizer

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._torchkeep_handles():
            super()._save_rng_state(output_dir)  # type: ignore[misc]
            return
        if self.args.world_size > 1:
            save({"rng": RNGState()}, Path(output_dir) / RNG_FILE.format(rank=self.args.process_index))
        # else: saved with the optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        if not self.torchkeep_training_args_json or not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        pickled = folder / "training_args.bin"
        if pickled.is_file():
            tmp = folder / f".{ARGS_FILE}.tmp"
            tmp.write_text(self.args.to_json_string())
            os.replace(tmp, folder / ARGS_FILE)
            pickled.unlink()

    # ---- resuming ----

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        path = Path(checkpoint) / STATE_FILE if checkpoint is not None else None
        if path is None or not path.is_file() or not self._torchkeep_handles():
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        got = restore(path, {"optimizer": self.optimizer, "scheduler": self.lr_scheduler})
        scaler = self._torchkeep_scaler()
        if scaler is not None and got.get("scaler") is not None:
            scaler.load_state_dict(got["scaler"])
        # the RNG is set later, inside the epoch loop (after the skipped batches): keep it until then
        self._torchkeep_cached_rng = (str(checkpoint), got.get("rng"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / STATE_FILE).is_file() or not self._torchkeep_handles():
            super()._load_scaler(checkpoint)  # type: ignore[misc]
        # else: restored with the optimizer

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / STATE_FILE).is_file() or not self._torchkeep_handles():
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        if self.args.world_size > 1:
            rng_file = Path(checkpoint) / RNG_FILE.format(rank=self.args.process_index)
            if rng_file.is_file():
                restore(rng_file, {"rng": RNGState()})
            else:
                warnings.warn(
                    f"{rng_file} is missing (the checkpoint was written with another number of processes): "
                    "the RNG states were not restored, so this resume is not bit-exact",
                    stacklevel=2,
                )
            return
        cached = self._torchkeep_cached_rng
        if cached is not None and cached[0] == str(checkpoint) and cached[1] is not None:
            RNGState().load_state_dict(cached[1])
        else:
            restore(Path(checkpoint) / STATE_FILE, {"rng": RNGState()})


def restore_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng: bool = False,
    trust_pickle: bool = False,
    allow_globals: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Restore a Trainer ``checkpoint-N/`` folder into your own objects, without the Trainer.

    Reads a folder written by :class:`TorchkeepTrainerMixin` or by a stock ``Trainer``
    (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` are read without
    unpickling code). Every file is read (and verified) before any object is modified. ``rng=True``
    sets the Python, NumPy, torch CPU (and CUDA) generators. Returns ``trainer_state.json`` as a
    dict (``global_step``, ``epoch``, ``log_history``...), or ``{}`` when the folder has none.

    Example::

        tk.load_into(model, "out/checkpoint-500")  # the weights (model.safetensors)
        state = restore_checkpoint("out/checkpoint-500", optimizer=opt, scheduler=sched, rng=True)
        step = state["global_step"]
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointNotFoundError(folder, "pass a Trainer checkpoint folder (checkpoint-N).")
    ours = folder / STATE_FILE
    states: dict[str, Any] = {}
    if ours.is_file():
        tree = load(ours)
        states = {k: tree.get(k) for k in ("optimizer", "scheduler", "scaler", "rng")}
    else:
        for key, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("scaler", "scaler.pt")):
            wanted = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}[key]
            if wanted is not None and (folder / name).is_file():
                states[key] = load(folder / name, trust_pickle=trust_pickle, allow_globals=allow_globals)
        if rng:
            states["stock_rng"] = load(folder / "rng_state.pth", trust_pickle=trust_pickle, allow_globals=allow_globals)
    for key, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None and states.get(key) is None:
            raise CheckpointNotFoundError(folder / key, f"this checkpoint holds no {key} state.")
    if model is not None:
        load_into(model, folder)
    if optimizer is not None:
        optimizer.load_state_dict(states["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(states["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(states["scaler"])
    if rng:
        if "stock_rng" in states:
            _apply_stock_rng(states["stock_rng"])
        elif states.get("rng") is not None:
            RNGState().load_state_dict(states["rng"])
        else:
            raise CheckpointNotFoundError(folder / "rng", "this checkpoint holds no RNG state (one process).")
    trainer_state = folder / "trainer_state.json"
    return json.loads(trainer_state.read_text()) if trainer_state.is_file() else {}


def _apply_stock_rng(states: dict[str, Any]) -> None:
    """Set the generators from the dict the Trainer's ``rng_state.pth`` holds."""
    set_global_states(states["python"], states["numpy"], states["cpu"], states.get("cuda"))


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``TorchkeepTrainer``: the mixin over ``transformers.Trainer``, built on first use."""
    if name == "TorchkeepTrainer":
        if name not in _CLASSES:
            from transformers import Trainer

            _CLASSES[name] = type(
                "TorchkeepTrainer",
                (TorchkeepTrainerMixin, Trainer),
                {
                    "__module__": __name__,
                    "__doc__": "``transformers.Trainer`` whose checkpoints keep their resumable state in a torchkeep "
                    "file (see :class:`TorchkeepTrainerMixin`).",
                },
            )
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
