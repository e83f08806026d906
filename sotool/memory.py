"""Give freed heap memory back to the operating system between large phases."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release(collect: bool = True) -> None:
    """Collect garbage and, on glibc, trim the malloc arenas (malloc_trim(0))."""
    if collect:
        gc.collect()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass
