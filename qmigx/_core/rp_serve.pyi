"""Type stub for the compiled return-path page-request server ``qmigx._core.rp_serve``."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

from qmigx._core.wirelock import WireLock

__all__ = ["serve_requests", "DONE", "END", "STOPPED", "TIMEOUT", "FAILED", "WRITE_FAILED",
           "PAGE_SIZE", "MIN_BUFFER", "STATE_SLOTS"]

DONE: int
END: int
STOPPED: int
TIMEOUT: int
FAILED: int
WRITE_FAILED: int
PAGE_SIZE: int
MIN_BUFFER: int
STATE_SLOTS: int

def serve_requests(fd: int, wake: int, buf: Buffer, have: int, blocks: list,
                   take_lock: WireLock, out: WireLock, state: npt.NDArray[np.int64],
                   timeout_ms: int) -> tuple[int, int, int, int]: ...
