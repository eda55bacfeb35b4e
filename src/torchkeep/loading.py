"""load_into: load weights from any source into a module, repairing key prefixes, with a report.

The steps, in order (nothing in the model changes before the last one):

1. open the source (:mod:`torchkeep.sources`) and find the state dict in it;
2. rename keys: a PEFT adapter's file names to the adapter's names in the model
   (:mod:`torchkeep.adapters`), the best prefix rule (``module.``, ``_orig_mod.``, ``model.``
   and their combinations, stripped or added), then the user's ``remap``;
3. validate against ``model.state_dict()``: matched, missing, unexpected, shape- and
   dtype-mismatched; raise if the load cannot be complete (``strict``) or matches too little
   (``min_matched``), with the options that make it pass (each one tried before it is offered);
4. verify, then copy: a tensor stored whole, in the model tensor's dtype and shape, for a
   contiguous CPU or CUDA model tensor, has its checksum checked over a map of the file (no copy), then
   is read straight into the model tensor and hashed again as it lands (what was verified is
   what is used: a file rewritten in place between the two raises, saying the model was partly
   overwritten); every other tensor is read into memory of its own, verified there, then copied.
   A damaged file is refused before anything in the model changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchkeep import adapters
from torchkeep.errors import (
    AmbiguousCheckpointError,
    ArgumentTypeError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    DtypeMismatchError,
    InvalidArgumentError,
    KeyMismatchError,
)
from torchkeep.mapped import disjoint, partly_overwritten, readable_into
from torchkeep.matching import (
    MIN_MATCHED,
    LoadReport,
    Remap,
    check_min_matched,
    match,
    mismatch_error,
    plan_names,
    premap,
)
from torchkeep.placement import placer
from torchkeep.sources import WRAPPER_KEYS, LazyTensor, candidates, iter_tensors, lookup, open_source

__all__ = ["MIN_MATCHED", "LoadReport", "load_into"]


# -- validation -------------------------------------------------------------------------------


@dataclass
class _Plan:
    copies: list[tuple[str, Any, torch.Tensor | LazyTensor]]  # (model key, target tensor, source)
    report: LoadReport


def _plan(
    model: torch.nn.Module,
    sd: Mapping[str, Any],
    *,
    remap: Remap,
    strict: bool,
    skip_mismatched: bool,
    dtype_policy: str,
    report: LoadReport,
    caller: str = "load_into",
    min_matched: int | float = MIN_MATCHED,
    adapter: str | None = None,
    adapter_dir: str | None = None,
) -> _Plan:
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    tensors = dict(iter_tensors(sd))
    names = adapters.find(model, targets, adapter)
    opts = {"remap": remap, "strict": strict, "skip_mismatched": skip_mismatched, "min_matched": min_matched}
    copies, problem = match(targets, tensors, names, report, **opts)
    if problem:
        raise mismatch_error(problem, targets, tensors, names, report, opts, caller, adapter_dir)
    if report.cast and dtype_policy == "error":
        raise DtypeMismatchError(report.source + (f" [{report.key}]" if report.key else ""), report.cast)
    return _Plan(copies, report)


# -- source selection -------------------------------------------------------------------------


def _choose(
    tree: Any, model: torch.nn.Module, key: str | None, label: str, adapter: str | None = None
) -> tuple[str, Mapping[str, Any]]:
    if key is not None:
        try:
            node = lookup(tree, key)
        except KeyError:
            found = sorted(candidates(tree))
            raise KeyMismatchError(
                label, missing=[key], fix=f"key= names no state dict in it; its state dicts are at {found}"
            ) from None
        if not isinstance(node, Mapping) or not any(True for _ in iter_tensors(node)):
            raise KeyMismatchError(label, missing=[key], fix=f"the entry at key={key!r} holds no tensors")
        return key, node
    found = candidates(tree)
    if not found:
        top = sorted(map(str, tree)) if isinstance(tree, Mapping) else []
        raise KeyMismatchError(
            label,
            fix=f"found no state dict (a dict of tensors) in it; its top-level keys are {top}; pass key=",
        )
    if len(found) == 1:
        return next(iter(found.items()))
    model_keys = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    names = adapters.find(model, model_keys, adapter)
    scores = {
        k: plan_names(list(premap([n for n, _ in iter_tensors(sd)], names)[0].values()), model_keys, None)[3]
        for k, sd in found.items()
    }
    top = max(scores.values())
    best = [k for k, s in scores.items() if s == top]
    if top == 0:
        # nothing fits: fall back on the usual places, so the error names what differs

        usual = [k for k in found if k == "" or k in WRAPPER_KEYS]
        best = usual if len(usual) == 1 else list(found)
    if len(best) > 1:
        raise AmbiguousCheckpointError(label, best)
    return best[0], found[best[0]]


def _adapter_dir(source: Any) -> str | None:
    """The folder of a PEFT adapter (``adapter_config.json`` in it) that ``source`` is or lies in."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    return str(folder) if (folder / "adapter_config.json").is_file() else None


