"""Process memory: handing freed heap memory back to the operating system.

A training step allocates and frees many buffers of a few MB (dequantized weights, activations). glibc's
allocator keeps the freed ones in its heap, fragmented, so the resident size creeps up step after step
although the live tensors do not grow. ``malloc_trim`` returns the free pages; it takes about a millisecond.
(Sending every large buffer to ``mmap`` instead, with a lower ``M_MMAP_THRESHOLD``, stopped the creep too but
doubled the step time on page faults.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has no malloc_trim
    except OSError:
        return None


def trim() -> bool:
    """Return freed heap memory to the system (glibc); False where there is no such call."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0) >= 0)
