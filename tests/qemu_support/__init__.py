"""Support code for interop tests against a real QEMU 7.2.

* :mod:`.guest`   -- a multiboot test guest generated in pure Python, and
  the page contents it writes;
* :mod:`.qmp`     -- a small synchronous QMP client;
* :mod:`.harness` -- start QEMU with file-backed guest RAM, make and load
  migration streams;
* :mod:`.streams` -- named streams generated once per cache directory.
"""

from .harness import Qemu, QemuError, StreamInfo, load_stream, qemu_binary, save_stream

__all__ = ["Qemu", "QemuError", "StreamInfo", "load_stream", "qemu_binary", "save_stream"]
