"""A saved state as guest-physical memory: ELF cores and the Python view.

* :func:`extract_elf` writes the core QEMU 7.2's ``dump-guest-memory``
  (paging off) would have written for the paused VM the stream was saved
  from (:mod:`qmigx.tools.elfcore` for the format): headers and notes
  first, from the device sections read off the stream's ends
  (:mod:`qmigx.tools.savedstate`), then one pass over the stream writes
  each page where its range sits in the file (:mod:`qmigx.tools.ramfile`),
  sparsely, so memory use does not depend on the guest's size.
* :func:`physical_memory` loads the stream and answers reads by
  guest-physical address, across RAM blocks.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

from qmigx.errors import MachineLayoutError
from qmigx.records import Record
from qmigx.stream import RamPages, RamSetup, SectionEnd
from qmigx.stream.reader import Source, StreamReader
from qmigx.tools.elfcore import ElfLayout, cpu_states, elf_layout
from qmigx.tools.physmap import PhysRange, guest_phys_ranges
from qmigx.tools.ramfile import RamFileSink, Region
from qmigx.tools.saveimage import opened_stream as _opened
from qmigx.tools.savedstate import SavedState, saved_state
from qmigx.wire import SectionType

__all__ = ["extract_elf", "extract_files", "physical_ranges", "physical_memory",
           "PhysicalMemory"]


def physical_ranges(state: SavedState) -> list[PhysRange]:
    """The guest-physical RAM ranges of a saved state (see :mod:`qmigx.tools.physmap`)."""
    if state.machine_type is None:
        raise MachineLayoutError("the stream has no configuration section (machine type)",
                                 field="configuration")
    if state.ram_setup is None:
        raise MachineLayoutError("the stream has no RAM setup record", section="ram")
    values = {k: d.value for k, d in state.devices.items()}
    names = {k: state.vmsd_name(*k) for k in state.devices}
    return guest_phys_ranges(state.machine_type, state.ram_setup.blocks, values, names)


def extract_elf(source: Source, path: str, *, progress: Optional[Callable[[int], None]] = None,
                shared_ram: Optional[Mapping[str, str]] = None) -> ElfLayout:
    """Write ``source`` as a QEMU 7.2 ``dump-guest-memory`` ELF core at ``path``.

    ``shared_ram`` maps the idstr of a block an x-ignore-shared stream does
    not carry to the file holding it (the template's RAM file); without it
    such a block's ranges read as zeros. Returns the layout written.
    """
    with _opened(source) as src:
        state = saved_state(src)
    ranges = physical_ranges(state)
    layout = elf_layout(ranges, cpu_states(state.devices))
    tmp = f"{path}.part"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, layout.size)
        os.pwrite(fd, layout.head, 0)
        os.pwrite(fd, layout.tail, layout.tail_offset)
        regions: dict[str, list[Region]] = {}
        for r, off in zip(ranges, layout.offsets):
            regions.setdefault(r.block, []).append(Region(r.offset, r.size, fd, off))
        _copy_shared(state, ranges, layout, fd, shared_ram or {})
        scratch = os.path.dirname(os.path.abspath(path))
        with RamFileSink(regions, scratch_dir=scratch) as sink, _opened(source) as src:
            reader = StreamReader(src, vmdesc=state.vmdesc, progress=progress, use_mmap=True)
            for ev in reader.events():
                t = type(ev)
                if t is RamPages:
                    sink.on_pages(ev)
                elif t is RamSetup:
                    sink.on_setup(ev)
                elif t is SectionEnd and ev.type == SectionType.SECTION_END and \
                        ev.section.idstr == "ram":
                    break  # RAM is complete: the device sections were read already
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return layout


def _copy_shared(state: SavedState, ranges, layout: ElfLayout, fd: int,
                 shared_ram: Mapping[str, str]) -> None:
    """Fill the ranges of blocks the stream does not carry from their files."""
    for idstr, src in shared_ram.items():
        with open(src, "rb") as f:
            for r, off in zip(ranges, layout.offsets):
                if r.block != idstr:
                    continue
                done = 0
                while done < r.size:
                    n = os.copy_file_range(f.fileno(), fd, r.size - done, r.offset + done,
                                           off + done)
                    if n == 0:
                        break  # the file is shorter: the rest stays zero
                    done += n


class PhysicalMemory(Record, mutable=True):
    """Guest-physical memory of a loaded stream: ``read(address, size)`` across blocks."""

    ranges: list
    blocks: object

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at guest-physical ``address``; every byte must be RAM."""
        out = bytearray()
        addr = address
        end = address + size
        while addr < end:
            r = self.range_at(addr)
            if r is None:
                raise IndexError(f"guest-physical address 0x{addr:x} is not RAM")
            n = min(end, r.end) - addr
            mem = self.blocks[r.block].memory
            lo = r.offset + addr - r.start
            out += mem[lo : lo + n].tobytes()
            addr += n
        return bytes(out)

    def range_at(self, address: int) -> Optional[PhysRange]:
        for r in self.ranges:
            if r.start <= address < r.end:
                return r
        return None

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice) or key.step not in (None, 1) or key.stop is None:
            raise TypeError("index guest-physical memory with [start:stop]")
        start = key.start or 0
        return self.read(start, max(0, key.stop - start))


def physical_memory(source: Source) -> PhysicalMemory:
    """Load a stream and view its RAM by guest-physical address."""
    from qmigx.tools.streams import load_stream

    with _opened(source) as src:
        state = saved_state(src)
    with _opened(source) as src:
        loaded = load_stream(src)
    ranges = physical_ranges(state)
    return PhysicalMemory(ranges, loaded.blocks)


class _BlockFiles(RamFileSink):
    """Each block to its own file, made (empty, sparse) when the setup record names it."""

    def __init__(self, directory: str, name_of: Callable[[str], str]) -> None:
        super().__init__({}, scratch_dir=directory)
        self.directory = directory
        self.name_of = name_of
        self.fds: dict[str, int] = {}
        self.paths: list[str] = []

    def on_setup(self, ev: RamSetup) -> None:
        for info in ev.blocks:
            self._file(info.idstr, info.used_length)
        super().on_setup(ev)

    def on_mapped_block(self, ev) -> None:
        self._file(ev.info.idstr, ev.info.used_length)
        super().on_mapped_block(ev)

    def _file(self, idstr: str, length: int) -> None:
        if idstr in self.fds:
            return
        path = os.path.join(self.directory, self.name_of(idstr))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, length)
        self.fds[idstr] = fd
        self.paths.append(path)
        self.regions[idstr] = [Region(0, length, fd, 0)]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        super().close()


def extract_files(source: Source, directory: str, *, progress=None) -> dict:
    """``qmigx extract FILE DIR``: each block to ``DIR/<quoted idstr>.bin``, and the state.

    One pass: page records go straight from the (mapped) stream to the
    block files, sparsely, while the device sections are decoded as
    ``analyze`` decodes them. Returns the analyze state (``state.json``).
    """
    from qmigx.tools.analyze import analyze_state, block_filename

    os.makedirs(directory, exist_ok=True)
    with _BlockFiles(directory, block_filename) as sink, _opened(source) as src:
        return analyze_state(src, loader=sink, progress=progress)
