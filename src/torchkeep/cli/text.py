"""Strings from files, made safe for a terminal: the one place every human-readable output goes through.

Tensor names, metadata keys and values, pickle globals, model records and file names come
from files that anyone may have written. Printed raw, an ESC sequence in one could clear the
screen, retitle the window, hide text or fake a verdict ("OK"); a CR could overwrite the line;
a bidirectional override could reverse what follows it. rich strips only a few of these.

* :func:`clean`: every control character (C0 including ESC, CR, LF, TAB and BEL; DEL; C1 such
  as the one-byte CSI ``\\x9b``), Unicode format characters (bidirectional overrides and
  isolates, zero-width characters), unusual spaces and line/paragraph separators (what Python's
  ``str.isprintable`` rejects) become visible escapes (``\\x1b``, ``\\u202e``). Backslashes are
  left alone, so paths print as they are (a literal ``\\x1b`` in a name is four harmless characters).
* :func:`escape`: :func:`clean`, then rich markup escaping (``[bold]`` prints as text). Use it
  for anything interpolated into a rich markup string.

JSON output (``--json``) is never passed through these: it stays exact (JSON escapes control
characters itself).

Example:
    >>> clean("w\\x1b[2J\\rOK")
    'w\\\\x1b[2J\\\\rOK'
    >>> escape("[bold]x\\u202e")
    '\\\\[bold]x\\\\u202e'
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape as rich_escape

__all__ = ["clean", "escape", "escape_lines"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def clean(text: Any) -> str:
    """``str(text)`` with every character that could act on a terminal shown as an escape.

    Example:
        >>> clean("model/fc.weight"), clean("bell\\x07"), clean("caf\\u00e9 \\u202egnp.exe")
        ('model/fc.weight', 'bell\\\\x07', 'café \\\\u202egnp.exe')
    """
    s = str(text)
    if s.isprintable():
        return s  # the common case, no work
    return "".join(ch if ch.isprintable() else _visible(ch) for ch in s)


def escape(text: Any) -> str:
    """``text`` made safe for a terminal (:func:`clean`) and for rich markup (``[`` escaped)."""
    return rich_escape(clean(text))


def escape_lines(text: Any) -> str:
    """:func:`escape` line by line, keeping the line breaks: for whole messages laid out on several lines."""
    return "\n".join(escape(line) for line in str(text).split("\n"))
