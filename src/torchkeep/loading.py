"""load_into: load weights from any source into a module, repairing key prefixes, with a report.

The steps, in order (nothing in the model changes before the last one):

1. open the source (:mod:`torchkeep.sources`) and find the state dict in it;
2. rename keys: the best prefix rule (``module.``, ``_orig_mod.``, ``model.`` and their
   combinations, stripped or added), then the user's ``remap``;
3. validate against ``model.state_dict()``: matched, missing, unexpected, shape- and
   dtype-mismatched; raise if the load cannot be complete (``strict``);
4. verify checksums of the tensors' files, then copy tensor by tensor in place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.errors import (
    AmbiguousCheckpointError,
    ArgumentTypeError,
    DeviceUnavailableError,
    DtypeMismatchError,
    InvalidArgumentError,
    KeyMismatchError,
    format_names,
)
from torchkeep.placement import placer
from torchkeep.sources import WRAPPER_KEYS, LazyTensor, candidates, iter_tensors, lookup, open_source, shape_dtype

__all__ = ["LoadReport", "load_into"]

_KNOWN = ("module.", "_orig_mod.", "model.")
# the prefixes a checkpoint or a model may carry: one known prefix, or two of them stacked
# (DataParallel around a compiled model gives ``module._orig_mod.``)
PREFIXES = ("", *_KNOWN, *(a + b for a in _KNOWN for b in _KNOWN if a != b))
Remap = Mapping[str, str] | Callable[[str], "str | None"] | None


@dataclass
class LoadReport:
    """What :func:`load_into` did.

    Names are the model's names (``model.state_dict()`` keys) for ``matched``, ``missing``
    and ``mismatched``; ``unexpected`` holds checkpoint names after renaming.

    Attributes:
        matched: keys loaded (a tied weight absent from the checkpoint but loaded through
            its twin counts as matched).
        missing: model keys the checkpoint lacks (left unchanged).
        unexpected: checkpoint keys the model lacks (ignored).
        mismatched: ``(key, checkpoint_shape, model_shape)`` of tensors not loaded.
        renamed: rename rules applied, as ``(from, to, count)``: prefix rules such as
            ``("module.", "", 12)``, ``remap`` regex rules ``(pattern, replacement, n)``, and
            ``("<callable>", "<callable>", n)`` for a remap function.
        dropped: checkpoint keys a remap callable dropped (returned ``None`` for).
        cast: ``(key, checkpoint_dtype, model_dtype)`` of tensors converted on copy.
        source: the path loaded, or ``"<memory>"``.
        key: the dotted key of the state dict used inside the checkpoint (``""``: the top level).

    Example:
        >>> r = LoadReport(matched=["weight", "bias"], missing=["head.weight"])
        >>> r.ok, r.to_dict()["missing"]
        (False, ['head.weight'])
        >>> print(r)
        <memory>: loaded 2 tensors; missing 1: head.weight
    """

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    renamed: list[tuple[str, str, int]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    cast: list[tuple[str, str, str]] = field(default_factory=list)
    source: str = "<memory>"
    key: str = ""

    @property
    def ok(self) -> bool:
        """True when every model tensor was loaded and every checkpoint tensor was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (shapes as lists)."""
        return {
            "source": self.source,
            "key": self.key,
            "ok": self.ok,
            "matched": list(self.matched),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
            "renamed": [list(r) for r in self.renamed],
            "dropped": list(self.dropped),
            "cast": [list(c) for c in self.cast],
        }

    def __str__(self) -> str:
        where = self.source + (f" [{self.key}]" if self.key else "")
        parts = [f"{where}: loaded {len(self.matched)} tensors"]
        if self.renamed:
            parts.append("renamed " + ", ".join(f"{a!r}->{b!r} ({n})" for a, b, n in self.renamed))
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {format_names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {format_names(self.unexpected)}")
        if self.mismatched:
            shown = ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched[:10])
            more = f", ... ({len(self.mismatched) - 10} more)" if len(self.mismatched) > 10 else ""
            parts.append(f"skipped {len(self.mismatched)} shape mismatch(es), checkpoint vs model: {shown}{more}")
        if self.cast:
            parts.append(f"cast {len(self.cast)}: " + format_names(f"{k} {a}->{b}" for k, a, b in self.cast))
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)}: {format_names(self.dropped)}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"LoadReport({self})"


# -- renaming ---------------------------------------------------------------------------------


def _rename(key: str, old: str, new: str) -> str:
    return new + key[len(old) :] if key.startswith(old) else key


def _apply_prefix(keys: list[str], old: str, new: str) -> tuple[dict[str, str], int]:
    """``{checkpoint key: new key}`` for rule old->new and the number renamed; a rename that
    would collide with another key is not done."""
    taken = set(keys)
    out: dict[str, str] = {}
    n = 0
    for k in keys:
        r = _rename(k, old, new)
        if r != k and (r in taken or r in out.values()):
            r = k
        n += r != k
        out[k] = r
    return out, n


def _compile_remap(remap: Remap) -> Callable[[str], str | None] | None:
    if remap is None:
        return None
    if isinstance(remap, Mapping):
        try:
            rules = [(re.compile(p), r) for p, r in remap.items()]
        except (re.error, TypeError) as e:
            raise InvalidArgumentError(
                "remap",
                remap,
                f"a key is not a valid regular expression ({e}); escape literal dots and brackets, "
                "e.g. {'^encoder[.]': ''} or re.escape(prefix)",
            ) from None

        def by_regex(k: str) -> str:
            for pat, rep in rules:
                k = pat.sub(rep, k)
            return k

        return by_regex
    if callable(remap):
        return remap
    raise ArgumentTypeError(
        "remap",
        remap,
        "a dict of regex -> replacement (e.g. {'^encoder[.]': ''}) or a callable fn(key) -> new key | None",
    )


def _remap_rules(remap: Remap, keys: list[str]) -> list[tuple[str, str, int]]:
    """The remap's rules with how many keys each renamed (for the report)."""
    if remap is None:
        return []
    if isinstance(remap, Mapping):
        out = []
        cur = list(keys)
        for p, r in remap.items():
            nxt = [re.sub(p, r, k) for k in cur]
            out.append((p, r, sum(a != b for a, b in zip(cur, nxt, strict=True))))
            cur = nxt
        return [x for x in out if x[2]]
    return []


