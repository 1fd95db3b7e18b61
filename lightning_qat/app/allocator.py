"""Moved to `lightning_qat.allocator` (the callback applies it too); this name keeps
working."""

from lightning_qat.allocator import keep_freed_memory

__all__ = ["keep_freed_memory"]
