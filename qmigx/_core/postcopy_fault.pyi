"""Type stub for the compiled postcopy fault loop ``qmigx._core.postcopy_fault``."""

import numpy as np
import numpy.typing as npt

from qmigx._core.wirelock import WireLock

__all__ = ["serve_faults", "STOPPED", "CLOSED", "READ_FAILED", "WRITE_FAILED", "PAGE_SIZE",
           "REQ_PAGES", "REQ_PAGES_ID"]

STOPPED: int
CLOSED: int
READ_FAILED: int
WRITE_FAILED: int
PAGE_SIZE: int
REQ_PAGES: int
REQ_PAGES_ID: int

def serve_faults(uffd: int, stop: int, blocks: list, lock: WireLock,
                 state: npt.NDArray[np.int64]) -> tuple[int, int]: ...
