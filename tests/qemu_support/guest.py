"""A tiny multiboot test guest, assembled here in pure Python.

Interop tests need guest RAM whose content we know exactly, that a real
QEMU 7.2 can boot in a second under TCG, and that can keep dirtying
memory while a live migration runs. No assembler is needed at test time:
:func:`build_guest` emits the 32-bit machine code itself (each
instruction is produced by a small encoder below together with its
Intel-syntax text, so the listing in :func:`listing` documents exactly
what runs).

Boot protocol: a multiboot v1 image with the "address fields" flag
(bit 16), so QEMU's ``-kernel`` loader copies the file to
:data:`LOAD_ADDR` (1 MiB) and jumps to the entry point in 32-bit
protected mode with flat segments, paging off and interrupts disabled.

What the guest does (all addresses are guest-physical; with
``-m SIZE`` backed by one ``memory-backend-file`` they are also offsets
in the memory file):

1. Fill every 4 KiB page ``i`` (``i`` = address >> 12) from
   :data:`FILL_START` (2 MiB) up to ``ram_bytes``:

   * ``i % 7 == 3``  -> all zero;
   * else ``i % 11 == 5`` -> 4096 copies of the byte ``i & 0xff``;
   * else random: 1024 little-endian words of xorshift32
     (``x ^= x << 13; x ^= x >> 17; x ^= x << 5``, each word is the
     state after one step) started from
     ``((i * 0x9E3779B9) ^ seed) | 1`` (mod 2**32).

   :func:`expected_page` / :func:`expected_pages` compute the same bytes.
2. Write the marker at :data:`MARKER_ADDR` (a zeroed bss page of the
   kernel, below the filled range): ``+16`` u32 counter (0), ``+20`` u32
   seed, ``+24`` u32 ram_bytes, ``+28`` u32 flags (bit 0 = dirty), and
   **last** the 16-byte :data:`MARKER_MAGIC` at ``+0``, so a host that
   sees the magic knows the fill is complete.
3. Without ``dirty``: ``hlt`` forever (RAM then stays exactly as filled).
   With ``dirty``: loop forever; pass ``n`` (from 0) walks a window of
   :data:`DIRTY_WINDOW` pages that starts at page
   ``DIRTY_FIRST_PAGE + ((n >> DIRTY_SHIFT) mod DIRTY_REGION)`` and wraps
   inside a region of :data:`DIRTY_REGION` pages (1 MiB, so every
   dirtied page has its own slot even in a 1 MiB XBZRLE cache). For the
   ``k``-th page of the window it executes ``invlpg [page]`` (under TCG a
   page whose TLB entry survives a dirty-log sync can be written without
   being logged again), adds 1 to the u32 at offset
   ``(k * 132 + (n >> DIRTY_WORD_SHIFT) * 4) & 0xffc``, and when
   ``n % DIRTY_RUN_EVERY == 0`` also stores ``n`` into the 16 bytes at
   ``(k * 48 + (n >> DIRTY_RUN_SHIFT) * 16) & 0xff0``. The offsets move
   slowly (the guest runs ~30,000 passes/s under TCG), so between two
   dirty syncs a page changes in a few dozen places: small XBZRLE
   deltas. After each pass it flushes the marker page's TLB entry and stores ``n + 1`` into
   the counter, so a host sees the counter advance.
"""

from __future__ import annotations

import os
import struct

import numpy as np

__all__ = [
    "LOAD_ADDR",
    "MARKER_ADDR",
    "MARKER_MAGIC",
    "FILL_START",
    "PAGE_SIZE",
    "DIRTY_FIRST_PAGE",
    "DIRTY_REGION",
    "DIRTY_WINDOW",
    "DIRTY_SHIFT",
    "DIRTY_WORD_SHIFT",
    "DIRTY_RUN_SHIFT",
    "DIRTY_RUN_EVERY",
    "GOLDEN",
    "build_guest",
    "listing",
    "page_kind",
    "expected_page",
    "expected_pages",
    "read_marker",
    "Marker",
]

