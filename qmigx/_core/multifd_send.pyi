"""Type stub for the compiled multifd send loop ``qmigx._core.multifd_send``."""

from typing import Optional

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

__all__ = ["send_packets", "DONE", "STOPPED", "TIMEOUT", "FAILED"]

DONE: int
STOPPED: int
TIMEOUT: int
FAILED: int

def send_packets(fd: int, wake: int, header: Buffer, name: bytes, rows: Buffer,
                 index: npt.NDArray[np.int64], offsets: npt.NDArray[np.uint64], page_size: int,
                 pages_alloc: int, packet_num: int, flags: int, timeout: Optional[float],
                 is_socket: bool = True) -> tuple[int, int, int, int]: ...
