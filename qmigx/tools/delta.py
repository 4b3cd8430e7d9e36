"""Incremental saved states on a template: ``qmigx diff`` and its inverse.

VM templating starts clones with the template's RAM file mapped
``share=off``: each clone reads the template's pages until it writes its
own. A saved state of a clone then needs to carry only what differs from
the template. :func:`diff_streams` writes such a *delta*: a complete
QEMU 7.2 migration stream (header, configuration, RAM setup, device
sections and vmdesc of NEW) whose RAM records, for the blocks the
template backs (the guest RAM: ``pc.ram`` or the memory backends), hold
only the pages that differ from BASE (as XBZRLE against BASE's page when
that is smaller, with ``--ram-encoding xbzrle``), and for every other
block (ROMs, ACPI tables) every page: a QEMU destination started with
``-incoming`` does not fill ROM blocks itself.

A QEMU 7.2 destination whose guest RAM is BASE's RAM file mapped
``share=off`` loads the delta and ends with NEW's RAM: pages not sent
keep the file's content, XBZRLE records apply to it. qmigx loads it over
BASE (:func:`load_delta`, ``load_stream(OUT, base=BASE)``,
``extract OUT DIR --base BASE``) and writes the full stream back
(:func:`apply_delta`).

The delta records which base it was made against in a vmdesc key QEMU
never reads (``"qmigx-delta"``: the XXH64 of each template block's
content, their names, the encoding), and qmigx refuses to apply it to
RAM with other digests (deltas made before carry a SHA-256 over the
blocks instead, still checked). Deltas chain: D2 made from NEW1 applies
over BASE + D1.

BASE and NEW files that are plain streams are read where their pages lie
(:mod:`qmigx.tools.pageindex`), not loaded into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Callable, Optional, Sequence, Union

import numpy as np

from qmigx import _backend
from qmigx.errors import StreamError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RAMBlockList, RamWriter
from qmigx.records import Record
from qmigx.stream import RamBlockInfo, StreamWriter
from qmigx.stream.reader import Source
from qmigx.tools.physmap import main_ram_blocks
from qmigx.wire import TARGET_PAGE_SIZE, SectionType

__all__ = ["DeltaStats", "diff_streams", "load_delta", "apply_delta", "delta_info",
           "ram_digest", "DELTA_KEY"]

_pagediff = _backend.load("pagediff")

#: The vmdesc key a delta carries (QEMU skips the vmdesc on load).
DELTA_KEY = "qmigx-delta"
_CHUNK_PAGES = 16384  # pages compared at a time (64 MiB)


class DeltaStats(Record, mutable=True):
    """What a delta holds."""

    template_pages: int = 0
    changed_pages: int = 0
    zero_pages: int = 0
    xbzrle_pages: int = 0
    full_pages: int = 0
    other_pages: int = 0
    bytes: int = 0


def template_names(blocks) -> list[str]:
    """The blocks a template backs: the guest RAM (not ROMs, firmware or device memory)."""
    infos = [RamBlockInfo(b.idstr, b.used_length, None, getattr(b, "gpa", None))
             for b in blocks]
    try:
        return [b.idstr for b in main_ram_blocks(infos)]
    except StreamError:
        return [b.idstr for b in infos if "/" not in b.idstr and b.idstr not in
                ("pc.bios", "pc.rom")]


def ram_digest(blocks: RAMBlockList, names: Sequence[str]) -> str:
    """SHA-256 over the named blocks: idstr, used length and content, in order.

    The base digest of deltas made before it became XXH64 per block
    (:func:`~qmigx.tools.pageindex.block_digests`): still checked.
    """
    h = hashlib.sha256()
    for name in names:
        blk = blocks[name]
        h.update(name.encode() + b"\0" + blk.used_length.to_bytes(8, "big"))
        mem = blk.memory
        for lo in range(0, len(mem), 64 << 20):
            h.update(mem[lo : lo + (64 << 20)])
    return h.hexdigest()


def delta_info(vmdesc: Optional[bytes]) -> Optional[dict]:
    """The ``qmigx-delta`` entry of a stream's vmdesc, or None for a full stream."""
    if not vmdesc:
        return None
    try:
        return json.loads(vmdesc).get(DELTA_KEY)
    except (ValueError, AttributeError):
        return None