PAGE_SIZE = 4096
#: Where QEMU's multiboot loader places the image (header + code page).
LOAD_ADDR = 0x100000
#: The marker page: the image's bss page right after the code page.
MARKER_ADDR = LOAD_ADDR + PAGE_SIZE
#: End of the kernel's bss (marker page + one spare page for the stack).
BSS_END = LOAD_ADDR + 3 * PAGE_SIZE
#: First filled byte; everything below belongs to firmware and the kernel.
FILL_START = 0x200000
#: Written last, after the fill, at MARKER_ADDR.
MARKER_MAGIC = b"qmigx guest rdy!"
#: Multiplier that spreads page numbers over the PRNG seed space.
GOLDEN = 0x9E3779B9
#: Dirtying: region of 256 pages starting at the first filled page.
DIRTY_FIRST_PAGE = FILL_START // PAGE_SIZE
DIRTY_REGION = 256
#: Pages written per pass.
DIRTY_WINDOW = 64
#: The window moves one page every 2**DIRTY_SHIFT passes.
DIRTY_SHIFT = 10
#: The incremented word moves every 2**DIRTY_WORD_SHIFT passes.
DIRTY_WORD_SHIFT = 8
#: A 16-byte run is rewritten on every DIRTY_RUN_EVERY-th pass (a power of 2).
DIRTY_RUN_SHIFT = 10
DIRTY_RUN_EVERY = 1 << DIRTY_RUN_SHIFT

_MB_MAGIC = 0x1BADB002
_MB_FLAGS = 0x00010000  # the header carries load/entry addresses
_HEADER_SIZE = 32
_MASK32 = 0xFFFFFFFF

_R = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "ebp": 5, "esi": 6, "edi": 7}


def _modrm(mod: int, reg: int, rm: int) -> int:
    return (mod << 6) | (reg << 3) | rm


def _sib(base: str, index: str) -> int:
    # scale 1; ebp as base would mean "no base" with mod 00, esp cannot index
    assert base != "ebp" and index != "esp"
    return _modrm(0, _R[index], _R[base])


