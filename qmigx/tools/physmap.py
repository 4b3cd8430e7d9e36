"""Guest-physical memory of a saved PC: which RAM block backs which address.

A stream names RAM by block and offset; a memory dump, a debugger or a
page-table walk wants guest-physical addresses. QEMU derives that map from
the machine's memory regions: this module rebuilds the part of it that
holds RAM for the x86 ``pc`` (i440FX) and ``q35`` machines, the way QEMU
7.2's ``dump-guest-memory`` sees it, from what the stream carries:

* the machine type (configuration section) and the main RAM's size
  (``pc.ram`` or the memory backends), which decide the split of RAM
  below and above 4 GiB and so the PCI hole (``pc_init1``/``pc_q35_init``
  with their default ``max-ram-below-4g``);
* the host bridge's saved PCI config: the PAM registers, which map each
  of the 13 segments of 0xc0000-0xfffff to RAM or to the PCI space (where
  ``pc.rom`` and the last 128 KiB of ``pc.bios`` live), and SMRAM/ESMRAMC
  (low and high SMRAM, TSEG, and on q35 the SMBASE hole);
* PCI devices' saved configs: a VGA's ``vga.vram`` at its BAR 0, option
  ROMs at their ROM BAR when it is enabled; a VGA-class device's legacy
  window hides RAM at 0xa0000-0xbffff;
* ``pc.bios`` ending at 4 GiB.

The map is painted in QEMU's priority order (PCI space under RAM, RAM,
then the chipset's priority-1 windows; a window that aliases the PCI
space shows RAM wherever the PCI space has nothing) and cut into
:class:`PhysRange` pieces that are merged as QEMU's guest_phys_blocks
merges them (contiguous addresses of the same block). Memory-backed
state outside this model (pflash, NVDIMM, DIMMs, other machines) is
refused with :class:`~qmigx.errors.MachineLayoutError`.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from qmigx.errors import MachineLayoutError
from qmigx.records import Record

__all__ = ["PhysRange", "guest_phys_ranges", "pci_config", "main_ram_blocks"]

GIB = 1 << 30
#: ``pc.rom`` and the VGA window start here (PC_ROM_MIN_VGA).
PC_ROM_BASE = 0xC0000
#: The BIOS is mirrored below 1 MiB in at most this much (isa-bios).
ISA_BIOS_MAX = 128 << 10
#: PAM segment 0 is the 64 KiB BIOS area, segments 1-12 cover 16 KiB each from 0xc0000.
PAM_BIOS = (0xF0000, 0x10000)
PAM_EXPAN_BASE, PAM_EXPAN_SIZE = 0xC0000, 0x4000
SMRAM_C_BASE, SMRAM_C_SIZE = 0xA0000, 0x20000
SMRAM_D_OPEN, SMRAM_G_SMRAME = 0x40, 0x08
Q35_HIGH_SMRAM = 0xFEDA0000
Q35_SMBASE = (0x30000, 0x20000)


class PhysRange(Record):
    """``size`` bytes at guest-physical ``start`` are ``block`` from ``offset``."""

    start: int
    size: int
    block: str
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.size


class _Chipset(Record):
    """Register offsets in the host bridge's PCI config (i440FX or MCH)."""

    vmsd: str
    pam: int
    smram: int
    esmramc: Optional[int] = None


_I440FX = _Chipset("I440FX", pam=0x59, smram=0x72)
_MCH = _Chipset("mch", pam=0x90, smram=0x9D, esmramc=0x9E)

_HOLE = None  # a painted range that hides what is below it (MMIO)


def machine_family(machine_type: str) -> str:
    """``"pc"`` or ``"q35"`` for the machine types this module lays out."""
    if machine_type.startswith("pc-q35") or machine_type == "q35":
        return "q35"
    if machine_type.startswith("pc-i440fx") or machine_type == "pc":
        return "pc"
    raise MachineLayoutError(f"no guest-physical layout for machine type {machine_type!r} "
                             "(known: pc-i440fx-*, pc-q35-*)", section="configuration",
                             field="machine type")