def _plan_names(
    ck_keys: list[str], model_keys: set[str], remap: Remap
) -> tuple[dict[str, str], list[tuple[str, str, int]], list[str], int]:
    """Best prefix rule, then remap: ``({ck key: final name}, rules, dropped, n matched)``."""
    fn = _compile_remap(remap)
    ck_prefixes = [p for p in PREFIXES if p == "" or any(k.startswith(p) for k in ck_keys)]
    model_prefixes = [p for p in PREFIXES if p == "" or any(k.startswith(p) for k in model_keys)]
    best: tuple[int, int, str, str, dict[str, str], int] | None = None
    for old in ck_prefixes:
        for new in model_prefixes:
            if old == new and old:
                continue
            names, n = _apply_prefix(ck_keys, old, new)
            final = {k: fn(v) if fn else v for k, v in names.items()}
            score = sum(1 for v in final.values() if v in model_keys)
            # more matches win; on a tie, the rule that renames least (identity first)
            rank = (score, -n)
            if best is None or rank > best[:2]:
                best = (score, -n, old, new, names, n)
    assert best is not None  # the identity rule always runs
    score, _, old, new, names, n = best
    rules = [(old, new, n)] if n else []
    final: dict[str, str] = {}
    dropped: list[str] = []
    for k, v in names.items():
        r = fn(v) if fn else v
        if r is None:
            dropped.append(k)
        else:
            final[k] = r
    if isinstance(remap, Mapping):
        rules += _remap_rules(remap, list(names.values()))
    elif fn is not None:
        changed = sum(1 for k, v in names.items() if final.get(k, v) != v)
        if changed:
            rules.append(("<callable>", "<callable>", changed))
    return final, rules, sorted(dropped), score


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """A ``remap={...}`` that would match more keys, when names differ by an unrecognised prefix."""
    if not unexpected or not missing:
        return ""
    miss = set(missing)

    def heads(keys: list[str]) -> set[str]:
        return {k.split(".", 1)[0] + "." for k in keys if "." in k}

    options = [(h, "") for h in heads(unexpected)] + [("", h) for h in heads(missing)]
    options += [(a, b) for a in heads(unexpected) for b in heads(missing) if a != b]
    best, best_n = None, 0
    for old, new in options:
        n = sum(1 for k in unexpected if k.startswith(old) and new + k[len(old) :] in miss)
        if n > best_n:
            best, best_n = (old, new), n
    if best is None or best_n * 2 < min(len(unexpected), len(missing)):
        return ""
    pattern = "^" + re.escape(best[0])
    return f"remap={{{pattern!r}: {best[1]!r}}}"


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
) -> _Plan:
    expected = model.state_dict(keep_vars=True)
    targets = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    tensors = dict(iter_tensors(sd))
    names, rules, dropped, _ = _plan_names(list(tensors), set(targets), remap)
    report.renamed, report.dropped = rules, dropped
    by_name: dict[str, torch.Tensor | LazyTensor] = {}
    unexpected = []
    for ck_key, name in names.items():
        if name in targets and name not in by_name:
            by_name[name] = tensors[ck_key]
        else:
            unexpected.append(name)
    copies: list[tuple[str, Any, torch.Tensor | LazyTensor]] = []
    mismatched, cast = [], []
    for name, src in by_name.items():
        shape, dtype = shape_dtype(src)
        dst = targets[name]
        if shape != tuple(dst.shape):
            mismatched.append((name, shape, tuple(dst.shape)))
            continue
        if dtype != dst.dtype:
            cast.append((name, str(dtype).removeprefix("torch."), str(dst.dtype).removeprefix("torch.")))
        copies.append((name, dst, src))
    # a tied weight (one Parameter under two names) is loaded through either name
    loaded_ids = {id(dst) for _, dst, _ in copies}
    missing = [k for k, t in targets.items() if k not in by_name and id(t) not in loaded_ids]
    matched = [k for k, t in targets.items() if id(t) in loaded_ids]
    report.matched, report.missing, report.unexpected = matched, sorted(missing), sorted(unexpected)
    report.mismatched, report.cast = sorted(mismatched), sorted(cast)
    where = report.source + (f" [{report.key}]" if report.key else "")
    blocking = (missing or unexpected) if strict else []
    if blocking or (mismatched and not skip_mismatched):
        fixes = []
        hint = _prefix_hint(report.unexpected, report.missing)
        if hint:
            fixes.append(f"{hint} (the names differ by a prefix)")
        also = "or " if hint else ""
        if caller == "restore":  # restore has no skip_mismatched: strict=False skips shape mismatches too
            fixes.append(
                f"{also}pass strict=False to tk.restore to load the {len(copies)} tensors that match "
                "and warn about the rest"
            )
        else:
            opts = []
            if blocking:
                opts.append("strict=False")
            if mismatched and not skip_mismatched:
                opts.append("skip_mismatched=True")
            if opts:
                fixes.append(
                    f"{also}pass {', '.join(opts)} to load the {len(copies)} tensors that match and report the rest"
                )
        raise KeyMismatchError(where, report.missing, report.unexpected, report.mismatched, fix=" ".join(fixes))
    if cast and dtype_policy == "error":
        raise DtypeMismatchError(where, report.cast)
    return _Plan(copies, report)