class _Asm:
    """Collects (address, bytes, text) and resolves rel32 jumps to labels."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.lines: list[tuple[int, bytes, str]] = []
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, int]] = []  # (pos of rel32, label, line index)

    def here(self) -> int:
        return self.origin + len(self.code)

    def label(self, name: str) -> None:
        assert name not in self.labels
        self.labels[name] = self.here()
        self.lines.append((self.here(), b"", name + ":"))

    def emit(self, code: bytes, text: str) -> None:
        self.lines.append((self.here(), bytes(code), "    " + text))
        self.code += code

    # --- the instruction forms the guest uses -----------------------------
    def mov_ri(self, r: str, imm: int) -> None:
        self.emit(bytes([0xB8 + _R[r]]) + struct.pack("<I", imm & _MASK32), f"mov {r}, 0x{imm & _MASK32:x}")

    def mov_rr(self, dst: str, src: str) -> None:
        self.emit(bytes([0x89, _modrm(3, _R[src], _R[dst])]), f"mov {dst}, {src}")

    def alu_rr(self, op: str, dst: str, src: str) -> None:
        opc = {"add": 0x01, "or": 0x09, "and": 0x21, "sub": 0x29, "xor": 0x31, "cmp": 0x39}[op]
        self.emit(bytes([opc, _modrm(3, _R[src], _R[dst])]), f"{op} {dst}, {src}")

    def alu_ri(self, op: str, r: str, imm: int) -> None:
        ext = {"add": 0, "or": 1, "and": 4, "sub": 5, "xor": 6, "cmp": 7}[op]
        if -128 <= imm <= 127:
            code = bytes([0x83, _modrm(3, ext, _R[r]), imm & 0xFF])
        else:
            code = bytes([0x81, _modrm(3, ext, _R[r])]) + struct.pack("<I", imm & _MASK32)
        self.emit(code, f"{op} {r}, 0x{imm & _MASK32:x}")

    def shift(self, op: str, r: str, n: int) -> None:
        ext = {"shl": 4, "shr": 5}[op]
        self.emit(bytes([0xC1, _modrm(3, ext, _R[r]), n]), f"{op} {r}, {n}")

    def imul_rri(self, dst: str, src: str, imm: int) -> None:
        code = bytes([0x69, _modrm(3, _R[dst], _R[src])]) + struct.pack("<I", imm & _MASK32)
        self.emit(code, f"imul {dst}, {src}, 0x{imm & _MASK32:x}")

    def div(self, r: str) -> None:
        self.emit(bytes([0xF7, _modrm(3, 6, _R[r])]), f"div {r}")

    def inc(self, r: str) -> None:
        self.emit(bytes([0x40 + _R[r]]), f"inc {r}")

    def dec(self, r: str) -> None:
        self.emit(bytes([0x48 + _R[r]]), f"dec {r}")

    def test_ri(self, r: str, imm: int) -> None:
        code = bytes([0xF7, _modrm(3, 0, _R[r])]) + struct.pack("<I", imm & _MASK32)
        self.emit(code, f"test {r}, 0x{imm & _MASK32:x}")

    def invlpg_r(self, r: str) -> None:
        assert r not in ("esp", "ebp")
        self.emit(bytes([0x0F, 0x01, _modrm(0, 7, _R[r])]), f"invlpg [{r}]")

    def invlpg_abs(self, addr: int) -> None:
        self.emit(bytes([0x0F, 0x01, _modrm(0, 7, 5)]) + struct.pack("<I", addr), f"invlpg [0x{addr:x}]")

    def mov_abs_r(self, addr: int, r: str) -> None:
        self.emit(bytes([0x89, _modrm(0, _R[r], 5)]) + struct.pack("<I", addr), f"mov dword [0x{addr:x}], {r}")

    def mov_abs_imm(self, addr: int, imm: int) -> None:
        code = bytes([0xC7, _modrm(0, 0, 5)]) + struct.pack("<II", addr, imm & _MASK32)
        self.emit(code, f"mov dword [0x{addr:x}], 0x{imm & _MASK32:x}")

    def add_bi_imm8(self, base: str, index: str, imm: int) -> None:
        code = bytes([0x83, _modrm(0, 0, 4), _sib(base, index), imm])
        self.emit(code, f"add dword [{base}+{index}], {imm}")

    def mov_bid_r(self, base: str, index: str, disp: int, r: str) -> None:
        if disp == 0:
            code = bytes([0x89, _modrm(0, _R[r], 4), _sib(base, index)])
            text = f"mov dword [{base}+{index}], {r}"
        else:
            code = bytes([0x89, _modrm(1, _R[r], 4), _sib(base, index), disp])
            text = f"mov dword [{base}+{index}+0x{disp:x}], {r}"
        self.emit(code, text)

    def simple(self, code: bytes, text: str) -> None:
        self.emit(code, text)

    def jcc(self, cc: str, target: str) -> None:
        opc = {"jb": 0x82, "jae": 0x83, "je": 0x84, "jne": 0x85}[cc]
        self.fixups.append((len(self.code) + 2, target, len(self.lines)))
        self.emit(bytes([0x0F, opc, 0, 0, 0, 0]), f"{cc} {target}")

    def jmp(self, target: str) -> None:
        self.fixups.append((len(self.code) + 1, target, len(self.lines)))
        self.emit(bytes([0xE9, 0, 0, 0, 0]), f"jmp {target}")

    def finish(self) -> bytes:
        for pos, target, line in self.fixups:
            rel = self.labels[target] - (self.origin + pos + 4)
            self.code[pos:pos + 4] = struct.pack("<i", rel)
            addr, code, text = self.lines[line]
            self.lines[line] = (addr, code[:-4] + struct.pack("<i", rel), text)
        return bytes(self.code)


def _check_args(seed: int, ram_bytes: int) -> None:
    if not 0 <= seed <= _MASK32:
        raise ValueError(f"seed must fit in 32 bits, got {seed}")
    if ram_bytes % PAGE_SIZE or not (FILL_START + DIRTY_REGION * PAGE_SIZE <= ram_bytes <= 0x80000000):
        raise ValueError(
            f"ram_bytes must be a multiple of {PAGE_SIZE} in "
            f"[{FILL_START + DIRTY_REGION * PAGE_SIZE:#x}, 0x80000000] (all below the PCI hole), got {ram_bytes:#x}"
        )


def _assemble(seed: int, ram_bytes: int, dirty: bool) -> _Asm:
    entry = LOAD_ADDR + _HEADER_SIZE
    a = _Asm(entry)
    end_page = ram_bytes // PAGE_SIZE

    a.label("start")
    a.simple(b"\xFA", "cli")
    a.simple(b"\xFC", "cld                          ; stosd moves upwards")
    a.mov_ri("esp", BSS_END)
    a.mov_ri("esi", FILL_START // PAGE_SIZE)

    a.label("fill_page")                     # esi = page number i
    a.alu_ri("cmp", "esi", end_page)
    a.jcc("jae", "fill_done")
    a.mov_rr("edi", "esi")
    a.shift("shl", "edi", 12)                # edi = page address (stosd target)
    a.mov_rr("eax", "esi")
    a.alu_rr("xor", "edx", "edx")
    a.mov_ri("ecx", 7)
    a.div("ecx")                             # edx = i % 7
    a.alu_ri("cmp", "edx", 3)
    a.jcc("je", "zero_page")
    a.mov_rr("eax", "esi")
    a.alu_rr("xor", "edx", "edx")
    a.mov_ri("ecx", 11)
    a.div("ecx")                             # edx = i % 11
    a.alu_ri("cmp", "edx", 5)
    a.jcc("je", "run_page")
    a.imul_rri("eax", "esi", GOLDEN)         # eax = i * GOLDEN
    a.alu_ri("xor", "eax", seed)
    a.alu_ri("or", "eax", 1)                 # xorshift32 state, never 0
    a.mov_ri("ecx", PAGE_SIZE // 4)
    a.label("rand_word")
    a.mov_rr("edx", "eax")
    a.shift("shl", "edx", 13)
    a.alu_rr("xor", "eax", "edx")
    a.mov_rr("edx", "eax")
    a.shift("shr", "edx", 17)
    a.alu_rr("xor", "eax", "edx")
    a.mov_rr("edx", "eax")
    a.shift("shl", "edx", 5)
    a.alu_rr("xor", "eax", "edx")
    a.simple(b"\xAB", "stosd                        ; [edi] = eax, edi += 4")
    a.dec("ecx")
    a.jcc("jne", "rand_word")
    a.jmp("next_page")
    a.label("zero_page")
    a.alu_rr("xor", "eax", "eax")
    a.mov_ri("ecx", PAGE_SIZE // 4)
    a.simple(b"\xF3\xAB", "rep stosd")
    a.jmp("next_page")
    a.label("run_page")
    a.mov_rr("eax", "esi")
    a.alu_ri("and", "eax", 0xFF)
    a.imul_rri("eax", "eax", 0x01010101)     # the byte i & 0xff in all 4 lanes
    a.mov_ri("ecx", PAGE_SIZE // 4)
    a.simple(b"\xF3\xAB", "rep stosd")
    a.label("next_page")
    a.inc("esi")
    a.jmp("fill_page")

    a.label("fill_done")
    a.mov_abs_imm(MARKER_ADDR + 16, 0)
    a.mov_abs_imm(MARKER_ADDR + 20, seed)
    a.mov_abs_imm(MARKER_ADDR + 24, ram_bytes)
    a.mov_abs_imm(MARKER_ADDR + 28, 1 if dirty else 0)
    for k in range(4):                       # the magic goes last
        a.mov_abs_imm(MARKER_ADDR + 4 * k, struct.unpack_from("<I", MARKER_MAGIC, 4 * k)[0])

    if not dirty:
        a.label("halt")
        a.simple(b"\xF4", "hlt")
        a.jmp("halt")
        return a

    a.alu_rr("xor", "ebx", "ebx")            # ebx = pass number n
    a.label("pass")
    a.alu_rr("xor", "esi", "esi")            # esi = k, page within the window
    a.label("dirty_page")
    a.mov_rr("edi", "ebx")
    a.shift("shr", "edi", DIRTY_SHIFT)
    a.alu_rr("add", "edi", "esi")
    a.alu_ri("and", "edi", DIRTY_REGION - 1)
    a.alu_ri("add", "edi", DIRTY_FIRST_PAGE)
    a.shift("shl", "edi", 12)                # edi = page address
    a.invlpg_r("edi")
    a.imul_rri("edx", "esi", 132)
    a.mov_rr("eax", "ebx")
    a.shift("shr", "eax", DIRTY_WORD_SHIFT)
    a.shift("shl", "eax", 2)
    a.alu_rr("add", "edx", "eax")
    a.alu_ri("and", "edx", 0xFFC)            # edx = (k*132 + (n >> DIRTY_WORD_SHIFT)*4) & 0xffc
    a.add_bi_imm8("edi", "edx", 1)
    a.test_ri("ebx", DIRTY_RUN_EVERY - 1)
    a.jcc("jne", "no_run")
    a.imul_rri("edx", "esi", 48)
    a.mov_rr("eax", "ebx")
    a.shift("shr", "eax", DIRTY_RUN_SHIFT)
    a.shift("shl", "eax", 4)
    a.alu_rr("add", "edx", "eax")
    a.alu_ri("and", "edx", 0xFF0)            # edx = (k*48 + (n >> DIRTY_RUN_SHIFT)*16) & 0xff0
    for disp in (0, 4, 8, 12):
        a.mov_bid_r("edi", "edx", disp, "ebx")
    a.label("no_run")
    a.inc("esi")
    a.alu_ri("cmp", "esi", DIRTY_WINDOW)
    a.jcc("jb", "dirty_page")
    a.inc("ebx")
    a.invlpg_abs(MARKER_ADDR)
    a.mov_abs_r(MARKER_ADDR + 16, "ebx")     # counter = passes completed
    a.jmp("pass")
    return a


def build_guest(seed: int, ram_bytes: int, dirty: bool = True) -> bytes:
    """The multiboot image (one 4 KiB page) for ``qemu-system-x86_64 -kernel``.

    ``ram_bytes`` must equal the VM's ``-m`` size: the guest fills up to it.
    """
    _check_args(seed, ram_bytes)
    a = _assemble(seed, ram_bytes, dirty)
    code = a.finish()
    header = struct.pack(
        "<8I",
        _MB_MAGIC,
        _MB_FLAGS,
        (-(_MB_MAGIC + _MB_FLAGS)) & _MASK32,  # checksum: the three words sum to 0
        LOAD_ADDR,                            # header_addr (header is at file offset 0)
        LOAD_ADDR,                            # load_addr
        LOAD_ADDR + PAGE_SIZE,                # load_end_addr: load one page
        BSS_END,                              # bss_end_addr: marker + stack pages, zeroed
        LOAD_ADDR + _HEADER_SIZE,             # entry_addr
    )
    image = header + code
    assert len(image) <= PAGE_SIZE
    return image + bytes(PAGE_SIZE - len(image))


def listing(seed: int = 1, ram_bytes: int = 64 << 20, dirty: bool = True) -> str:
    """The assembly listing of the guest's code: address, bytes, instruction."""
    _check_args(seed, ram_bytes)
    a = _assemble(seed, ram_bytes, dirty)
    a.finish()
    out = []
    for addr, code, text in a.lines:
        out.append(f"{addr:08x}  {code.hex(' '):<36} {text}" if code else f"{addr:08x}  {'':<36} {text}")
    return "\n".join(out)


