"""Type stub for the compiled zero-page kernel ``qmigx._core.zeropage``."""

from typing_extensions import Buffer

import numpy as np
import numpy.typing as npt

__all__ = ["is_zero", "zero_page_map", "simd"]

simd: str

def is_zero(buf: Buffer) -> bool: ...
def zero_page_map(
    buf: Buffer, page_size: int = 4096, *, out: npt.NDArray[np.bool_] | None = None
) -> npt.NDArray[np.bool_]: ...
def _available_simd() -> tuple[str, ...]: ...
def _set_simd(name: str) -> str: ...