def _loaded(src: Union[Source, object]):
    from qmigx.tools.saveimage import opened_stream as _opened
    from qmigx.tools.loaded import LoadedStream, load_plain as load_stream

    if isinstance(src, LoadedStream):
        return src
    with _opened(src) as s:
        if isinstance(s, (str, os.PathLike)):  # a file: map it, page data is copied out once
            return load_stream(s, use_mmap=True)
        return load_stream(s)


def _side(src):
    """BASE or NEW as pages to read: the file indexed in place when it is a plain stream file,
    else loaded (a save image, bytes, a stream that needs decoding, a loaded delta result)."""
    from qmigx.tools.loaded import LoadedStream
    from qmigx.tools.pageindex import LoadedPages, index_stream
    from qmigx.tools.saveimage import opened_stream as _opened

    if not isinstance(src, LoadedStream):
        with _opened(src) as s:
            if isinstance(s, (str, os.PathLike)):
                indexed = index_stream(s)
                if indexed is not None:
                    return indexed
    return LoadedPages(_loaded(src))


def diff_streams(base, new, sink: Callable, *, encoding: str = "page") -> DeltaStats:
    """Write to ``sink`` the delta that takes BASE's RAM to NEW's (see the module docstring).

    ``base`` and ``new`` are streams (paths, bytes, save images) or loaded
    streams; NEW must be a full stream, BASE may itself be a loaded delta
    result. ``encoding``: ``page`` sends a changed page whole, ``xbzrle``
    as an XBZRLE delta against BASE's page when that is smaller. A plain
    stream file is read where its pages lie (:mod:`qmigx.tools.pageindex`),
    not loaded.
    """
    if encoding not in ("page", "xbzrle"):
        raise ValueError(f"diff encoding must be page or xbzrle, not {encoding!r}")
    with _side(base) as b, _side(new) as n:
        return _diff(b, n, sink, encoding)


def _diff(b, n, sink: Callable, encoding: str) -> DeltaStats:
    from qmigx import xbzrle, zeropage
    from qmigx.tools.pageindex import block_digests

    new = n.stream
    if delta_info(new.vmdesc) is not None:
        raise StreamError("NEW is itself a delta; diff needs NEW as a full stream",
                          field="vmdesc")
    if new.ram_setup is None:
        raise StreamError("NEW has no RAM setup record", section="ram")
    names = template_names(new.ram_setup.blocks)
    for name in names:
        if b.length(name) != n.length(name):
            raise StreamError(f"BASE has no RAM block {name!r} of NEW's size",
                              field="ram blocks")
    # the digest kernel releases the GIL: BASE is digested while the pages are compared
    digests: dict = {}
    hasher = threading.Thread(target=lambda: digests.update(block_digests(b, names)),
                              name="base-digest", daemon=True)
    hasher.start()
    stats = DeltaStats()
    f = QEMUFile(sink)
    w = StreamWriter(f)
    ram = RamWriter(f)
    w.header()
    if new.configuration is not None:
        w.raw_configuration(new.configuration.raw)
    sec = new.ram_setup.section
    ignore_shared = new.configuration is not None and "x-ignore-shared" in \
        new.configuration.capabilities
    w.section_header(SectionType.SECTION_START, sec)
    ram.setup(new.ram_setup.blocks, ignore_shared=ignore_shared)
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_PART, sec)
    ps = TARGET_PAGE_SIZE
    mask = np.empty(_CHUNK_PAGES, np.uint8)
    for info in new.ram_setup.blocks:
        name = info.idstr
        if name not in names:
            stats.other_pages += _all_pages(ram, name, n.block(name), zeropage)
            continue
        old_data, old_offs = b.view(name)
        new_data, new_offs = n.view(name)
        pages = len(new_offs)
        stats.template_pages += pages
        for lo in range(0, pages, _CHUNK_PAGES):
            hi = min(pages, lo + _CHUNK_PAGES)
            if not _pagediff.changed_pages(old_data, old_offs[lo:hi], new_data, new_offs[lo:hi],
                                          mask, ps):
                continue
            changed = np.flatnonzero(mask[: hi - lo]) + lo
            stats.changed_pages += len(changed)
            offs = changed.astype(np.uint64) * np.uint64(ps)
            if _pagediff.zero_pages(new_data, new_offs[changed], mask, ps):
                zmap = mask[: len(changed)].astype(bool)
                ram.zeros(name, offs[zmap])
                stats.zero_pages += int(zmap.sum())
                changed, offs = changed[~zmap], offs[~zmap]
            if encoding == "page":
                ram.page_rows(name, offs, n.pages(name, changed))
                stats.full_pages += len(changed)
                continue
            self_x, self_p = _xbzrle_pages(ram, name, (old_data, old_offs[changed]),
                                           (new_data, new_offs[changed]), offs, xbzrle)
            stats.xbzrle_pages += self_x
            stats.full_pages += self_p
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_END, sec)
    ram.eos()
    w.footer(sec)
    for dev in new.sections:
        w.section(dev.type, dev.section, dev.payload)
    w.eof()
    hasher.join()
    meta = {"base-xxh64": digests, "blocks": names, "encoding": encoding,
            "changed-pages": stats.changed_pages}
    w.vmdesc(_with_key(new.vmdesc, meta))
    f.flush()
    f.check()
    stats.bytes = f.total_transferred
    return stats