def _ram_split(family: str, machine_type: str, ram: int) -> tuple[int, int]:
    """(below_4g, above_4g) as pc_init1 / pc_q35_init split RAM by default."""
    if family == "q35":
        lowmem = 0x80000000 if ram >= 0xB0000000 else 0xB0000000
    else:
        lowmem = 0xE0000000
        # gigabyte_align: every i440FX machine type after 1.7
        if ram >= lowmem and not _old_i440fx(machine_type):
            lowmem = 0xC0000000
    if ram >= lowmem:
        return lowmem, ram - lowmem
    return ram, 0


def _old_i440fx(machine_type: str) -> bool:
    ver = machine_type.removeprefix("pc-i440fx-")
    try:
        major, minor = (int(x) for x in ver.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) <= (1, 7)


def _is_firmware_or_device(idstr: str) -> bool:
    return ("/" in idstr or idstr in ("pc.bios", "pc.rom", "isa-bios")
            or idstr.startswith("system.flash"))


def main_ram_blocks(blocks: Sequence) -> list:
    """The blocks that make up the machine's RAM, in guest-physical order.

    ``pc.ram``, or the memory backends under ``-numa``/``memory-backend``.
    Several backends are ordered by the GPA an x-ignore-shared stream gives
    them (their place in the RAM container); without GPAs only one backend
    can be placed.
    """
    ram = [b for b in blocks if not _is_firmware_or_device(b.idstr)]
    if len(ram) > 1:
        if any(b.gpa is None for b in ram):
            raise MachineLayoutError(
                f"{len(ram)} RAM backends ({', '.join(b.idstr for b in ram)}): their "
                "guest-physical order is only known from an x-ignore-shared stream's GPAs",
                field="ram blocks")
        ram = sorted(ram, key=lambda b: b.gpa)
    if not ram:
        raise MachineLayoutError("no RAM block (pc.ram or a memory backend) in the stream",
                                 field="ram blocks")
    return ram


# -- PCI configs in decoded device sections ---------------------------------------


def pci_config(value) -> Optional[bytes]:
    """The first ``pci config`` leaf of a decoded device section, or None."""
    from qmigx.vmstate import Leaf, StructValue

    if value is None:
        return None
    stack = [value]
    while stack:
        node = stack.pop(0)
        if isinstance(node, Leaf):
            if node.type == "pci config" and len(node.raw) >= 64:
                return node.raw
        elif isinstance(node, StructValue):
            stack[0:0] = [n for _, _, n in node.entries] + [s.value for s in node.subsections]
    return None


def _le32(cfg: bytes, off: int) -> int:
    return int.from_bytes(cfg[off : off + 4], "little")


def _bar_address(cfg: bytes, reg: int, size: int, *, rom: bool = False) -> Optional[int]:
    """Where a memory BAR of ``size`` bytes is mapped (pci_bar_address), or None."""
    if not cfg[4] & 0x2:  # PCI_COMMAND_MEMORY
        return None
    raw = _le32(cfg, reg)
    if rom:
        if not raw & 1:
            return None
        is64 = False
    else:
        if raw & 1:  # an I/O BAR
            return None
        is64 = (raw >> 1) & 3 == 2
        if is64:
            raw |= _le32(cfg, reg + 4) << 32
    addr = raw & ~(size - 1) & ~0xF
    last = addr + size - 1
    if addr == 0 or last <= addr or (not is64 and last >= 0xFFFFFFFF):
        return None
    return addr


# -- painting -----------------------------------------------------------------


