"""The guest-physical layout rules of qmigx.tools.physmap, case by case.

The QEMU tests (test_elf_dump.py) compare whole dumps for the states a
128 MiB guest reaches; these pin the rules those cannot reach with small
guests: RAM above 4 GiB on both chipsets, every PAM attribute, SMRAM
open, q35's TSEG, high SMRAM and SMBASE windows, 64-bit and disabled
BARs, enabled option ROMs, several memory backends.
"""

from __future__ import annotations

import pytest

from qmigx.errors import MachineLayoutError
from qmigx.stream import RamBlockInfo
from qmigx.tools.physmap import PhysRange, guest_phys_ranges
from qmigx.vmstate import Leaf, StructValue

GIB = 1 << 30
BIOS = RamBlockInfo("pc.bios", 256 << 10)
ROM = RamBlockInfo("pc.rom", 128 << 10)


def device(cfg: bytes) -> StructValue:
    v = StructValue()
    inner = StructValue()
    inner.entries.append(("config", None, Leaf("pci config", bytes(cfg))))
    v.entries.append(("dev", None, inner))
    return v


def host_bridge(q35: bool, pam=0x33, smram=0x02, esmramc=0x38, smbase=0, tseg_mb=None):
    cfg = bytearray(256)
    base = 0x90 if q35 else 0x59
    cfg[base : base + 7] = bytes([pam & 0xF0 | (pam >> 4)] + [pam] * 6)
    cfg[0x9D if q35 else 0x72] = smram
    if q35:
        cfg[0x9E] = esmramc
        cfg[0x9C] = smbase
        if tseg_mb is not None:
            cfg[0x50:0x52] = tseg_mb.to_bytes(2, "little")
    key = ("0000:00:00.0/mch", 0) if q35 else ("0000:00:00.0/I440FX", 0)
    return {key: device(cfg)}


def layout(machine, ram, devices, extra_blocks=()):
    blocks = [RamBlockInfo("pc.ram", ram), BIOS, ROM, *extra_blocks]
    return [(r.start, r.size, r.block, r.offset) for r in
            guest_phys_ranges(machine, blocks, devices)]


def test_q35_ram_above_4g_starts_at_4g_and_leaves_the_hole():
    got = layout("pc-q35-7.2", 3 * GIB, host_bridge(True))
    assert got == [(0, 2 * GIB, "pc.ram", 0), (0xFFFC0000, 256 << 10, "pc.bios", 0),
                   (4 * GIB, GIB, "pc.ram", 2 * GIB)]
    # just below the 0xb0000000 threshold all RAM stays below 4 GiB
    assert layout("pc-q35-7.2", 0xAFF00000, host_bridge(True))[0] == (0, 0xAFF00000, "pc.ram", 0)


def test_i440fx_splits_at_3g_from_3_5g_on_and_old_machines_at_3_5g():
    got = layout("pc-i440fx-7.2", 4 * GIB, host_bridge(False))
    assert got[0] == (0, 3 * GIB, "pc.ram", 0) and got[-1] == (4 * GIB, GIB, "pc.ram", 3 * GIB)
    assert layout("pc-i440fx-7.2", 0xD0000000, host_bridge(False))[0][1] == 0xD0000000
    old = layout("pc-i440fx-1.7", 4 * GIB, host_bridge(False))
    assert old[0][1] == 0xE0000000 and old[-1] == (4 * GIB, 0x20000000, "pc.ram", 0xE0000000)


@pytest.mark.parametrize("q35", [False, True])
def test_pam_disabled_shows_the_roms_and_the_bios_mirror(q35):
    got = layout("pc-q35-7.2" if q35 else "pc-i440fx-7.2", 64 << 20, host_bridge(q35, pam=0))
    assert got[:4] == [(0, 0xC0000, "pc.ram", 0), (0xC0000, 0x20000, "pc.rom", 0),
                       (0xE0000, 0x20000, "pc.bios", 0x20000),
                       (0x100000, (64 << 20) - 0x100000, "pc.ram", 0x100000)]


def test_each_pam_nibble_decides_its_own_segment():
    cfg = host_bridge(False, pam=0x33)
    raw = bytearray(cfg[("0000:00:00.0/I440FX", 0)]["dev"]["config"].raw)
    raw[0x5A] = 0x30  # segment 0xc0000 to PCI (pc.rom), 0xc4000 stays RAM (write-only too)
    raw[0x59] = 0x00  # 0xf0000-0xfffff to PCI (the BIOS mirror)
    got = layout("pc-i440fx-7.2", 64 << 20, {("0000:00:00.0/I440FX", 0): device(raw)})
    assert got[:5] == [(0, 0xC0000, "pc.ram", 0), (0xC0000, 0x4000, "pc.rom", 0),
                       (0xC4000, 0x2C000, "pc.ram", 0xC4000),
                       (0xF0000, 0x10000, "pc.bios", 0x30000),
                       (0x100000, (64 << 20) - 0x100000, "pc.ram", 0x100000)]


