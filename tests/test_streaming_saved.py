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

import contextlib
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
    out, report = _send_into_save(tmp_path, info.stream, caps, params)
    # records go from FILE itself; multifd sends from RAM, as does a mapped-ram FILE's
    # pages (they have no records to relay)
    relayed = report["file"]["pages_relayed"]
    if multifd:
        assert relayed is None, report["file"]
    else:
        assert (relayed == 0) if "mapped" in name else relayed > 0, report["file"]
    want = _ram(info.stream)
    got = _ram(out)
    assert got.keys() == want.keys()
    for idstr in want:
        assert got[idstr] == want[idstr], idstr
    summary = verify_stream(str(out))
    assert summary["vmdesc"]


@pytest.mark.parametrize("name", ["pc-xbzrle", "pc-compress", "q10-pc-xbzrle"])
def test_a_stream_saved_as_it_arrives_loads_as_the_file(name, tmp_path):
    """QEMU's own records (XBZRLE deltas, compressed pages, pages sent twice) into
    ``incoming --save`` with nothing that keeps RAM: OUT is written from the receive
    buffer, deltas applied to the page read back from OUT; it loads as the file does,
    with no XBZRLE or compressed record left."""
    info = get_stream(name)
    out = tmp_path / "out.mig"
    caps = {"compress": True} if name == "pc-compress" else None  # as QEMU, it must be asked for
    r = subprocess.run(qmigx_argv("incoming", f"exec:cat {info.stream}", "--save", out,
                                  *cap_args(caps)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want, got = load_stream(str(info.stream)), load_stream(str(out))
    assert [b.idstr for b in got.blocks] == [b.idstr for b in want.blocks]
    for b in want.blocks:
        assert bytes(got.blocks[b.idstr].memory) == bytes(b.memory), b.idstr
    assert [(s.section.idstr, s.payload) for s in got.sections] == \
        [(s.section.idstr, s.payload) for s in want.sections]
    kinds = set()
    for ev in StreamReader(str(out)).events():
        if isinstance(ev, RamPages):
            kinds |= set(np.frombuffer(ev.records.kind, np.uint8, ev.records.count).tolist())
    assert kinds <= {0, 1}, kinds


@contextlib.contextmanager
def _ram_stream(path: Path, blocks: dict, prefix: int = 0):
    """A stream of ``blocks`` (idstr -> pages) being written: yields ``(stream writer,
    RAM writer, next_part)`` inside its first PART section; ``next_part()`` starts
    another. ``prefix`` zero bytes first (``file:PATH,offset=N``)."""
    from qmigx.qemufile import QEMUFile
    from qmigx.stream import RamBlockInfo, Section
    from qmigx.tools.savestream import begin_stream, write_devices
    from qmigx.wire import SectionType

    with open(path, "wb") as fh:
        fh.write(bytes(prefix))
        f = QEMUFile(fh.write)
        w, ram = begin_stream(f)
        sec = Section(2, "ram", 0, 4)
        w.section_header(SectionType.SECTION_START, sec)
        ram.setup([RamBlockInfo(name, n * 4096, None, None) for name, n in blocks.items()])

        def next_part(kind=SectionType.SECTION_PART) -> None:
            ram.eos()
            w.footer(sec)
            w.section_header(kind, sec)
        next_part()
        yield w, ram, next_part
        next_part(SectionType.SECTION_END)
        ram.eos()
        w.footer(sec)
        write_devices(w, [], 2, False)
        f.flush()
        f.check()


def _crafted_stream(path: Path) -> None:
    """Records a spool must rebuild right: an XBZRLE delta on a ZERO record's non-zero fill
    (QEMU 7.2 sends any fill byte), on a page sent twice in one run (the second counts),
    and on a page written by the spool itself; a compressed page; two blocks in turn."""
    from qmigx import xbzrle
    from qmigx.ram import compress_page

    rng = np.random.default_rng(7)
    page = lambda: rng.integers(0, 256, 4096, dtype=np.uint8)  # noqa: E731

    def delta(old, new):
        out = np.empty(4096, np.uint8)
        n = xbzrle.encode_buffer(old, new, out)
        assert n > 0
        return out[:n].tobytes()

    with _ram_stream(path, {"a": 8, "b": 4}) as (_, ram, _):
        p0, p3, p3b, q0 = page(), page(), page(), page()
        ram.page("a", 0, p0)
        ram.zero("a", 4096, 0x37)
        ram.page("b", 0, q0)
        filled = np.full(4096, 0x37, np.uint8)
        new1 = filled.copy()
        new1[100:140] = 1
        ram.xbzrle("a", 4096, delta(filled, new1))  # against the fill, in block a after b
        ram.page("a", 3 * 4096, p3)
        ram.page("a", 3 * 4096, p3b)  # the same page again in the same run
        new3 = p3b.copy()
        new3[7] ^= 0xFF
        ram.xbzrle("a", 3 * 4096, delta(p3b, new3))
        new1b = new1.copy()
        new1b[4000:] = 9
        ram.xbzrle("a", 4096, delta(new1, new1b))  # against the page the spool wrote itself
        ram.compressed("b", 2 * 4096, compress_page(page().tobytes()))
        ram.zero("b", 3 * 4096)


def test_a_spool_rebuilds_what_it_cannot_write_as_it_came(tmp_path):
    src, out = tmp_path / "crafted.mig", tmp_path / "out.mig"
    _crafted_stream(src)
    r = subprocess.run(qmigx_argv("incoming", f"exec:cat {src}", "--save", out, *cap_args({"compress": True})),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want, got = _ram(src), _ram(out)
    assert got.keys() == want.keys() == {"a", "b"}
    for idstr in want:
        assert got[idstr] == want[idstr], idstr
    assert verify_stream(str(out))


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

    Where FILE is loaded into RAM (here: XBZRLE encodes against what was
    sent, so pages cannot be relayed from FILE), how far the loading
    thread gets before the engine takes its first pages depends on how
    long the engine's setup takes beside it: 4-30% of this 56 MB stream in
    20 runs on two busy cores (4 MiB of 880 MiB for the 1 GiB benchmark
    guest). Loading first would make it 100%. (A relay only reads record
    headers, and often has all of this file indexed before the first send.)
    """
    info = get_stream("pc-paused")
    _, report = _send_into_save(tmp_path, info.stream, {"xbzrle": True},
                                {"xbzrle-cache-size": 1 << 20})
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


def _relay_stream(path: Path, prefix: int = 0) -> None:
    """A stream whose records a relay must split right: a long run of PAGE and ZERO
    records (a ZERO with a non-zero fill among them); a page of the run sent again
    later and one made an XBZRLE delta (their latest records lie elsewhere); a run
    that restarts by naming its block after another block's records; a compressed
    page; pages never sent. ``prefix`` zero bytes first (``file:PATH,offset=N``)."""
    from qmigx import xbzrle
    from qmigx.ram import compress_page

    rng = np.random.default_rng(11)
    pages = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
    with _ram_stream(path, {"a": 64, "b": 8}, prefix) as (_, ram, next_part):
        for p in range(32):
            if p % 7 == 3:
                ram.zero("a", p * 4096)
            elif p == 20:
                ram.zero("a", p * 4096, 0x5A)
            else:
                ram.page("a", p * 4096, pages[p])
        ram.page("b", 0, pages[40])
        ram.page("a", 5 * 4096, pages[41])  # page 5 again: its latest record is here
        new = pages[10].copy()
        new[:64] = 0
        out = np.empty(4096, np.uint8)
        n = xbzrle.encode_buffer(pages[10], new, out)
        ram.xbzrle("a", 10 * 4096, out[:n].tobytes())
        next_part()
        for p in range(40, 60):  # named again after the section boundary and block b
            ram.page("a", p * 4096, pages[p])
        ram.compressed("b", 3 * 4096, compress_page(pages[42].tobytes()))
        ram.zero("b", 4 * 4096, 0x11)


@pytest.mark.parametrize("prefix", [0, 0x1000])
@pytest.mark.parametrize("into", ["incoming", "pipe"])
def test_send_relays_records_from_file_and_rebuilds_the_rest(into, prefix, tmp_path):
    """``send FILE`` sends runs of FILE's own records and the pages it had to rebuild:
    what arrives loads as FILE does (over a socket with ``sendfile``, into a pipe by
    reading FILE)."""
    src, out = tmp_path / "relay.mig", tmp_path / "out.mig"
    _relay_stream(src, prefix)
    report = tmp_path / "send.json"
    if into == "incoming":
        uri = f"unix:{tmp_path / 'mig.sock'}"
        with QmigxIncoming(uri, tmp_path, save=out) as inc:
            r = subprocess.run(qmigx_argv("send", src, uri, "--report", report),
                               capture_output=True, text=True, timeout=120)
            rc, err = inc.wait(60)
        assert rc == 0, err
    else:
        r = subprocess.run(qmigx_argv("send", src, f"exec:cat > {out}", "--report", report),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want, got = _ram(src), _ram(out)
    assert got.keys() == want.keys() == {"a", "b"}
    for idstr in want:
        assert got[idstr] == want[idstr], idstr
    f = json.loads(report.read_text())["file"]
    # at least once each (more if the engine took a page before its later record was
    # read): from FILE, 30 of a's first run (not 5 and 10), 5, a's second run, b's 0
    # and 4; from RAM, 10 and b's 3 (rebuilt) and the 17 pages never sent
    assert f["pages_relayed"] >= 30 + 1 + 20 + 2, f
    assert f["pages_from_ram"] >= 2 + 17, f