def page_kind(i: int) -> str:
    """``"zero"``, ``"run"`` or ``"random"`` for page number ``i``."""
    if i % 7 == 3:
        return "zero"
    if i % 11 == 5:
        return "run"
    return "random"


def expected_pages(seed: int, first: int, count: int) -> np.ndarray:
    """Pages ``first .. first+count-1`` as the guest fills them, shape (count, 4096) uint8."""
    idx = np.arange(first, first + count, dtype=np.uint64)
    out = np.zeros((count, PAGE_SIZE // 4), dtype="<u4")
    kind_zero = idx % 7 == 3
    kind_run = ~kind_zero & (idx % 11 == 5)
    kind_rand = ~kind_zero & ~kind_run
    run_bytes = (idx & 0xFF).astype(np.uint32) * np.uint32(0x01010101)
    out[kind_run] = run_bytes[kind_run, None]
    ridx = idx[kind_rand]
    if len(ridx):
        state = (((ridx * np.uint64(GOLDEN)) & np.uint64(_MASK32)).astype(np.uint32) ^ np.uint32(seed)) | np.uint32(1)
        words = np.empty((len(ridx), PAGE_SIZE // 4), dtype=np.uint32)
        for w in range(PAGE_SIZE // 4):
            state ^= state << np.uint32(13)
            state ^= state >> np.uint32(17)
            state ^= state << np.uint32(5)
            words[:, w] = state
        out[kind_rand] = words
    return out.view(np.uint8).reshape(count, PAGE_SIZE)


def expected_page(seed: int, i: int) -> bytes:
    """Page number ``i`` (guest-physical address ``i * 4096``) as the guest fills it."""
    return expected_pages(seed, i, 1)[0].tobytes()


class Marker:
    """The decoded marker page (see the module docstring)."""

    __slots__ = ("ready", "counter", "seed", "ram_bytes", "dirty")

    def __init__(self, raw: bytes) -> None:
        self.ready = raw[:16] == MARKER_MAGIC
        self.counter, self.seed, self.ram_bytes, flags = struct.unpack_from("<4I", raw, 16)
        self.dirty = bool(flags & 1)

    def __repr__(self) -> str:
        return (f"Marker(ready={self.ready}, counter={self.counter}, seed={self.seed:#x}, "
                f"ram_bytes={self.ram_bytes:#x}, dirty={self.dirty})")


def read_marker(ram: bytes | bytearray | memoryview | str | os.PathLike, *, base: int = 0) -> Marker:
    """Decode the marker from guest RAM (bytes) or from a RAM file path.

    ``base`` is the file offset of guest-physical address 0 (0 for the
    ``mem0`` memory-backend-file).
    """
    if isinstance(ram, (bytes, bytearray, memoryview)):
        raw = bytes(ram[base + MARKER_ADDR: base + MARKER_ADDR + 32])
    else:
        with open(ram, "rb") as f:
            f.seek(base + MARKER_ADDR)
            raw = f.read(32)
    if len(raw) < 32:
        raise ValueError("RAM too small to hold the marker")
    return Marker(raw)
