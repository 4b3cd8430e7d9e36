"""Saved states as artefacts: ELF cores, block files and deltas of 1 GiB, against ``cp``.

Every figure is a ratio to ``cp`` of the stream file made in the same
run, alternating with the case, on the same file system (tmpfs when there
is one, so the disk is not what is measured). The stream is a real
QEMU 7.2 ``pc`` saved state (the test vector's configuration, device
sections and vmdesc) whose ``mem0`` is grown to 1 GiB of mostly non-zero
pages. Cases run as whole processes, as a user runs them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.synthetic import fill_pages
from qmigx.tools.streams import load_stream, save_stream

GIB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
VECTOR = REPO / "tests" / "data" / "qemu72-pc-paused.mig.gz"


def _scratch() -> Path:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path("/tmp")
    d = base / f"qmigx-bench-saved-{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d


def grown_stream(path: Path, ram_bytes: int, seed: int = 3) -> None:
    """The test vector with ``mem0`` grown to ``ram_bytes`` of synthetic pages."""
    vec = load_stream(gzip.decompress(VECTOR.read_bytes()))
    mem = RAMBlock.anonymous("mem0", ram_bytes)
    fill_pages(mem.memory, seed)
    blocks = RAMBlockList([mem] + [b for b in vec.blocks if b.idstr != "mem0"])
    with open(path, "wb") as f:
        save_stream(f.write, blocks, vec.sections, vmdesc=vec.vmdesc,
                    configuration=vec.configuration)


@pytest.fixture(scope="module")
def workdir():
    d = _scratch()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def stream_1g(workdir):
    path = workdir / "guest-1g.mig"
    grown_stream(path, GIB)
    return path


def timed(args, *, cwd=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def qmigx_args(*args) -> list:
    return [sys.executable, "-m", "qmigx", *map(str, args)]


def vs_cp(benchmark, stream: Path, case_args: list, cleanup, rounds: int = 3) -> float:
    """Best-of-``rounds`` whole-process times of ``cp`` and the case; their ratio."""
    copy = stream.with_suffix(".cp")
    cp_best = case_best = float("inf")
    for _ in range(rounds):
        cp_best = min(cp_best, timed(["cp", str(stream), str(copy)]))
        copy.unlink()
        case_best = min(case_best, timed(case_args, cwd=REPO))
        cleanup()
    ratio = cp_best / case_best
    benchmark.extra_info.update(cp_seconds=round(cp_best, 3), seconds=round(case_best, 3),
                                ratio_to_cp=round(ratio, 3))
    print(f"\n{benchmark.name}: {case_best:.3f} s, cp {cp_best:.3f} s: {ratio:.2f}x cp")
    return ratio


def test_extract_elf_1gib_vs_cp(benchmark, stream_1g, workdir):
    out = workdir / "guest.elf"

    def cleanup():
        assert out.stat().st_size > GIB
        out.unlink()

    ratio = benchmark.pedantic(
        lambda: vs_cp(benchmark, stream_1g, qmigx_args("extract", stream_1g, "--elf", out),
                      cleanup), rounds=1, iterations=1)
    assert ratio > 0
