"""The ``qmigx`` command line (QEMU's HMP and scripts, for qmigx).

Nothing in the library imports this package: it sits on top, turning
arguments into calls of the library and results into text.
"""

from qmigx.cli.main import main

__all__ = ["main"]