class _Canvas:
    """Non-overlapping painted intervals; later paint wins."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, object]] = []  # (start, end, source)

    def paint(self, start: int, end: int, source) -> None:
        if end <= start:
            return
        out = []
        for s, e, src in self.items:
            if e <= start or s >= end:
                out.append((s, e, src))
                continue
            if s < start:
                out.append((s, start, _shift(src, 0)))
            if e > end:
                out.append((end, e, _shift(src, end - s)))
        out.append((start, end, source))
        out.sort(key=lambda it: it[0])
        self.items = out

    def overlay(self, other: "_Canvas", start: int, end: int) -> None:
        """Show ``other`` through a window: only where it has something painted."""
        for s, e, src in other.items:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                self.paint(lo, hi, _shift(src, lo - s))


def _shift(src, delta: int):
    if src is _HOLE or delta == 0:
        return src
    block, offset = src
    return (block, offset + delta)


def guest_phys_ranges(machine_type: str, blocks: Sequence, devices: dict,
                      vmsd_names: Optional[dict] = None) -> list[PhysRange]:
    """The RAM-backed guest-physical ranges, ascending, as QEMU 7.2's dump sees them.

    Args:
        machine_type: from the configuration section.
        blocks: the setup record's :class:`~qmigx.stream.RamBlockInfo` list.
        devices: ``(idstr, instance) -> decoded value`` of the device sections.
        vmsd_names: ``(idstr, instance) -> vmsd name`` (from the vmdesc).
    """
    family = machine_family(machine_type)
    by_name = {b.idstr: b for b in blocks}
    vmsd_names = vmsd_names or {}
    ram = main_ram_blocks(blocks)
    ram_size = sum(b.used_length for b in ram)
    below, above = _ram_split(family, machine_type, ram_size)

    pci = _Canvas()  # the PCI memory space
    bios = by_name.get("pc.bios")
    if bios is not None:
        size = bios.used_length
        pci.paint((1 << 32) - size, 1 << 32, ("pc.bios", 0))
        isa = min(size, ISA_BIOS_MAX)
        pci.paint(0x100000 - isa, 0x100000, ("pc.bios", size - isa))
    rom = by_name.get("pc.rom")
    if rom is not None:
        pci.paint(PC_ROM_BASE, PC_ROM_BASE + rom.used_length, ("pc.rom", 0))
    host_cfg = None
    for (idstr, inst), value in devices.items():
        cfg = pci_config(value)
        if cfg is None:
            continue
        vmsd = vmsd_names.get((idstr, inst)) or idstr.rsplit("/", 1)[-1]
        if vmsd == (_MCH.vmsd if family == "q35" else _I440FX.vmsd):
            host_cfg = cfg
            continue
        _paint_pci_device(pci, idstr, vmsd, cfg, by_name)
    if host_cfg is None:
        raise MachineLayoutError(
            "the host bridge's PCI config (PAM, SMRAM) is not in the stream's decoded device "
            "sections (a stream without a vmdesc cannot be laid out)",
            section=f"0000:00:00.0/{_MCH.vmsd if family == 'q35' else _I440FX.vmsd}")

    mem = _Canvas()
    mem.overlay(pci, 0, 1 << 64)
    _paint_ram(mem, ram, 0, below, 0)
    _paint_ram(mem, ram, 4 * GIB, above, below)
    _paint_chipset(mem, pci, ram, host_cfg, _MCH if family == "q35" else _I440FX, below)
    return _merge(mem)


def _paint_ram(mem: _Canvas, ram: list, gpa: int, size: int, ram_offset: int) -> None:
    """Paint ``size`` bytes of the RAM container from ``ram_offset`` at ``gpa``."""
    pos = 0
    for b in ram:
        lo, hi = max(ram_offset, pos), min(ram_offset + size, pos + b.used_length)
        if lo < hi:
            mem.paint(gpa + lo - ram_offset, gpa + hi - ram_offset, (b.idstr, lo - pos))
        pos += b.used_length


def _paint_pci_device(pci: _Canvas, idstr: str, vmsd: str, cfg: bytes, by_name: dict) -> None:
    prefix = idstr.rsplit("/", 1)[0] + "/" if "/" in idstr else None
    if cfg[0x0B] == 0x03 and cfg[0x0A] == 0x00:  # a VGA-class device decodes 0xa0000-0xbffff
        pci.paint(SMRAM_C_BASE, SMRAM_C_BASE + SMRAM_C_SIZE, _HOLE)
    if prefix is None:
        return
    vram = by_name.get(prefix + "vga.vram")
    if vram is not None and vmsd == "vga":
        addr = _bar_address(cfg, 0x10, _pow2(vram.used_length))
        if addr is not None:
            pci.paint(addr, addr + vram.used_length, (vram.idstr, 0))
    rom_reg = 0x30 if (cfg[0x0E] & 0x7F) == 0 else 0x38
    for name, b in by_name.items():
        if name.startswith(prefix) and name.endswith(".rom") and "/" not in name[len(prefix):]:
            addr = _bar_address(cfg, rom_reg, _pow2(b.used_length), rom=True)
            if addr is not None:
                pci.paint(addr, addr + b.used_length, (name, 0))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _paint_chipset(mem: _Canvas, pci: _Canvas, ram: list, cfg: bytes, chip: _Chipset,
                   below: int) -> None:
    """The host bridge's priority-1 windows: SMRAM, PAM, and on q35 TSEG and SMBASE."""
    smram = cfg[chip.smram]
    esmramc = cfg[chip.esmramc] if chip.esmramc is not None else 0
    h_smrame = bool(esmramc & 0x80)
    d_open = bool(smram & SMRAM_D_OPEN)
    # "smram-region": the PCI space over the legacy window unless SMRAM is open
    if chip is _MCH:
        low_window = (not d_open) or h_smrame
    else:
        low_window = not d_open
    if low_window:
        mem.overlay(pci, SMRAM_C_BASE, SMRAM_C_BASE + SMRAM_C_SIZE)
    for i in range(13):
        reg = cfg[chip.pam + (i + 1) // 2]
        attr = (reg >> (0 if i & 1 else 4)) & 3
        start, size = PAM_BIOS if i == 0 else (PAM_EXPAN_BASE + (i - 1) * PAM_EXPAN_SIZE,
                                               PAM_EXPAN_SIZE)
        if attr == 0:
            mem.overlay(pci, start, start + size)
        else:  # read-only, write-only and read-write all map RAM for reads of the dump
            _paint_ram(mem, ram, start, size, start)
    if chip is not _MCH:
        return
    if d_open and h_smrame:
        _paint_ram(mem, ram, Q35_HIGH_SMRAM, SMRAM_C_SIZE, SMRAM_C_BASE)
    tseg = _tseg_size(cfg, smram, esmramc)
    if tseg:
        mem.paint(below - tseg, below, _HOLE)
    if cfg[0x9C] & 0x2:  # F_SMBASE locked: the SMBASE area is hidden outside SMM
        mem.paint(Q35_SMBASE[0], Q35_SMBASE[0] + Q35_SMBASE[1], _HOLE)


def _tseg_size(cfg: bytes, smram: int, esmramc: int) -> int:
    if not (esmramc & 0x1 and smram & SMRAM_G_SMRAME):
        return 0
    sz = esmramc & 0x6
    if sz == 0:
        return 1 << 20
    if sz == 2:
        return 2 << 20
    if sz == 4:
        return 8 << 20
    mbytes = int.from_bytes(cfg[0x50:0x52], "little")
    return (16 if mbytes == 0xFFFF else mbytes) << 20


def _merge(mem: _Canvas) -> list[PhysRange]:
    out: list[PhysRange] = []
    for s, e, src in mem.items:
        if src is _HOLE:
            continue
        block, offset = src
        if out and out[-1].end == s and out[-1].block == block and \
                out[-1].offset + out[-1].size == offset:
            last = out.pop()
            out.append(PhysRange(last.start, last.size + e - s, block, last.offset))
        else:
            out.append(PhysRange(s, e - s, block, offset))
    return out


def iter_block_ranges(ranges: Sequence[PhysRange], block: str) -> Iterator[PhysRange]:
    """The ranges one block appears in."""
    return (r for r in ranges if r.block == block)