# -- source selection -------------------------------------------------------------------------


def _choose(tree: Any, model: torch.nn.Module, key: str | None, label: str) -> tuple[str, Mapping[str, Any]]:
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
    scores = {k: _plan_names(list(dict(iter_tensors(sd))), model_keys, None)[3] for k, sd in found.items()}
    top = max(scores.values())
    best = [k for k, s in scores.items() if s == top]
    if top == 0:
        # nothing fits: fall back on the usual places, so the error names what differs

        usual = [k for k in found if k == "" or k in WRAPPER_KEYS]
        best = usual if len(usual) == 1 else list(found)
    if len(best) > 1:
        raise AmbiguousCheckpointError(label, best)
    return best[0], found[best[0]]


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
) -> LoadReport:
    """Load weights from any source into ``model``, in place, and report what happened.

    The state dict is found inside the checkpoint by itself (a bare state dict, ``model``,
    ``state_dict``, ``model_state_dict``, ``module``, ``net``, ``ema``, ... : the one whose
    keys fit the model best). Prefixes added by ``nn.DataParallel``/DDP (``module.``),
    ``torch.compile`` (``_orig_mod.``) and Lightning (``model.``) are stripped or added
    when that makes more keys match. Everything is validated before the first copy, so a
    failed load leaves the model unchanged. Tensors are copied into the existing
    parameters and buffers (optimizers keep pointing at them; tied weights stay tied),
    each onto the device it already lives on, one at a time.

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

    Returns:
        A :class:`LoadReport`.

    Raises:
        KeyMismatchError: keys or shapes differ (message: the names and the option that fixes it).
        AmbiguousCheckpointError: several state dicts fit equally well; pass ``key=``.
        DtypeMismatchError: dtypes differ and ``dtype_policy="error"``.
        InvalidArgumentError: a bad ``dtype_policy``, ``remap`` regex or ``map_location="meta"`` (a ``ValueError``).
        ArgumentTypeError: ``model`` is not a module, or ``remap`` is neither a dict nor a callable (a ``TypeError``).
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
    place = _placement(map_location)
    with open_source(source, verify=verify) as src:
        label = src.label if isinstance(source, (str, os.PathLike)) else "<memory>"
        chosen, sd = _choose(src.tree, model, key, label)
        report = LoadReport(source=label, key=chosen)
        plan = _plan(
            model,
            sd,
            remap=remap,
            strict=strict,
            skip_mismatched=skip_mismatched,
            dtype_policy=dtype_policy,
            report=report,
        )
        _check_devices(place, plan, label, map_location)
        # checksums of every tensor to be copied, before the first copy, one batch per file
        batches: dict[int, tuple[Callable[[list[str]], None], list[str]]] = {}
        for _, _, s in plan.copies:
            if isinstance(s, LazyTensor):
                batches.setdefault(id(s.verify), (s.verify, []))[1].append(s.stored)
        for check, names in batches.values():
            check(names)
        copy_plan(plan, place)
    return report


def plan_into(
    model: torch.nn.Module,
    sd: Mapping[str, Any],
    *,
    strict: bool,
    skip_mismatched: bool,
    label: str,
    key: str,
    caller: str = "load_into",
) -> tuple[_Plan, LoadReport]:
    """Validate ``sd`` against ``model`` (prefix repair, shapes, dtypes) without copying anything.

    :func:`torchkeep.restore` plans every module target first and copies only when all of them
    pass; raises :class:`~torchkeep.errors.KeyMismatchError` as :func:`load_into` does.

    ``caller``: whose options the error's fix names: ``"load_into"`` (``strict=False``,
    ``skip_mismatched=True``) or ``"restore"`` (only ``strict=False``, which restore also uses
    to skip shape mismatches).
    """
    if caller not in ("load_into", "restore"):
        raise InvalidArgumentError("caller", caller, 'pass "load_into" (the default) or "restore"')
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
    )
    return plan, report


def copy_plan(plan: _Plan, place: Callable[[torch.Tensor, str | None], torch.Tensor] | None = None) -> None:
    """Copy a validated plan into the model's existing tensors (tied weights copied once)."""
    done: set[int] = set()
    with torch.no_grad():
        for _, dst, s in plan.copies:
            if id(dst) in done:  # tied weights: one copy per parameter object
                continue
            done.add(id(dst))
            t = s.load() if isinstance(s, LazyTensor) else s
            if place is not None:
                t = place(t, s.device if isinstance(s, LazyTensor) else str(s.device))
            dst.copy_(t)