def _xbzrle_pages(ram: RamWriter, name: str, old: tuple, new: tuple, offsets: np.ndarray,
                  xbzrle) -> tuple[int, int]:
    """Changed pages as XBZRLE against the base page where smaller, else whole, in order.

    ``old`` and ``new`` are (buffer, page offsets in it) as :meth:`view` gives
    them: the pages are encoded where they lie, only whole pages are copied.
    """
    ps = TARGET_PAGE_SIZE
    xbz = full = 0
    batch = 4096
    records = np.empty(batch * (11 + ps), np.uint8)
    out = np.empty((batch, ps), np.uint8)
    lengths = np.empty(batch, np.int32)
    old_data, old_offs = old
    new_data, new_offs = new
    for lo in range(0, len(offsets), batch):
        offs = offsets[lo : lo + batch]
        nb = len(offs)
        xbzrle.encode_at(old_data, old_offs[lo : lo + nb], new_data, new_offs[lo : lo + nb], ps,
                         out[:nb], lengths[:nb])
        small = (lengths[:nb] > 0) & (lengths[:nb] < ps - 3)
        # runs of whole pages and runs of XBZRLE records go out in bulk
        edges = np.flatnonzero(small[1:] != small[:-1]) + 1
        for k, j in zip(np.r_[0, edges], np.r_[edges, nb]):
            k, j = int(k), int(j)
            if small[k]:
                m = k
                if ram.last_block != name:  # the first record names the block
                    ram.xbzrle(name, int(offs[m]), out[m, : lengths[m]])
                    m += 1
                if m < j:
                    size = _pagediff.xbzrle_records(offs[m:j], out[m:j], lengths[m:j], records)
                    ram.f.write(records[:size])
                xbz += j - k
            else:
                rows = np.empty((j - k, ps), np.uint8)
                _pagediff.gather_pages(new_data, new_offs[lo + k : lo + j], rows)
                ram.page_rows(name, offs[k:j], rows)
                full += j - k
    return xbz, full


def _all_pages(ram: RamWriter, name: str, mem: np.ndarray, zeropage) -> int:
    """Every page of a block, zero pages as ZERO records, in order."""
    ps = TARGET_PAGE_SIZE
    zmap = zeropage.zero_page_map(mem, ps)
    offsets = np.arange(len(zmap), dtype=np.uint64) * np.uint64(ps)
    edges = np.flatnonzero(np.diff(zmap.astype(np.int8))) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(zmap)]):
        if zmap[lo]:
            ram.zeros(name, offsets[lo:hi])
        else:
            ram.pages(name, mem, offsets[lo:hi])
    return len(zmap)


