"""Multifd: RAM pages over parallel channels (spec multifd.md).

* :mod:`.packet`: init packets, packet headers, placing and gathering
  pages, the per-channel zlib/zstd streams (sans-IO);
* :mod:`.channels`: :class:`~qmigx.multifd.channels.MultifdSender` and
  :class:`~qmigx.multifd.channels.MultifdReceiver`, the channel threads.

The packet API is re-exported here.
"""

from qmigx.multifd.packet import *  # noqa: F401,F403
from qmigx.multifd.packet import __all__
