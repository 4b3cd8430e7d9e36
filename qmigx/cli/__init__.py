"""The ``qmigx`` command line (QEMU's HMP and scripts, for qmigx).

Nothing in the library imports this package: it sits on top, turning
arguments into calls of the library and results into text.
"""

import os

# numpy's OpenBLAS starts a thread per core when numpy is imported, and
# those threads spin for a while: on two cores that took 9% of an
# ``extract``. Nothing here does linear algebra; a caller's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from qmigx.cli.main import main  # noqa: E402 - after the environment is set

__all__ = ["main"]
