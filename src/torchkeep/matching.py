"""Key matching for :func:`torchkeep.load_into` and :func:`torchkeep.restore`: put a checkpoint's names in
a model's, pair their tensors, and explain a load that cannot pass.

Names are renamed in this order: a PEFT adapter file's names to the adapter's names in the model
(:mod:`torchkeep.adapters`), the best prefix rule (``module.``, ``_orig_mod.``, ``model.`` and their
combinations, stripped or added), then the user's ``remap``. A load cannot pass when it is strict and
keys are missing or unexpected, when shapes differ (unless skipped), or when it fills fewer tensors
than ``min_matched``. Its error offers only fixes that were tried on this same load and make it pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep import adapters
from torchkeep.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    KeyMismatchError,
    TooFewMatchesError,
    format_names,
)
from torchkeep.sources import LazyTensor, shape_dtype

__all__ = [
    "MIN_MATCHED",
    "PREFIXES",
    "LoadReport",
    "Remap",
    "check_min_matched",
    "match",
    "mismatch_error",
    "plan_names",
    "premap",
]

MIN_MATCHED = 0.1
"""The default ``min_matched``: a load must fill at least a tenth of the tensors it could (of the
smaller of the model's and the checkpoint's counts), and at least one."""

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
        adapter: the PEFT adapter a checkpoint of adapter weights was loaded into (``""``: none).
        mapped: checkpoint names translated to that adapter's names in the model
            (``...lora_A.weight`` -> ``...lora_A.default.weight``).
        kept: model keys an adapter checkpoint does not hold (the base model's weights), left
            as they are; unlike ``missing``, they do not make the load incomplete.

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
    adapter: str = ""
    mapped: int = 0
    kept: list[str] = field(default_factory=list)

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
            "adapter": self.adapter,
            "mapped": self.mapped,
            "kept": list(self.kept),
        }

    def __str__(self) -> str:
        where = self.source + (f" [{self.key}]" if self.key else "")
        parts = [f"{where}: loaded {len(self.matched)} tensors"]
        if self.adapter:
            parts.append(f"mapped {self.mapped} adapter tensors to adapter {self.adapter!r}")
            if self.kept:
                parts.append(f"kept {len(self.kept)} base tensors as they were")
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


def plan_names(
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


def _prefix_hint(unexpected: list[str], missing: list[str]) -> dict[str, str] | None:
    """A ``remap`` rule ``{pattern: replacement}`` that would match more keys, when names differ by an
    unrecognised prefix."""
    if not unexpected or not missing:
        return None
    miss = set(missing)

    def heads(keys: list[str]) -> set[str]:
        return {k.split(".", 1)[0] + "." for k in keys if "." in k}

    options = [(h, "") for h in heads(unexpected)] + [("", h) for h in heads(missing)]
    options += [(a, b) for a in heads(unexpected) for b in heads(missing) if a != b]
    best, best_n = None, 0
    for old, new in sorted(options):
        n = sum(1 for k in unexpected if k.startswith(old) and new + k[len(old) :] in miss)
        if n > best_n:
            best, best_n = (old, new), n
    if best is None or best_n * 2 < min(len(unexpected), len(missing)):
        return None
    return {"^" + re.escape(best[0]): best[1]}


# -- validation -------------------------------------------------------------------------------


def check_min_matched(min_matched: Any) -> None:
    """Refuse a ``min_matched`` that is neither a count (``int`` >= 0) nor a fraction (``float`` in [0, 1])."""
    if isinstance(min_matched, bool) or not isinstance(min_matched, (int, float)):
        raise ArgumentTypeError("min_matched", min_matched, "a count of tensors (int) or a fraction (float, 0 to 1)")
    if min_matched < 0 or (isinstance(min_matched, float) and min_matched > 1):
        raise InvalidArgumentError(
            "min_matched",
            min_matched,
            "pass a count of tensors >= 0, or a fraction from 0.0 to 1.0 (0 accepts any load)",
        )


def _needed(min_matched: int | float, n_model: int, n_checkpoint: int) -> int:
    """Tensors a load must fill: an int is a count; a float, a fraction of the smaller side (at least 1)."""
    if isinstance(min_matched, int):
        return min_matched
    n = min(n_model, n_checkpoint)
    return min(n, max(1, math.ceil(min_matched * n))) if min_matched > 0 and n else 0


def premap(keys: list[str], names: adapters.AdapterNames | None) -> tuple[dict[str, str], int]:
    """``{checkpoint key: name}`` with an adapter file's names put in the model's (none taken twice)."""
    if names is None:
        return {k: k for k in keys}, 0
    used, out = set(keys), {}
    for k in keys:
        to = names.names.get(k, k)
        if to != k and to in used:
            to = k
        used.add(to)
        out[k] = to
    return out, sum(k != v for k, v in out.items())


def match(
    targets: dict[str, Any],
    tensors: dict[str, torch.Tensor | LazyTensor],
    names: adapters.AdapterNames | None,
    report: LoadReport,
    *,
    remap: Remap,
    strict: bool,
    skip_mismatched: bool,
    min_matched: int | float,
) -> tuple[list[tuple[str, Any, torch.Tensor | LazyTensor]], str]:
    """Pair checkpoint tensors with the model's, fill ``report``; the problem: ``""``, ``"keys"``
    (strictness or shapes) or ``"few"`` (fewer than ``min_matched``)."""
    pre, mapped = premap(list(tensors), names)
    final, rules, dropped, _ = plan_names(list(pre.values()), set(targets), remap)
    report.renamed, report.dropped = rules, dropped
    by_name: dict[str, torch.Tensor | LazyTensor] = {}
    unexpected = []
    for ck_key, name in ((k, final.get(p)) for k, p in pre.items()):
        if name is None:
            continue
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
    # an adapter checkpoint (adapter weights, no weight an adapter layer wraps) is demanded the
    # adapter's tensors only: the base model's are not in it
    demanded = None  # None: every model tensor
    if names and names.required & set(final.values()) and not names.wrapped & set(final.values()):
        demanded = names.required
    # a tied weight (one Parameter under two names) is loaded through either name
    loaded_ids = {id(dst) for _, dst, _ in copies}
    absent = [k for k, t in targets.items() if k not in by_name and id(t) not in loaded_ids]
    missing = [k for k in absent if demanded is None or k in demanded]
    report.matched = [k for k, t in targets.items() if id(t) in loaded_ids]
    report.missing, report.unexpected = sorted(missing), sorted(unexpected)
    report.mismatched, report.cast = sorted(mismatched), sorted(cast)
    report.adapter = names.adapter if names is not None and (demanded is not None or mapped) else ""
    report.mapped = mapped
    report.kept = sorted(set(absent) - set(missing))
    if (strict and (missing or unexpected)) or (mismatched and not skip_mismatched):
        return copies, "keys"
    if len(report.matched) < _needed(min_matched, len(targets), len(final)):
        return copies, "few"
    return copies, ""


def _kw(**opts: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())


def mismatch_error(
    problem: str,
    targets: dict[str, Any],
    tensors: dict[str, torch.Tensor | LazyTensor],
    names: adapters.AdapterNames | None,
    report: LoadReport,
    opts: dict[str, Any],
    caller: str,
    adapter_dir: str | None,
) -> KeyMismatchError:
    """The error for a load that cannot pass, with each fix it offers tried first: applied as written,
    every one makes this same load pass."""

    def passes(**change: Any) -> LoadReport | None:
        trial = LoadReport()
        return trial if not match(targets, tensors, names, trial, **{**opts, **change})[1] else None

    where = report.source + (f" [{report.key}]" if report.key else "")
    fixes: list[str] = []
    rule = _prefix_hint(report.unexpected, report.missing)
    if rule and not callable(opts["remap"]):
        remap = {**(opts["remap"] or {}), **rule}
        tries = [{}] if caller == "restore" else [{}, {"strict": False}, {"strict": False, "skip_mismatched": True}]
        for extra in tries:
            if not passes(remap=remap, **extra):
                continue
            if caller == "restore":  # tk.restore cannot rename: load_into this one module instead, as restore would
                same = {k: opts[k] for k in ("strict", "skip_mismatched") if opts[k] != (k == "strict")}
                same.update({"min_matched": opts["min_matched"]} if opts["min_matched"] != MIN_MATCHED else {})
                call = f"tk.load_into(module, {report.source!r}, key={report.key!r}, {_kw(remap=remap, **same)})"
                fixes.append(f"load this module with {call} (the names differ by a prefix)")
            else:
                fixes.append(f"pass {_kw(remap=remap, **extra)} (the names differ by a prefix)")
            break
    ck_names = list(tensors)
    if names is None and ck_names and (adapter_dir or adapters.looks_like_adapter(ck_names)):
        config = f"peft.PeftConfig.from_pretrained({adapter_dir!r})" if adapter_dir else "the adapter's config"
        fixes.append(
            "the checkpoint holds PEFT adapter weights (names such as "
            f"{next((k for k in ck_names if adapters.is_adapter_key(k)), ck_names[0])!r}) and the model has no "
            f"adapter: wrap the model as it was trained, model = peft.get_peft_model(model, {config}), then load again"
        )
    also = "or " if fixes else ""
    if problem == "keys":
        change: dict[str, Any] = {}
        if opts["strict"] and (report.missing or report.unexpected):
            change["strict"] = False
        if report.mismatched and not opts["skip_mismatched"]:
            change["skip_mismatched"] = True
        if caller == "restore":  # restore has no skip_mismatched: strict=False skips shape mismatches too
            ok = passes(strict=False, skip_mismatched=True)
            if ok:
                fixes.append(
                    f"{also}pass strict=False to tk.restore to load the {len(ok.matched)} tensors that match "
                    "and warn about the rest"
                )
        elif change and (ok := passes(**change)):
            fixes.append(
                f"{also}pass {_kw(**change)} to load the {len(ok.matched)} tensors that match and report the rest"
            )
        if not fixes:
            fixes.append(
                "no option makes this load pass: loading only what matches would fill fewer tensors than "
                f"min_matched={opts['min_matched']!r}; is it the checkpoint of this model (and of its config)?"
            )
        return KeyMismatchError(where, report.missing, report.unexpected, report.mismatched, fix="; ".join(fixes))
    n = len(report.matched)
    need = _needed(opts["min_matched"], len(targets), len(tensors) - len(report.dropped))
    head = (
        f"a load must fill at least {need} tensor(s) (min_matched={opts['min_matched']!r}) and this one fills {n} "
        f"of the model's {len(targets)} from the checkpoint's {len(tensors)}: the names do not correspond"
    )
    to = " to tk.restore" if caller == "restore" else ""
    what = f"only these {n} tensor(s)" if n else "nothing"
    fixes.append(f"{also}pass min_matched=0{to} if loading {what} is what you want")
    err = TooFewMatchesError(
        where, report.missing, report.unexpected, report.mismatched, fix=f"{head}; {'; '.join(fixes)}"
    )
    err.matched, err.needed = n, need
    return err
