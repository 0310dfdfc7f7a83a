"""Give the memory of a finished burst back to the system.

After a burst the operator's objects are garbage, but its resident size stays near the
peak: CPython frees its small-object arenas only when they are wholly empty, and glibc's
malloc keeps freed blocks in its heaps for reuse instead of unmapping them. A full
collection followed by glibc's malloc_trim(0) releases both kinds of free pages; the
resync calls it once per cycle, when the interval's work is done, so memory follows the
live objects rather than the largest burst. Elsewhere than glibc it is a collection only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None on a C library without it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release() -> bool:
    """Collect garbage and return free heap pages to the system. Whether pages were trimmed
    (glibc reports it); False where the C library cannot."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    return bool(trim(0))
