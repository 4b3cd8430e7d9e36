"""Per-chunk content digests, plain numpy (test oracle for ``qmigx._core.chunkhash``).

Same names and results as the compiled kernel, whose docstring defines
the digest; written as whole-array steps instead of a loop over words.
"""

from __future__ import annotations

import numpy as np

from qmigx.errors import ParameterError

__all__ = ["chunk_digests"]

_SALT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def chunk_digests(buf, chunk_size: int, digests, zero) -> None:
    """Digest each ``chunk_size`` bytes of ``buf``; see the compiled kernel."""
    data = np.frombuffer(memoryview(buf).cast("B"), np.uint8)
    if chunk_size <= 0 or chunk_size % 8:
        raise ParameterError(f"chunk size {chunk_size} is not a positive multiple of 8",
                             field="chunk_size")
    if len(data) % chunk_size:
        raise ParameterError(f"{len(data)} bytes are not a whole number of {chunk_size}-byte "
                             "chunks", field="buf")
    nchunks = len(data) // chunk_size
    if len(digests) < nchunks or len(zero) < nchunks:
        raise ParameterError(f"output arrays hold fewer than {nchunks} chunks", field="digests")
    nwords = chunk_size // 8
    salts = np.arange(1, nwords + 1, dtype=np.uint64) * _SALT
    with np.errstate(over="ignore"):
        for c in range(nchunks):
            words = data[c * chunk_size : (c + 1) * chunk_size].view("<u8")
            acc = _mix(words + salts).sum(dtype=np.uint64)
            digests[c] = _mix(np.array([acc ^ np.uint64(nwords)], np.uint64))[0]
            zero[c] = not words.any()
