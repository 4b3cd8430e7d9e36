"""Type stub for the compiled chunk-digest kernel ``qmigx._core.chunkhash``."""

from typing_extensions import Buffer

import numpy as np
import numpy.typing as npt

__all__ = ["chunk_digests"]

def chunk_digests(buf: Buffer, chunk_size: int, digests: npt.NDArray[np.uint64],
                  zero: npt.NDArray[np.uint8]) -> None: ...