def _with_key(vmdesc: Optional[bytes], meta: dict) -> bytes:
    """NEW's vmdesc text with the delta key added before its closing brace."""
    entry = json.dumps({DELTA_KEY: meta}, separators=(", ", ": "))[1:-1]
    if not vmdesc:
        return ('{"page_size": %d, "devices": [], %s}' % (TARGET_PAGE_SIZE, entry)).encode()
    text = vmdesc.rstrip()
    if not text.endswith(b"}"):
        raise StreamError("NEW's vmdesc is not a JSON object", field="vmdesc")
    return text[:-1] + b", " + entry.encode() + b"}"


def load_delta(delta: Source, base, *, chain: Sequence = ()):
    """Load a delta over its base: BASE's RAM, then each of ``chain``, then ``delta``.

    ``base`` is a full stream (path, bytes, image) or a loaded one; ``chain``
    lists the deltas between BASE and this one, oldest first. Each delta's
    recorded base digest must match the RAM it is applied to.
    """
    from qmigx.tools.saveimage import opened_stream as _opened
    from qmigx.tools.loaded import load_plain as load_stream

    cur = _loaded(base)
    for step in [*chain, delta]:
        vmdesc = _vmdesc_of(step)
        info = delta_info(vmdesc)
        if info is None:
            raise StreamError("not a delta (its vmdesc has no qmigx-delta entry)",
                              field="vmdesc")
        names = info.get("blocks", [])
        missing = [n for n in names if n not in cur.blocks]
        if missing:
            raise StreamError(f"the base has no RAM block {missing[0]!r}", field="ram blocks")
        if "base-xxh64" in info:
            from qmigx.tools.pageindex import LoadedPages, block_digests

            want, have = info["base-xxh64"], block_digests(LoadedPages(cur), names)
        else:  # a delta made before the digest was XXH64
            want, have = info.get("base-sha256"), ram_digest(cur.blocks, names)
        if have != want:
            raise StreamError(
                f"delta made against another base (its base RAM has digest {want}, "
                f"this base {have})", field="vmdesc")
        with _opened(step) as src:
            cur = load_stream(src, cur.blocks, create_missing=True)
    return cur


def _vmdesc_of(step) -> Optional[bytes]:
    """A stream's vmdesc text: from its end when it can seek, else by reading it through."""
    from qmigx.stream import VMDescription
    from qmigx.stream.reader import StreamReader
    from qmigx.tools.saveimage import opened_stream as _opened

    with _opened(step) as src:
        reader = StreamReader(src)
        if reader.vmdesc_text is not None:
            return reader.vmdesc_text
    with _opened(step) as src:
        for ev in StreamReader(src, vmdesc=None).events():
            if type(ev) is VMDescription:
                return ev.json
    return None


def apply_delta(base, delta: Source, sink: Callable, *, chain: Sequence = ()) -> None:
    """Write the full stream a delta stands for: its devices, and all RAM as loaded."""
    from qmigx.tools.savestream import save_stream

    loaded = load_delta(delta, base, chain=chain)
    text = _strip_key(loaded.vmdesc) if loaded.vmdesc else None
    sec = loaded.ram_setup.section if loaded.ram_setup is not None else None
    order = [b.idstr for b in loaded.ram_setup.blocks] if loaded.ram_setup else []
    blocks = RAMBlockList([loaded.blocks[n] for n in order])
    save_stream(sink, blocks, loaded.sections, vmdesc=text or False,
                configuration=loaded.configuration,
                first_section_id=sec.section_id if sec is not None else 2,
                ignore_shared=bool(loaded.configuration and "x-ignore-shared" in
                                   loaded.configuration.capabilities))


def _strip_key(text: bytes) -> bytes:
    """The vmdesc text without the delta key (it was appended last by :func:`_with_key`)."""
    i = text.rfind(b', "' + DELTA_KEY.encode() + b'"')
    return text[:i] + b"}" if i >= 0 else text
