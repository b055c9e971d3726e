"""Host-memory housekeeping between chunks of long work.

glibc's allocator raises its mmap threshold after large frees, so the big
activation buffers of one VAE chunk end up in the heap, and fragments of it
stay mapped: resident memory then creeps up chunk after chunk although nothing
is held.  ``malloc_trim(0)`` hands the free heap pages back to the system.
There is no library for this one call, hence ctypes; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` function, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def trim_host_heap() -> bool:
    """Return freed heap memory to the OS (glibc); True when something was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
