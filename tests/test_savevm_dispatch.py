"""Live section handlers run through the source's and destination's one loop."""

from __future__ import annotations

import io

import pytest

from qmigx import MigrationDestination, MigrationSource, MigrationStatus, RAMBlock, RAMBlockList
from qmigx.errors import StreamError
from qmigx.qemufile import Cursor, QEMUFile
from qmigx.savevm import SaveVMHandler, Section
from qmigx.stream import SectionRecord, SectionStart, StreamParser, default_registry


class Counter(SaveVMHandler):
    """A toy live section: be32 values, 0 ends a payload; sends ``rounds`` PARTs of work."""

    idstr = "counter"
    section_id = 7

    def __init__(self, rounds: int = 3) -> None:
        self.rounds = rounds
        self.sent: list[int] = []
        self.loaded: list[int] = []
        self.calls: list[str] = []

    def read_record(self, cur, section):
        v = cur.read_be32()
        return v, v == 0

    def save_setup(self, f):
        self.calls.append("setup")
        f.put_be32(0)

    def save_pending(self, max_size=0):
        return (self.rounds * 4096, 0)

    def save_live_iterate(self, f):
        self.calls.append("iterate")
        if self.rounds:
            self.sent.append(100 + self.rounds)
            f.put_be32(100 + self.rounds)
            self.rounds -= 1
        f.put_be32(0)
        return True

    def save_complete_precopy(self, f):
        self.calls.append("complete")
        self.sent.append(1)
        f.put_be32(1)
        f.put_be32(0)

    def save_cleanup(self):
        self.calls.append("cleanup")

    def load_setup(self):
        self.calls.append("load_setup")

    def load_record(self, record, section):
        if record:
            self.loaded.append(record)

    def load_cleanup(self, ok):
        self.calls.append(f"load_cleanup {ok}")


def test_a_live_handler_travels_with_ram_in_section_id_order(tmp_path):
    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)])
    blocks["pc.ram"].memory[::4096] = 7
    src_h, dst_h = Counter(), Counter()
    dst = MigrationDestination(handlers=[dst_h])
    dst.incoming(f"unix:{tmp_path}/m.sock")
    src = MigrationSource(blocks, handlers=[src_h])
    src.migrate(f"unix:{tmp_path}/m.sock")
    assert src.wait(30) == MigrationStatus.COMPLETED, src.query()
    assert dst.wait(30) == MigrationStatus.COMPLETED, dst.query()
    assert src_h.sent == dst_h.loaded and src_h.sent[-1] == 1 and len(src_h.sent) >= 2
    assert src_h.calls[0] == "setup" and src_h.calls[-2:] == ["complete", "cleanup"]
    assert dst_h.calls == ["load_setup", "load_cleanup True"]
    assert bytes(dst.blocks["pc.ram"].memory) == bytes(blocks["pc.ram"].memory)


def test_an_inactive_handler_sends_nothing(tmp_path):
    class Off(Counter):
        def is_active(self):
            return False

    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)])
    dst = MigrationDestination(handlers=[Counter()])
    dst.incoming(f"unix:{tmp_path}/m.sock")
    src = MigrationSource(blocks, handlers=[Off()])
    src.migrate(f"unix:{tmp_path}/m.sock")
    assert src.wait(30) == MigrationStatus.COMPLETED
    assert dst.wait(30) == MigrationStatus.COMPLETED
    assert dst.registry.live("counter").calls == ["load_cleanup True"]


def test_parser_delimits_records_and_reports_their_bytes():
    buf = io.BytesIO()
    f = QEMUFile(buf.write)
    f.put_u8(1); f.put_be32(7); f.put_str8("counter"); f.put_be32(0); f.put_be32(1)
    f.put_be32(5); f.put_be32(0)
    f.put_u8(0x7E); f.put_be32(7)
    f.flush()
    reg = default_registry()
    reg.add(Counter())
    p = StreamParser(header=False, registry=reg)
    p.feed(buf.getvalue())
    p.feed_eof()
    evs = list(p.events())
    recs = [e for e in evs if isinstance(e, SectionRecord)]
    assert [r.record for r in recs] == [5, 0]
    assert [r.raw for r in recs] == [b"\0\0\0\5", b"\0\0\0\0"]
    assert isinstance(evs[0], SectionStart) and evs[0].section == Section(7, "counter", 0, 1)


def test_a_truncated_live_section_names_it():
    reg = default_registry()
    reg.add(Counter())
    p = StreamParser(header=False, registry=reg)
    p.feed(b"\x01\0\0\0\x07\x07counter\0\0\0\0\0\0\0\x01\0\0\0\x05\0\0")
    p.feed_eof()
    with pytest.raises(StreamError) as ei:
        list(p.events())
    assert ei.value.section == "counter (7)"
