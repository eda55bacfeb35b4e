"""Checkpoint file names from a template: ``"{model}_e{epoch}_acc{val_acc:.2f}"`` -> ``vgg16_e100_acc0.85.safetensors``.

Fields are parsed here rather than by :meth:`str.format`, so metric names with dots or
slashes work as field names (``{val/acc:.2f}``, ``{train.loss}``). Filled values are made
path-safe: each of ``/ \\ : * ? " < > |``, whitespace and control characters becomes ``_``,
and a name that would start with ``.`` (hidden, like torchkeep's temp files) starts with
``_`` instead. ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from torchkeep.errors import FilenameTemplateError, MissingFilenameFieldError

__all__ = [
    "DIR_SUFFIX",
    "DIR_SUFFIXES",
    "MAX_STEM_BYTES",
    "SHARDS_SUFFIX",
    "SUFFIX",
    "SUFFIXES",
    "fill",
    "parse",
    "safe",
    "template_pattern",
    "unique_name",
]

SUFFIX = ".safetensors"
#: the suffix of a distributed (sharded, ``torchkeep.distributed``) checkpoint directory
DIR_SUFFIX = ".dcp"
#: the suffix of an incremental checkpoint directory (a shard set whose unchanged shards are links)
SHARDS_SUFFIX = ".shards"
#: the suffixes of checkpoints that are directories
DIR_SUFFIXES = (DIR_SUFFIX, SHARDS_SUFFIX)
SUFFIXES = (SUFFIX, DIR_SUFFIX, SHARDS_SUFFIX)
_UNSAFE = re.compile(r'[/\\:*?"<>|\s\x00-\x1f\x7f]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: longest stem (UTF-8 bytes) a template may give: with ``-vN``, the suffix and a temp file's
#: ``.NAME.tmp-XXXXXXXXXXXX`` it stays under the 255-byte name limit of common file systems
MAX_STEM_BYTES = 200


def parse(template: str) -> list[tuple[str, str | None, str]]:
    """Split a template into ``(literal, field, spec)`` pieces (``field`` is ``None`` for trailing text).

    Example:
        >>> parse("e{epoch}_acc{val/acc:.2f}")
        [('e', 'epoch', ''), ('_acc', 'val/acc', '.2f')]
    """
    pieces: list[tuple[str, str | None, str]] = []
    lit: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c == "{" and template.startswith("{{", i):
            lit.append("{")
            i += 2
        elif c == "}" and template.startswith("}}", i):
            lit.append("}")
            i += 2
        elif c == "{":
            end = template.find("}", i)
            if end < 0:
                raise FilenameTemplateError(f"filename template {template!r}: '{{' at {i} is never closed")
            name, _, spec = template[i + 1 : end].partition(":")
            if not name or "{" in name:
                raise FilenameTemplateError(f"filename template {template!r}: empty or nested field at {i}")
            pieces.append(("".join(lit), name, spec))
            lit = []
            i = end + 1
        elif c == "}":
            raise FilenameTemplateError(f"filename template {template!r}: single '}}' at {i}; write '}}}}'")
        else:
            lit.append(c)
            i += 1
    if lit:
        pieces.append(("".join(lit), None, ""))
    for text, _, _ in pieces:
        if "/" in text or "\\" in text:
            raise FilenameTemplateError(
                f"filename template {template!r}: names a file, not a path; drop the '/' "
                "(the directory is the CheckpointManager's)"
            )
        if _CONTROL.search(text):
            raise FilenameTemplateError(
                f"filename template {template!r}: its text holds a control character "
                f"({_CONTROL.search(text)[0]!r}), which no file name may hold; remove it"
            )
    return pieces


def safe(text: str) -> str:
    """``text`` with path-unsafe characters replaced by ``_``.

    Example:
        >>> safe("a/b c:d")
        'a_b_c_d'
    """
    return _UNSAFE.sub("_", text)


def fill(template: str, values: Mapping[str, Any]) -> str:
    """The file stem for ``template`` filled from ``values`` (no suffix, no collision handling).

    Raises:
        MissingFilenameFieldError: a field is not in ``values`` (lists the available names).
        FilenameTemplateError: a malformed template, a value its format spec does not fit, or a name
            over :data:`MAX_STEM_BYTES` bytes (the message names the longest field).

    Example:
        >>> fill("{model}_e{epoch}_acc{val_acc:.2f}", {"model": "vgg16", "epoch": 100, "val_acc": 0.8512})
        'vgg16_e100_acc0.85'
    """
    pieces = parse(template)
    missing = {f for _, f, _ in pieces if f is not None and f not in values}
    if missing:
        raise MissingFilenameFieldError(template, missing, values)
    out: list[str] = []
    sizes: list[tuple[int, str]] = []
    for text, field, spec in pieces:
        out.append(text)
        if field is None:
            continue
        try:
            out.append(safe(format(values[field], spec)))
            sizes.append((len(out[-1].encode("utf-8", "surrogatepass")), field))
        except (ValueError, TypeError) as e:
            raise FilenameTemplateError(
                f"filename template {template!r}: cannot format {field}={values[field]!r} with {spec!r} ({e})"
            ) from None
    stem = "".join(out)
    size = len(stem.encode("utf-8", "surrogatepass"))
    if size > MAX_STEM_BYTES:
        big, name = max(sizes, default=(0, ""))
        longest = f"its longest field is {{{name}}} ({big} bytes): shorten that value" if name else "shorten it"
        raise FilenameTemplateError(
            f"filename template {template!r} gives a {size}-byte name, over the {MAX_STEM_BYTES}-byte limit "
            f"(file systems allow 255 bytes, with the suffix and temp names); {longest} (a string field can be "
            "cut with a precision, e.g. {name:.40})"
        )
    if stem.endswith(SUFFIX):
        stem = stem[: -len(SUFFIX)]
    if not stem:
        raise FilenameTemplateError(f"filename template {template!r} gives an empty name")
    if stem.startswith("."):
        stem = "_" + stem[1:]
    return stem


def unique_name(stem: str, taken: Collection[str], suffix: str = SUFFIX) -> str:
    """``stem + suffix``, or ``stem-v1``, ``stem-v2``, ... + ``suffix``: the first not in ``taken``.

    Example:
        >>> unique_name("ckpt", {"ckpt.safetensors", "ckpt-v1.safetensors"})
        'ckpt-v2.safetensors'
        >>> unique_name("ckpt", {"ckpt.safetensors"}, DIR_SUFFIX)
        'ckpt.dcp'
    """
    name = stem + suffix
    k = 0
    while name in taken:
        k += 1
        name = f"{stem}-v{k}{suffix}"
    return name


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching every name ``template`` can produce (with ``-vN``, and any of :data:`SUFFIXES`).

    Example:
        >>> bool(template_pattern("ckpt_{step:06d}").fullmatch("ckpt_000012-v1.safetensors"))
        True
        >>> bool(template_pattern("ckpt_{step:06d}").fullmatch("ckpt_000012.dcp"))
        True
    """
    parts = []
    for text, field, _ in parse(template):
        parts.append(re.escape(safe(text)))
        if field is not None:
            parts.append(".*")
    body = "".join(parts)
    if body.endswith(re.escape(SUFFIX)):
        body = body[: -len(re.escape(SUFFIX))]
    if body.startswith(r"\."):
        body = "_" + body[2:]
    either = "|".join(re.escape(s) for s in SUFFIXES)
    return re.compile(body + r"(?:-v\d+)?(?:" + either + ")", re.DOTALL)
