"""A synthetic guest: RAM with QEMU-like content and a few VMState devices.

Used by ``qmigx demo`` and by tests and benchmarks that need a guest
without booting one. Page ``i`` of a block is, by a fixed rule:
all zero when ``i % 7 == 3`` (QEMU sends ZERO records), a run of one byte
when ``i % 11 == 5``, and pseudo-random otherwise — the mix real guests
show, and the cases the RAM encoders treat differently.
"""

from __future__ import annotations

import numpy as np

from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.vmstate import (
    VMStateDescription,
    vmstate_bool,
    vmstate_buffer,
    vmstate_int64,
    vmstate_struct_array,
    vmstate_timer,
    vmstate_uint8,
    vmstate_uint16,
    vmstate_uint32,
    vmstate_unused,
)
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["fill_pages", "synthetic_blocks", "synthetic_devices", "DEVICE_VMSDS"]

PAGE = TARGET_PAGE_SIZE


def fill_pages(mem: np.ndarray, seed: int, first_page: int = 0) -> None:
    """Fill ``mem`` (a whole number of pages) by the rule above."""
    pages = mem.reshape(-1, PAGE)
    n = len(pages)
    idx = np.arange(first_page, first_page + n)
    rng = np.random.default_rng(seed)
    rand = ~((idx % 7 == 3) | (idx % 11 == 5))
    pages[rand] = rng.integers(0, 256, (int(rand.sum()), PAGE), dtype=np.uint8)
    pages[idx % 7 == 3] = 0
    runs = (idx % 11 == 5) & ~(idx % 7 == 3)
    pages[runs] = (idx[runs] & 0xFF).astype(np.uint8)[:, None]


def synthetic_blocks(ram_bytes: int, seed: int = 1) -> RAMBlockList:
    """``pc.ram`` of ``ram_bytes`` plus a small ``pc.rom``, filled by the rule."""
    ram = RAMBlock.anonymous("pc.ram", ram_bytes)
    fill_pages(ram.memory, seed)
    rom = RAMBlock.anonymous("pc.rom", 128 * 1024)
    fill_pages(rom.memory, seed + 1)
    return RAMBlockList([ram, rom])


_CHANNEL = VMStateDescription("demo-uart/channel", 1, 1, [
    vmstate_uint8("ier"),
    vmstate_uint8("lcr"),
    vmstate_uint16("divider"),
])

_UART = VMStateDescription("demo-uart", 2, 1, [
    vmstate_uint32("baud"),
    vmstate_bool("enabled"),
    vmstate_struct_array("channel", _CHANNEL, 2),
    vmstate_unused(4),
])

_CLOCK = VMStateDescription("demo-clock", 1, 1, [
    vmstate_int64("offset_ns"),
    vmstate_timer("alarm"),
    vmstate_buffer("name", 16),
])

#: The demo's devices: (idstr, instance_id, description).
DEVICE_VMSDS = [("demo-uart", 0, _UART), ("demo-uart", 1, _UART), ("demo-clock", 0, _CLOCK)]


def synthetic_devices(seed: int = 1) -> list[tuple[str, int, VMStateDescription, dict]]:
    """State for each device of :data:`DEVICE_VMSDS`."""
    out = []
    for idstr, inst, vmsd in DEVICE_VMSDS:
        if vmsd is _UART:
            obj = {"baud": 115200 >> inst, "enabled": bool(inst == 0),
                   "channel": [{"ier": 1 + i, "lcr": 3, "divider": 12 * (i + 1)} for i in range(2)]}
        else:
            obj = {"offset_ns": -seed * 1000, "alarm": 1_000_000_000 * seed,
                   "name": b"demo-clock".ljust(16, b"\0")}
        out.append((idstr, inst, vmsd, obj))
    return out
