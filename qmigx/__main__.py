"""``python -m qmigx``: the same as the ``qmigx`` command."""

import sys

from qmigx.cli.main import main

sys.exit(main())