# -- copy -------------------------------------------------------------------------------------


def _placement(map_location: Any) -> Callable[[torch.Tensor, str | None], torch.Tensor] | None:
    if map_location is None:
        return None
    return placer(map_location)  # the same semantics as tk.load's map_location


def _check_devices(
    place: Callable[[torch.Tensor, str | None], torch.Tensor] | None, plan: _Plan, label: str, map_location: Any
) -> None:
    """Fail before copying when map_location sends tensors to a device this machine lacks."""
    if place is None:
        return
    seen: set[str | None] = set()
    for _, _, src in plan.copies:
        dev = src.device if isinstance(src, LazyTensor) else str(src.device)
        if dev in seen:
            continue
        seen.add(dev)
        try:
            placed = place(torch.empty(0), dev)
        except (RuntimeError, AssertionError) as e:
            raise DeviceUnavailableError(label, dev or "cpu", map_location, str(e).splitlines()[0]) from None
        if isinstance(placed, torch.Tensor) and placed.device.type == "meta":
            raise InvalidArgumentError(
                "map_location",
                map_location,
                "load_into copies values into the model, and a meta tensor holds none; pass None (each "
                "parameter's own device), 'cpu' or a real device",
            )


def load_into(
    model: torch.nn.Module,
    source: Any,
    *,
    strict: bool = True,
    remap: Remap = None,
    skip_mismatched: bool = False,
    dtype_policy: str = "cast",
    map_location: Any = None,
    key: str | None = None,
    verify: bool = True,
    min_matched: int | float = MIN_MATCHED,
    adapter: str | None = None,
    allow_globals: Any = None,
) -> LoadReport:
    """Load weights from any source into ``model``, in place, and report what happened.

    The state dict is found inside the checkpoint by itself (a bare state dict, ``model``,
    ``state_dict``, ``model_state_dict``, ``module``, ``net``, ``ema``, ... : the one whose
    keys fit the model best). Prefixes added by ``nn.DataParallel``/DDP (``module.``),
    ``torch.compile`` (``_orig_mod.``) and Lightning (``model.``) are stripped or added
    when that makes more keys match. Everything is validated before the first copy, so a
    load that does not fit leaves the model unchanged. Tensors go into the existing
    parameters and buffers (optimizers keep pointing at them; tied weights stay tied),
    each onto the device it already lives on. A damaged file is refused before the model
    changes: checksums are checked over a map of the file, then each tensor is read
    straight into a contiguous CPU or CUDA parameter of the stored dtype (one copy, hashed again as
    the bytes land: a file rewritten in place meanwhile raises
    :class:`~torchkeep.errors.ChecksumMismatchError` saying the model was partly
    overwritten); other tensors are read and verified in memory of their own first.

    A PEFT adapter checkpoint (``adapter_model.safetensors`` as ``save_pretrained`` writes it,
    or :func:`torchkeep.integrations.peft.save_adapter`'s) loads into a model that holds the
    adapter (a ``PeftModel``): its names are mapped to the adapter's (``lora_A.weight`` ->
    ``lora_A.default.weight``, with peft's own mapping), and a strict load demands every
    tensor of the adapter but none of the base model's, which it leaves as they are
    (``report.kept``).

    Args:
        model: the module to load into.
        source: a path (torchkeep or safetensors file, legacy ``torch.save`` file, a
            directory or ``*.safetensors.index.json`` of shards), a module, or a
            (nested) dict of tensors.
        strict: missing or unexpected keys raise :class:`~torchkeep.errors.KeyMismatchError`;
            ``False`` loads what matches and reports the rest.
        remap: ``{regex: replacement}`` applied in order to every checkpoint key, or
            ``fn(key) -> new key | None`` (``None`` drops the key); after prefix repair.
        skip_mismatched: skip tensors whose shapes differ (e.g. a new classifier head)
            instead of raising; they are reported in ``mismatched``.
        dtype_policy: ``"cast"`` converts to the model's dtypes (reported in ``cast``);
            ``"error"`` raises :class:`~torchkeep.errors.DtypeMismatchError` instead.
        map_location: as in ``torch.load`` (string, device, dict such as
            ``{"cuda:1": "cuda:0"}``, or ``fn(tensor, saved_device)``), applied to each
            source tensor before it is copied. ``None``: straight onto each parameter's device.
        key: the dotted key of the state dict to use (``"ema"``, ``"a.b"``) when the
            checkpoint holds several.
        verify: check the checksums of torchkeep files before copying.
        min_matched: the fewest tensors a load may fill, strict or not: a count (``int``), or a
            fraction (``float``) of the smaller of the model's and the checkpoint's tensor counts
            (at least one). The default, ``0.1``, stops a load whose names do not correspond
            (a prefix, another model) from "succeeding" with nothing loaded; ``0`` accepts any load.
        adapter: the PEFT adapter to load an adapter checkpoint into, when the model holds
            several (by default its active one).
        allow_globals: extra globals a legacy pickle source may use, as in :func:`torchkeep.load`.

    Returns:
        A :class:`LoadReport`.

    Raises:
        KeyMismatchError: keys or shapes differ (message: the names and the option that fixes it).
        TooFewMatchesError: fewer than ``min_matched`` tensors would load (a ``KeyMismatchError``).
        AmbiguousCheckpointError: several state dicts fit equally well; pass ``key=``.
        DtypeMismatchError: dtypes differ and ``dtype_policy="error"``.
        InvalidArgumentError: a bad ``dtype_policy``, ``remap`` regex, ``min_matched``, ``adapter`` or
            ``map_location="meta"`` (a ``ValueError``).
        ArgumentTypeError: ``model`` is not a module, ``remap`` is neither a dict nor a callable, or
            ``min_matched`` not a number (a ``TypeError``).
        MissingShardError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> from torchkeep.loading import load_into
        >>> trained = torch.nn.DataParallel(torch.nn.Linear(3, 2))  # keys start with "module."
        >>> p = tk.save({"model": trained, "epoch": 5}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> model = torch.nn.Linear(3, 2)
        >>> report = load_into(model, p)
        >>> report.ok, report.key, report.renamed
        (True, 'model', [('module.', '', 2)])
        >>> torch.equal(model.weight, trained.module.weight)
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(
            "model", model, "an nn.Module (load_into copies into its parameters; for other objects use tk.restore)"
        )
    if dtype_policy not in ("cast", "error"):
        raise InvalidArgumentError(
            "dtype_policy",
            dtype_policy,
            'pass "cast" (the default: convert to the model\'s dtypes) or "error" (raise on a dtype difference)',
        )
    check_min_matched(min_matched)
    place = _placement(map_location)
    with open_source(source, verify=verify, allow_globals=allow_globals) as src:
        label = src.label if isinstance(source, (str, os.PathLike)) else "<memory>"
        chosen, sd = _choose(src.tree, model, key, label, adapter)
        report = LoadReport(source=label, key=chosen)
        plan = _plan(
            model,
            sd,
            remap=remap,
            strict=strict,
            skip_mismatched=skip_mismatched,
            dtype_policy=dtype_policy,
            report=report,
            min_matched=min_matched,
            adapter=adapter,
            adapter_dir=_adapter_dir(source),
        )
        _check_devices(place, plan, label, map_location)
        direct = _direct_reads(plan) if place is None else {}
        read = {id(dst) for _, _, dests in direct.values() for dst in dests.values()}
        # checksums of every other tensor to be copied, before the first copy, one batch per file
        batches: dict[int, tuple[Callable[[list[str]], None], list[str]]] = {}
        for _, dst, s in plan.copies:
            if isinstance(s, LazyTensor) and id(dst) not in read:
                batches.setdefault(id(s.verify), (s.verify, []))[1].append(s.stored)
        for check, names in batches.values():
            check(names)
        for precheck, _, dests in direct.values():  # a damaged file is refused before the model is touched
            precheck(list(dests))
        try:  # then straight into the model's tensors, each checksum verified again as the bytes land
            for _, read_into, dests in direct.values():
                read_into(dests)
        except CorruptCheckpointError as e:  # rewritten in place (or truncated) since the check
            raise partly_overwritten(e) from None
        copy_plan(plan, place, skip=read)
    return report


def _direct_reads(
    plan: _Plan,
) -> dict[int, tuple[Callable[[list[str]], None], Callable[[dict[str, torch.Tensor]], None], dict[str, torch.Tensor]]]:
    """Per source file, ``{stored name: model tensor}`` that can be read straight into the model:
    whole stored tensors (no views) into contiguous CPU or CUDA tensors of their shape and dtype, each model
    tensor and each stored tensor once (tied weights: the first), no two overlapping."""
    chosen: dict[str, torch.Tensor] = {}
    sources: dict[str, LazyTensor] = {}
    seen: set[int] = set()
    for _, dst, s in plan.copies:
        if id(dst) in seen:
            continue
        seen.add(id(dst))
        if isinstance(s, LazyTensor) and s.read_into is not None and s.stored not in chosen and readable_into(dst, s):
            chosen[s.stored] = dst
            sources[s.stored] = s
    out: dict[int, Any] = {}
    for name, dst in disjoint(chosen).items():
        s = sources[name]
        out.setdefault(id(s.read_into), (s.precheck, s.read_into, {}))[2][name] = dst
    return out


def plan_into(
    model: torch.nn.Module,
    sd: Mapping[str, Any],
    *,
    strict: bool,
    skip_mismatched: bool,
    label: str,
    key: str,
    caller: str = "load_into",
    min_matched: int | float = MIN_MATCHED,
) -> tuple[_Plan, LoadReport]:
    """Validate ``sd`` against ``model`` (prefix repair, shapes, dtypes) without copying anything.

    :func:`torchkeep.restore` plans every module target first and copies only when all of them
    pass; raises :class:`~torchkeep.errors.KeyMismatchError` as :func:`load_into` does.

    ``caller``: whose options the error's fix names: ``"load_into"`` (``strict=False``,
    ``skip_mismatched=True``) or ``"restore"`` (only ``strict=False``, which restore also uses
    to skip shape mismatches). ``min_matched`` as in :func:`load_into`.
    """
    if caller not in ("load_into", "restore"):
        raise InvalidArgumentError("caller", caller, 'pass "load_into" (the default) or "restore"')
    check_min_matched(min_matched)
    report = LoadReport(source=label, key=key)
    plan = _plan(
        model,
        sd,
        remap=None,
        strict=strict,
        skip_mismatched=skip_mismatched,
        dtype_policy="cast",
        report=report,
        caller=caller,
        min_matched=min_matched,
    )
    return plan, report


def copy_plan(
    plan: _Plan,
    place: Callable[[torch.Tensor, str | None], torch.Tensor] | None = None,
    *,
    skip: set[int] | None = None,
) -> None:
    """Copy a validated plan into the model's existing tensors (tied weights copied once); model
    tensors whose ``id`` is in ``skip`` were read straight into already."""
    done: set[int] = set(skip or ())
    with torch.no_grad():
        for _, dst, s in plan.copies:
            if id(dst) in done:  # tied weights: one copy per parameter object
                continue
            done.add(id(dst))
            t = s.load() if isinstance(s, LazyTensor) else s
            if place is not None:
                t = place(t, s.device if isinstance(s, LazyTensor) else str(s.device))
            dst.copy_(t)
