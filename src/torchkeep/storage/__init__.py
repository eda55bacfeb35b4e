"""Where bytes go: local files with atomic commit (fsspec URLs come later)."""

from torchkeep.storage.local import AtomicFile, buffer_of, read_into, write_buffers

__all__ = ["AtomicFile", "buffer_of", "read_into", "write_buffers"]
