"""The C allocator's arenas, capped for a long-running server.

glibc gives every thread that allocates its own arena and keeps each arena's high-water mark: a server
whose many worker threads (the event loop's thread pool, the tokenizer's, the engine's) at some point
each held a large request body or a long prompt's tokens keeps all those peaks resident. Two arenas are
a setting Python application servers commonly run with. The model's tensors are allocated on the
engine thread; the kernels' worker threads take only small scratch buffers. (Measured: RSS; decode
through the server was the same within this machine's noise.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2


def cap_arenas(arenas: int = ARENAS) -> bool:
    """Limit the arenas of threads created from now on; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
