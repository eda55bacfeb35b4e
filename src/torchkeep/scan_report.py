"""What a static pickle scan found: :class:`ScanReport` (built by :func:`torchkeep.scan.scan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScanReport"]


@dataclass
class ScanReport:
    """What a file's pickles import, and whether ``torch.load(weights_only=True)`` would accept it.

    Attributes:
        path: the file scanned.
        format: ``"torch-zip"``, ``"torch-legacy"`` (pre-1.6 non-zip torch.save), ``"torch-tar"``
            (the pre-0.4 tar format), ``"pickle"`` or ``"safetensors"`` (no pickle at all).
        globals: every ``"module.name"`` the pickles import, sorted.
        unsafe: those outside the weights-only allowlist (dangerous ones included), sorted.
            The NumPy globals of plain arrays and scalars (:data:`torchkeep.scan_policy.NUMPY_GLOBALS`)
            count as safe, as ``tk.load`` accepts them, unless the file uses them for anything else
            (an object dtype, say): then they are unsafe, and ``reasons`` says why.
        reasons: ``{name: why}`` for unsafe globals that are unsafe only because of how this file uses them.
        dangerous: the explicitly dangerous ones, ``{name: reason}``.
        issues: structural problems (several PROTO, bytes after STOP, unresolvable STACK_GLOBAL,
            frames the C unpickler reads differently, a truncated or malformed pickle).
        calls: how often each call/build opcode appears (``REDUCE``, ``BUILD``, ``NEWOBJ``, ...).
        called: the globals actually invoked by those opcodes, sorted.
        pickles: the pickles scanned (zip entry names, or ``"pickle@offset"``).
        complete: False when a pickle could not be parsed to its end.
        allowed: the globals accepted only because ``allow_globals`` names them, sorted.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save({"w": torch.ones(2)}, p)
        >>> report = tk.scan(p)
        >>> report.format, report.ok, report.unsafe
        ('torch-zip', True, [])
    """

    path: str
    format: str = "pickle"
    globals: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    dangerous: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    called: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    complete: bool = True
    allowed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is unsafe, nothing dangerous, and the pickles are well formed."""
        return not self.unsafe and not self.dangerous and not self.issues

    @property
    def verdict(self) -> str:
        """``"clean"``, ``"UNSAFE"`` or ``"unreadable"`` (a truncated pickle with nothing dangerous in it)."""
        if self.ok:
            return "clean"
        if self.dangerous or self.unsafe or self.complete:
            return "UNSAFE"
        return "unreadable"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``ok`` and ``verdict``."""
        return {
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "verdict": self.verdict,
            "globals": list(self.globals),
            "unsafe": list(self.unsafe),
            "dangerous": dict(sorted(self.dangerous.items())),
            "reasons": dict(sorted(self.reasons.items())),
            "issues": list(self.issues),
            "calls": dict(self.calls),
            "called": list(self.called),
            "pickles": list(self.pickles),
            "complete": self.complete,
            "allowed": list(self.allowed),
        }

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.verdict} ({self.format}, {len(self.globals)} globals)"]
        for name in self.globals:
            if name in self.dangerous:
                lines.append(f"  DANGEROUS {name}: {self.dangerous[name]}")
            elif name in self.reasons:
                lines.append(f"  unsafe    {name}: {self.reasons[name]}")
            elif name in self.unsafe:
                lines.append(f"  unsafe    {name}")
            elif name in self.allowed:
                lines.append(f"  allowed   {name}")
            else:
                lines.append(f"  ok        {name}")
        for name, why in sorted(self.dangerous.items()):
            if name not in self.globals:
                lines.append(f"  DANGEROUS {name}: {why}")
        lines.extend(f"  issue: {issue}" for issue in self.issues)
        if self.calls:
            lines.append("  calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.calls.items())))
        return "\n".join(lines)
