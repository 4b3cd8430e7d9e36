"""Postcopy connections cut at many points, qmigx <-> qmigx: pause, recover, nothing lost.

Each case cuts the connection once in the background stream, recovers,
and cuts it again at a chosen moment after ``migrate resume=true``: in the
middle of the resume handshake (RECV_BITMAP, the received bitmap, RESUME,
RESUME_ACK), just after it, or well into the resumed stream. Both sides
must pause again each time (never ``failed``), the source's memory must
stay as it was, and the last recovery must complete with the destination
holding the source's memory byte for byte.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from qemu_support.proxy import Proxy
from test_postcopy import WAIT, S, _blocks, _uffd_or_skip, proxied_pair

PAUSED_OR_DONE = (S.POSTCOPY_PAUSED, S.COMPLETED)


def _wait_in(side, states, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while side.c.state.state not in states:
        assert side.c.state.state is not S.FAILED, side.error
        assert time.monotonic() < deadline, f"{side.c.state.state} after {timeout} s"
        time.sleep(0.002)
    return side.c.state.state


def _port(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


def _cut_and_check(proxy, src, dst, blocks):
    snapshot = {b.idstr: b.memory.copy() for b in blocks}
    proxy.cut()
    s = _wait_in(src, PAUSED_OR_DONE)
    d = _wait_in(dst, PAUSED_OR_DONE)
    # both pause; or the destination had the whole stream: it completes, and the source,
    # cut before the destination's SHUT reached it, may not know (QEMU pauses there too)
    assert s == d or (d is S.COMPLETED and s is S.POSTCOPY_PAUSED), (s, d)
    for b in blocks:
        assert np.array_equal(snapshot[b.idstr], b.memory), b.idstr
    return d


@pytest.mark.parametrize("second_cut", [0.0, 0.005, 0.05, 0.4],
                         ids=["in-handshake", "5ms", "50ms", "400ms"])
@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_cut_again_after_resume(preempt, second_cut):
    _uffd_or_skip()
    caps = ["postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
    blocks = _blocks(8)
    dst, proxy, src = proxied_pair(caps, blocks, postcopy_bandwidth=1 << 20)
    try:
        src.migrate(f"tcp:127.0.0.1:{proxy.port}")
        time.sleep(0.2)
        src.start_postcopy()
        _wait_in(src, (S.POSTCOPY_ACTIVE,))
        time.sleep(0.5)
        assert _cut_and_check(proxy, src, dst, blocks) is S.POSTCOPY_PAUSED
        cut_after_end = False
        for cut in (second_cut, None):
            proxy = Proxy(_port(dst.recover("tcp:127.0.0.1:0")))
            src.migrate(f"tcp:127.0.0.1:{proxy.port}", resume=True)
            if cut is None:
                break
            # from when the destination has accepted the new connection
            _wait_in(dst, (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.COMPLETED))
            time.sleep(cut)
            if _cut_and_check(proxy, src, dst, blocks) is S.COMPLETED:
                cut_after_end = True
                break
        assert dst.wait(60) is S.COMPLETED, dst.error
        want = (S.COMPLETED, S.POSTCOPY_PAUSED) if cut_after_end else (S.COMPLETED,)
        assert src.wait(5) in want, (src.c.state.state, src.error)
    finally:
        src.cancel()
        dst.cancel()
        proxy.cut()
    for b in blocks:
        got, want = dst.blocks[b.idstr].memory.reshape(-1, 4096), b.memory.reshape(-1, 4096)
        bad = np.flatnonzero((got != want).any(axis=1))
        assert bad.size == 0, f"{b.idstr}: {bad.size} pages differ, first {bad[:8].tolist()}"
    assert dst.postcopy_report()["requests"] > 0
