"""``qmigx send FILE`` and ``qmigx incoming --save OUT`` stream.

``send`` loads FILE in a thread while the RAM engine sends what is loaded
(:mod:`qmigx.tools.feed`), ``incoming --save`` appends pages to OUT as
they are placed (:mod:`qmigx.tools.journal`). Real QEMU streams with the
hard cases: a live save where pages come several times and as XBZRLE
deltas, compressed pages, QEMU 10's conventions, mapped-ram; each sent
from FILE into OUT must load to exactly what FILE loads to, and OUT must
pass ``verify``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qmigx.stream import RamPages
from qmigx.tools.streams import StreamReader, load_stream, verify_stream

from qemu_support.live import QmigxIncoming, cap_args, param_args, qmigx_argv
from qemu_support.streams import get_stream, set_default_cache_dir

pytestmark = pytest.mark.qemu

MULTIFD = ({"multifd": True}, {"multifd-channels": 2})


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


def _send_into_save(tmp_path, stream, caps=None, params=None):
    uri = f"unix:{tmp_path / 'mig.sock'}"
    out = tmp_path / "out.mig"
    with QmigxIncoming(uri, tmp_path, caps=caps, params=params, save=out) as inc:
        r = subprocess.run(qmigx_argv("send", stream, uri, *cap_args(caps), *param_args(params),
                                      "--report", tmp_path / "src.json"),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        rc, err = inc.wait(60)
        assert rc == 0, err
    return out, json.loads((tmp_path / "src.json").read_text())


def _ram(path):
    return {b.idstr: bytes(b.memory) for b in load_stream(str(path)).blocks}


@pytest.mark.parametrize("name", ["pc-xbzrle", "pc-live", "pc-compress", "q10-pc-xbzrle",
                                  "q10-pc-mapped-live"])
@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
def test_streamed_send_into_streamed_save_loads_as_file(name, multifd, tmp_path):
    info = get_stream(name)
    caps, params = MULTIFD if multifd else (None, None)
    out, _ = _send_into_save(tmp_path, info.stream, caps, params)
    want = _ram(info.stream)
    got = _ram(out)
    assert got.keys() == want.keys()
    for idstr in want:
        assert got[idstr] == want[idstr], idstr
    summary = verify_stream(str(out))
    assert summary["vmdesc"]


def test_the_live_stream_repeats_pages_and_has_xbzrle_records():
    """What makes the case above hard is really there."""
    path = str(get_stream("pc-xbzrle").stream)
    seen, repeated, xbzrle = set(), 0, 0
    for ev in StreamReader(path).events():
        if type(ev) is RamPages:
            rec = ev.records
            kinds = np.frombuffer(rec.kind, np.uint8, rec.count)
            xbzrle += int((kinds == 2).sum())
            for b, off in zip(np.frombuffer(rec.block, np.int32, rec.count),
                              np.frombuffer(rec.offset, np.uint64, rec.count)):
                key = (int(b), int(off))
                repeated += key in seen
                seen.add(key)
    assert repeated > 0 and xbzrle > 0


def test_send_begins_before_file_is_read(tmp_path):
    """The first page goes when a part of FILE was parsed, not after loading it whole.

    How far the loading thread gets before the engine takes its first pages
    depends on how long the engine's setup takes beside it: 4-30% of this
    56 MB stream in 20 runs on two busy cores (4 MiB of 880 MiB for the
    1 GiB benchmark guest). Loading first would make it 100%.
    """
    info = get_stream("pc-paused")
    _, report = _send_into_save(tmp_path, info.stream)
    f = report["file"]
    assert f["parsed_at_first_send"] is not None
    assert f["parsed_at_first_send"] < f["bytes"] // 2, f


def test_a_truncated_file_fails_both_sides(tmp_path):
    """FILE ending early, found while pages already go: send fails with the stream's error."""
    info = get_stream("pc-xbzrle")
    data = Path(info.stream).read_bytes()
    cut = tmp_path / "cut.mig"
    cut.write_bytes(data[: len(data) // 2])
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with QmigxIncoming(uri, tmp_path, save=tmp_path / "out.mig") as inc:
        r = subprocess.run(qmigx_argv("send", cut, uri), capture_output=True, text=True,
                           timeout=120)
        rc, err = inc.wait(60)
    assert r.returncode == 1 and "unexpected end of stream" in r.stderr, r.stderr
    assert rc == 1, err
