"""Type stub for the compiled userfaultfd helper ``qmigx._core.uffd``."""

import numpy as np
import numpy.typing as npt

__all__ = ["serve_faults", "wait_batch", "take_log", "atomic_or_range", "drop_runs",
           "TARGET_PAGE_SHIFT"]

TARGET_PAGE_SHIFT: int

def serve_faults(
    uffd: int,
    stop_fd: int,
    base: int,
    length: int,
    host_page_size: int,
    log: npt.NDArray[np.uint64],
    stats: npt.NDArray[np.uint64],
) -> int: ...
def wait_batch(stats: npt.NDArray[np.uint64]) -> None: ...
def take_log(log: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64]) -> int: ...
def atomic_or_range(log: npt.NDArray[np.uint64], first: int, n: int) -> None: ...
def drop_runs(addr: int, fd: int, starts: npt.NDArray[np.int64],
              lengths: npt.NDArray[np.int64]) -> int: ...
