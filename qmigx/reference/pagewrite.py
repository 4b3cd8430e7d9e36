"""Plain-Python twin of ``qmigx._core.pagewrite``: the readable reference.

``write_pages`` writes page ``i`` of a buffer (at ``pos[i]``) to a file
at ``out[i]``; pages at consecutive file offsets go out together in one
``pwritev`` of up to 1024 buffers. Same results, same errors and the same
number of system calls as the compiled kernel.
"""

from __future__ import annotations

import os

__all__ = ["write_pages"]

IOV_MAX = 1024


def write_pages(fd: int, data, pos, out, page_size: int) -> int:
    """Write ``data[pos[i]:pos[i]+page_size]`` at file offset ``out[i]``; return the calls made."""
    view = memoryview(data).cast("B")
    pos = [int(p) for p in pos]
    out = [int(o) for o in out]
    n = len(pos)
    if len(out) != n:
        raise ValueError("pos and out differ in length")
    if page_size <= 0:
        raise ValueError("page size must be positive")
    for i, p in enumerate(pos):
        if p < 0 or p + page_size > len(view):
            raise ValueError(f"page {i} at {p} lies outside the buffer of {len(view)} bytes")
    calls = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n and j - i < IOV_MAX and out[j] == out[j - 1] + page_size:
            j += 1
        bufs = [view[p : p + page_size] for p in pos[i:j]]
        want = (j - i) * page_size
        done = os.pwritev(fd, bufs, out[i])
        calls += 1
        while done < want:  # a short write: the rest page by page
            k = i + done // page_size
            inner = done % page_size
            done += os.pwrite(fd, view[pos[k] + inner : pos[k] + page_size], out[i] + done)
            calls += 1
        i = j
    return calls
