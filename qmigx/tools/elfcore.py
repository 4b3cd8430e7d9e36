"""ELF cores in the layout of QEMU 7.2's ``dump-guest-memory`` (paging off).

The file, as QEMU 7.2 writes it for an x86 guest:

====================  =======================================================
ELF header            ``ET_CORE``; ``EM_X86_64`` if the first vCPU is in long
                      mode, else ``EM_386``; class 64 when long mode or any
                      range ends above 4 GiB (on a PC ``pc.bios`` ends at
                      exactly 4 GiB, so in practice always). QEMU 7.2 stores
                      ``e_ehsize = 8`` (the size of a pointer, not of the
                      header); it is reproduced, so the files compare equal.
section headers       two, right after the ELF header: the null section and
                      ``.shstrtab``; the null section's ``sh_info`` holds the
                      program header count when it does not fit ``e_phnum``
program headers       one ``PT_NOTE``, then one ``PT_LOAD`` per guest-physical
                      range (:mod:`qmigx.tools.physmap`), ``p_vaddr = p_paddr``,
                      no flags, no alignment
notes                 per vCPU an ``NT_PRSTATUS`` ("CORE"; the i386 or x86-64
                      prstatus layout), then per vCPU a "QEMU" note holding
                      QEMUCPUState (version 1: registers, segments, cr0-4,
                      kernel_gs_base)
memory                the ranges' bytes, back to back
string table          ``"\\0.shstrtab\\0"`` at the very end
====================  =======================================================

The vCPU state comes from the stream's ``cpu`` device sections (decoded
by the vmdesc), ordered by instance id, which is QEMU's cpu_index; the
prstatus ``pid`` is cpu_index + 1 as in QEMU.
"""

from __future__ import annotations

import struct
from typing import Sequence

from qmigx.errors import MachineLayoutError
from qmigx.records import Record, factory

__all__ = ["CpuState", "ElfLayout", "cpu_states", "elf_layout", "EM_386", "EM_X86_64"]

EM_386 = 3
EM_X86_64 = 62
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
SHT_STRTAB = 3
NT_PRSTATUS = 1
PN_XNUM = 0xFFFF
#: hflags bit: the vCPU runs in long mode (HF_LMA_MASK)
HF_LMA = 1 << 14
SHSTRTAB = b"\0.shstrtab\0"
#: What QEMU 7.2 writes as e_ehsize (it measures a pointer).
QEMU72_EHSIZE = 8

_SEG = ("selector", "base", "limit", "flags")
# x86 register numbers (R_EAX...) and segment numbers (R_ES...)
EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = range(8)
ES, CS, SS, DS, FS, GS = range(6)


class Segment(Record, mutable=True):
    selector: int = 0
    base: int = 0
    limit: int = 0
    flags: int = 0


class CpuState(Record, mutable=True):
    """What the dump notes need of one vCPU (QEMU's CPUX86State, in part)."""

    index: int
    regs: list = factory(lambda: [0] * 16)
    rip: int = 0
    rflags: int = 0
    hflags: int = 0
    segs: list = factory(lambda: [Segment() for _ in range(6)])
    ldt: Segment = factory(Segment)
    tr: Segment = factory(Segment)
    gdt: Segment = factory(Segment)
    idt: Segment = factory(Segment)
    cr: list = factory(lambda: [0] * 5)
    kernel_gs_base: int = 0

    @property
    def long_mode(self) -> bool:
        return bool(self.hflags & HF_LMA)

    @classmethod
    def from_section(cls, index: int, value, label: str = "cpu") -> "CpuState":
        """From a ``cpu`` section decoded by the vmdesc (x86 ``vmstate_x86_cpu``)."""
        def get(name, default=None):
            try:
                return value[name]
            except KeyError:
                if default is not None:
                    return default
                raise MachineLayoutError(f"the cpu section has no field {name!r}",
                                         section=label, field=name) from None

        def seg(node) -> Segment:
            return Segment(*(int(node[k].value) for k in _SEG))

        regs = [int(leaf.value) for leaf in get("env.regs")]
        regs += [0] * (16 - len(regs))
        cpu = cls(index, regs=regs, rip=int(get("env.eip").value),
                  rflags=int(get("env.eflags").value), hflags=int(get("env.hflags").value),
                  segs=[seg(s) for s in get("env.segs")], ldt=seg(get("env.ldt")),
                  tr=seg(get("env.tr")), gdt=seg(get("env.gdt")), idt=seg(get("env.idt")))
        for i in (0, 2, 3, 4):  # cr[1] is not migrated (and always 0)
            cpu.cr[i] = int(get(f"env.cr[{i}]").value)
        kgs = get("env.kernelgsbase", False)
        cpu.kernel_gs_base = int(kgs.value) if kgs is not False else 0
        return cpu


