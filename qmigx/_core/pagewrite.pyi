"""Type stub for the compiled page writer ``qmigx._core.pagewrite``."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

__all__ = ["write_pages"]

def write_pages(fd: int, data: Buffer, pos: npt.NDArray[np.int64], out: npt.NDArray[np.int64],
                page_size: int) -> int: ...
