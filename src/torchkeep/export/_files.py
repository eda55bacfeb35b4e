"""Atomic export: the exporter writes into a hidden directory beside the target, then each file is
renamed into place (the main file last), so a reader never sees a half-written artifact.

Side files (ONNX external data) carry a name unique to their export, so renaming them beside the
target never overwrites the data the previous main file still refers to; once the new main file
is in place, the side files of the previous export are removed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from torchkeep.storage.local import fsync_dir

__all__ = ["staged"]


class _Stage:
    def __init__(self, target: Path) -> None:
        self.target = target
        self.dir = target.parent / f".{target.name[:200]}.tmp-{secrets.token_hex(6)}"
        self.dir.mkdir()
        self.file = self.dir / target.name  # the exporter writes here; side files keep their final names
        self.written: list[Path] = []

    def commit(self, *, stale: Iterable[str] = ()) -> list[Path]:
        """Move every staged file beside the target, the main file last; return the final paths.

        ``stale``: names of side files of the previous artifact (beside the target) to remove once
        the new main file is in place; files this commit wrote are kept.
        """
        if not self.file.exists():
            raise FileNotFoundError(f"{self.file}: the exporter wrote nothing")
        others = sorted(p for p in self.dir.iterdir() if p != self.file)
        for p in [*others, self.file]:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            final = self.target.parent / p.name
            os.replace(p, final)
            self.written.append(final)
        fsync_dir(self.target.parent)
        for name in stale:
            old = self.target.parent / name
            if Path(name).name == name and name not in ("", ".", "..") and old not in self.written and old.is_file():
                old.unlink(missing_ok=True)
        return self.written


@contextlib.contextmanager
def staged(target: str | os.PathLike[str]) -> Iterator[_Stage]:
    """A staging directory for one export; files not committed are removed on exit.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> target = Path(tempfile.mkdtemp()) / "m.bin"
        >>> with staged(target) as st:
        ...     _ = st.file.write_bytes(b"x")
        ...     [p.name for p in st.commit()]
        ['m.bin']
    """
    path = Path(os.fspath(target)).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = _Stage(path)
    try:
        yield stage
    finally:
        shutil.rmtree(stage.dir, ignore_errors=True)