def vga(bar0: int, cmd: int = 0x103, rom: int = 0, cls=(0x00, 0x03)) -> StructValue:
    cfg = bytearray(256)
    cfg[4] = cmd & 0xFF
    cfg[0x0A], cfg[0x0B] = cls
    cfg[0x10:0x18] = bar0.to_bytes(8, "little")
    cfg[0x30:0x34] = rom.to_bytes(4, "little")
    return device(cfg)


VRAM = RamBlockInfo("0000:00:02.0/vga.vram", 16 << 20)
VGAROM = RamBlockInfo("0000:00:02.0/vga.rom", 64 << 10)


def test_vga_hides_the_legacy_window_unless_smram_is_open_and_maps_vram_at_bar0():
    devs = {**host_bridge(False), ("0000:00:02.0/vga", 0): vga(0xFD000008)}
    got = layout("pc-i440fx-7.2", 64 << 20, devs, [VRAM])
    assert got[0] == (0, 0xA0000, "pc.ram", 0) and got[1][0] == 0xC0000
    assert (0xFD000000, 16 << 20, VRAM.idstr, 0) in got
    devs.update(host_bridge(False, smram=0x4A))  # D_OPEN: RAM shows through
    assert layout("pc-i440fx-7.2", 64 << 20, devs, [VRAM])[0][1] == 64 << 20


def test_bars_that_do_not_decode_map_nothing():
    for dev in (vga(0xFD000008, cmd=0x101),   # memory decoding off
                vga(0x8),                     # never assigned
                vga(0xFFFFFFF8)):             # would wrap past 4 GiB
        got = layout("pc-i440fx-7.2", 64 << 20,
                     {**host_bridge(False), ("0000:00:02.0/vga", 0): dev}, [VRAM])
        assert all(r[2] != VRAM.idstr for r in got)
    # a 64-bit BAR above 4 GiB, and a non-VGA class keeps the legacy window as RAM
    bar = (0x8_0000_0000 | 0xC)
    got = layout("pc-i440fx-7.2", 64 << 20,
                 {**host_bridge(False), ("0000:00:02.0/vga", 0): vga(bar, cls=(0x80, 0x03))},
                 [VRAM])
    assert (0x8_0000_0000, 16 << 20, VRAM.idstr, 0) in got and got[0][1] == 64 << 20


def test_an_enabled_option_rom_bar_maps_its_rom():
    devs = {**host_bridge(False), ("0000:00:02.0/vga", 0): vga(0xFD000008, rom=0xFEBE0001)}
    got = layout("pc-i440fx-7.2", 64 << 20, devs, [VRAM, VGAROM])
    assert (0xFEBE0000, 64 << 10, VGAROM.idstr, 0) in got
    devs[("0000:00:02.0/vga", 0)] = vga(0xFD000008, rom=0xFEBE0000)  # enable bit clear
    assert all(r[2] != VGAROM.idstr for r in layout("pc-i440fx-7.2", 64 << 20, devs,
                                                    [VRAM, VGAROM]))


def test_q35_tseg_smbase_and_high_smram():
    # TSEG 8 MiB enabled (G_SMRAME) hides the top of low RAM; SMBASE locked hides 0x30000
    got = layout("pc-q35-7.2", 128 << 20, host_bridge(True, smram=0x0A, esmramc=0x05, smbase=2))
    assert got[:3] == [(0, 0x30000, "pc.ram", 0),
                       (0x50000, (120 << 20) - 0x50000, "pc.ram", 0x50000),
                       (0xFFFC0000, 256 << 10, "pc.bios", 0)]
    ext = layout("pc-q35-7.2", 128 << 20, host_bridge(True, smram=0x0A, esmramc=0x07, tseg_mb=4))
    assert ext[0] == (0, (124 << 20), "pc.ram", 0)
    # D_OPEN with H_SMRAME: low SMRAM hidden behind the PCI window, high SMRAM shows RAM
    high = layout("pc-q35-7.2", 128 << 20, host_bridge(True, smram=0x4A, esmramc=0xB8))
    assert (Q := (0xFEDA0000, 0x20000, "pc.ram", 0xA0000)) in high, high
    assert Q[0] > high[0][1]


def test_several_backends_need_their_gpas():
    blocks = [RamBlockInfo("mem0", 64 << 20), RamBlockInfo("mem1", 64 << 20), BIOS, ROM]
    with pytest.raises(MachineLayoutError, match="x-ignore-shared"):
        guest_phys_ranges("pc-i440fx-7.2", blocks, host_bridge(False))
    blocks[0:2] = [RamBlockInfo("mem0", 64 << 20, gpa=64 << 20),
                   RamBlockInfo("mem1", 64 << 20, gpa=0)]
    got = guest_phys_ranges("pc-i440fx-7.2", blocks, host_bridge(False))
    assert got[0] == PhysRange(0, 64 << 20, "mem1", 0)
    assert got[1] == PhysRange(64 << 20, 64 << 20, "mem0", 0)


def test_unknown_machines_and_missing_chipsets_are_refused():
    with pytest.raises(MachineLayoutError, match="microvm"):
        layout("microvm", 64 << 20, host_bridge(False))
    with pytest.raises(MachineLayoutError, match="host bridge"):
        layout("pc-i440fx-7.2", 64 << 20, {})
