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


def freeze_heap() -> None:
    """Collect once, then exempt every object alive now from later collections.

    After the model and its libraries are loaded, a full collection has to walk
    hundreds of thousands of long-lived objects (about 0.2 s each time); frozen, the
    per-block collections of the calibration loops scan only what was created since.
    """
    gc.collect()
    gc.freeze()