def cpu_states(devices: dict) -> list[CpuState]:
    """Every vCPU of a saved state, by cpu_index (the ``cpu`` sections' instance ids)."""
    cpus = []
    for (idstr, inst), sec in sorted(devices.items(), key=lambda kv: kv[0][1]):
        if idstr != "cpu":
            continue
        if sec.value is None:
            raise MachineLayoutError("the cpu section is not decoded (the stream has no vmdesc)",
                                     section=sec.section.label)
        cpus.append(CpuState.from_section(inst, sec.value, sec.section.label))
    return cpus


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: 12-byte header, NUL-terminated name and desc, each padded to 4."""
    name = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def _prstatus_i386(cpu: CpuState) -> bytes:
    """x86_elf_prstatus: 144 bytes, pid at 24, user_regs at 72."""
    r = [v & 0xFFFFFFFF for v in cpu.regs]
    s = [seg.selector & 0xFFFF for seg in cpu.segs]
    regs = struct.pack("<7I8H2IHHIIHH", r[EBX], r[ECX], r[EDX], r[ESI], r[EDI], r[EBP], r[EAX],
                       s[DS], 0, s[ES], 0, s[FS], 0, s[GS], 0,
                       0, cpu.rip & 0xFFFFFFFF, s[CS], 0, cpu.rflags & 0xFFFFFFFF,
                       r[ESP], s[SS], 0)
    out = bytearray(144)
    struct.pack_into("<I", out, 24, cpu.index + 1)
    out[72 : 72 + len(regs)] = regs
    return bytes(out)


def _prstatus_x86_64(cpu: CpuState) -> bytes:
    """x86_64_elf_prstatus: 336 bytes, pid at 32, user_regs at 112."""
    r = cpu.regs
    s = cpu.segs
    regs = struct.pack("<27Q", r[15], r[14], r[13], r[12], r[EBP], r[EBX], r[11], r[10],
                       r[9], r[8], r[EAX], r[ECX], r[EDX], r[ESI], r[EDI], 0,
                       cpu.rip, s[CS].selector, cpu.rflags, r[ESP], s[SS].selector,
                       s[FS].base, s[GS].base, s[DS].selector, s[ES].selector,
                       s[FS].selector, s[GS].selector)
    out = bytearray(336)
    struct.pack_into("<I", out, 32, cpu.index + 1)
    out[112 : 112 + len(regs)] = regs
    return bytes(out)


_QEMU_SEG = struct.Struct("<IIIIQ")


def _qemu_cpu_state(cpu: CpuState) -> bytes:
    """QEMUCPUState version 1 (440 bytes in QEMU 7.2, kernel_gs_base last)."""
    r = cpu.regs
    out = struct.pack("<II", 1, 440)
    out += struct.pack("<18Q", r[EAX], r[EBX], r[ECX], r[EDX], r[ESI], r[EDI], r[ESP], r[EBP],
                       *r[8:16], cpu.rip, cpu.rflags)
    s = cpu.segs
    for seg in (s[CS], s[DS], s[ES], s[FS], s[GS], s[SS], cpu.ldt, cpu.tr, cpu.gdt, cpu.idt):
        out += _QEMU_SEG.pack(seg.selector & 0xFFFFFFFF, seg.limit & 0xFFFFFFFF,
                              seg.flags & 0xFFFFFFFF, 0, seg.base)
    out += struct.pack("<5QQ", *cpu.cr, cpu.kernel_gs_base)
    return out


def notes(cpus: Sequence[CpuState], machine: int) -> bytes:
    """The PT_NOTE contents: every vCPU's prstatus, then every vCPU's QEMU state."""
    prstatus = _prstatus_x86_64 if machine == EM_X86_64 else _prstatus_i386
    out = b"".join(_note(b"CORE", NT_PRSTATUS, prstatus(c)) for c in cpus)
    return out + b"".join(_note(b"QEMU", 0, _qemu_cpu_state(c)) for c in cpus)


class ElfLayout(Record, mutable=True):
    """Where everything of the core goes: ``head`` at 0, ranges at ``offsets``, ``tail`` last."""

    head: bytes
    offsets: list
    memory_offset: int
    tail_offset: int
    tail: bytes
    elf_class: int
    machine: int

    @property
    def size(self) -> int:
        return self.tail_offset + len(self.tail)


def elf_layout(ranges: Sequence, cpus: Sequence[CpuState]) -> ElfLayout:
    """Headers and notes of the core for these guest-physical ranges and vCPUs."""
    lma = bool(cpus) and cpus[0].long_mode
    machine = EM_X86_64 if lma else EM_386
    is64 = lma or any(r.end > 0xFFFFFFFF for r in ranges)
    note = notes(cpus, machine)
    phnum = 1 + len(ranges)
    if is64:
        ehsize, phentsize, shentsize = 64, 56, 64
    else:
        ehsize, phentsize, shentsize = 52, 32, 40
    shoff = ehsize
    phoff = shoff + 2 * shentsize
    note_off = phoff + phnum * phentsize
    mem_off = note_off + len(note)
    offsets = []
    pos = mem_off
    for r in ranges:
        offsets.append(pos)
        pos += r.size
    tail_off = pos
    ident = b"\x7fELF" + bytes((2 if is64 else 1, 1, 1)) + bytes(9)
    e_phnum = min(phnum, PN_XNUM)
    if is64:
        ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, ET_CORE, machine, 1, 0, phoff, shoff, 0,
                           QEMU72_EHSIZE, phentsize, e_phnum, shentsize, 2, 1)
        shdrs = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0,
                            phnum if phnum >= PN_XNUM else 0, 0, 0)
        shdrs += struct.pack("<IIQQQQIIQQ", 1, SHT_STRTAB, 0, 0, tail_off, len(SHSTRTAB),
                             0, 0, 0, 0)
        phdrs = struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_off, 0, 0, len(note), len(note), 0)
        for r, off in zip(ranges, offsets):
            phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 0, off, r.start, r.start, r.size,
                                 r.size, 0)
    else:
        ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, ET_CORE, machine, 1, 0, phoff, shoff, 0,
                           QEMU72_EHSIZE, phentsize, e_phnum, shentsize, 2, 1)
        shdrs = struct.pack("<10I", 0, 0, 0, 0, 0, 0, 0, phnum if phnum >= PN_XNUM else 0, 0, 0)
        shdrs += struct.pack("<10I", 1, SHT_STRTAB, 0, 0, tail_off, len(SHSTRTAB), 0, 0, 0, 0)
        phdrs = struct.pack("<8I", PT_NOTE, note_off, 0, 0, len(note), len(note), 0, 0)
        for r, off in zip(ranges, offsets):
            phdrs += struct.pack("<8I", PT_LOAD, off, r.start, r.start, r.size, r.size, 0, 0)
    head = ehdr + shdrs + phdrs + note
    assert len(head) == mem_off
    return ElfLayout(head, offsets, mem_off, tail_off, SHSTRTAB, 64 if is64 else 32, machine)
