"""Command lines for the Python children qmigx starts.

``python -m qmigx`` and ``python -c "import qmigx ..."`` put the working
directory first on ``sys.path``. Run from a checkout of qmigx's source,
such a child imports that tree (which has no compiled extensions, so
``qmigx._core`` is missing) instead of the package that started it, and
``pip install . && qmigx demo`` fails in the project root. Every child
qmigx starts of itself is built here, so that it always imports the very
package its parent runs, whatever its working directory:

* the working-directory entry is dropped from the child's ``sys.path``
  (what ``-P`` does on Python 3.11+, done by hand so 3.10 works too);
* the directory the parent's qmigx was imported from is put first, unless
  it is already on the path (an installed package: site-packages must not
  move ahead of the standard library). A parent running from a source
  tree thus gets a child running the same tree.
"""

from __future__ import annotations

import os
import sys

__all__ = ["python_command", "qmigx_command"]

# Runs first in the child, before anything can import qmigx. With ``-c``
# the working directory is the empty string at sys.path[0] (absent under
# -P, -I or PYTHONSAFEPATH, hence the test).
_PRELUDE = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "if {root!r} not in sys.path:\n"
    "    sys.path.insert(0, {root!r})\n"
)

# ``python -m qmigx`` after the prelude: runpy with alter_sys sets
# sys.argv[0] and __main__ as -m would.
_RUN_MAIN = "import runpy\nrunpy.run_module('qmigx', run_name='__main__', alter_sys=True)\n"


def _package_root() -> str:
    """The sys.path entry the running qmigx package was imported from."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_command(code: str) -> list[str]:
    """argv running ``code`` in a child Python that imports this qmigx.

    Arguments for the code go after it (they become ``sys.argv[1:]``).
    """
    return [sys.executable, "-c", _PRELUDE.format(root=_package_root()) + code]


def qmigx_command() -> list[str]:
    """argv prefix for ``python -m qmigx`` that imports this qmigx.

    Append the subcommand and its arguments, e.g.
    ``qmigx_command() + ["incoming", uri]``.
    """
    return python_command(_RUN_MAIN)
