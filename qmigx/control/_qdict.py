"""Key order of QEMU's QMP replies.

QEMU builds every QMP reply and event as a ``QDict``: a hash table of
512 buckets, each a list that new keys are pushed onto the front of,
and serialises it bucket by bucket. The JSON on the wire therefore lists
keys in bucket order (not in the QAPI schema's order), with later-added
keys first within a bucket. Reproducing that order lets a qmigx reply be
compared with a real QEMU 7.2's text byte for byte (observed:
``query-migrate-capabilities`` entries read ``{"state": ..,
"capability": ..}``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable, Mapping

__all__ = ["qdict_bucket", "qdict_keys", "qdict"]

_BUCKETS = 512
_M32 = 0xFFFFFFFF


@lru_cache(maxsize=None)
def qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in (the gdbm/tdb string hash)."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & _M32
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & _M32
    return ((1103515243 * value + 12345) & _M32) % _BUCKETS


def qdict_keys(keys: Iterable[str]) -> list[str]:
    """``keys`` (given in insertion order) in the order QEMU serialises them."""
    indexed = list(enumerate(keys))
    indexed.sort(key=lambda item: (qdict_bucket(item[1]), -item[0]))
    return [k for _, k in indexed]


def qdict(items: Mapping[str, Any]) -> dict[str, Any]:
    """A dict whose iteration order is QEMU's for the same insertions.

    ``items`` must iterate in the order QEMU inserts the members, which
    for QAPI structs is the schema's member order.
    """
    return {k: items[k] for k in qdict_keys(items)}
