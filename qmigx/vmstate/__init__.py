"""VMState: declarative device-state descriptions and their wire codec.

Every section of a migration stream other than RAM, block and dirty
bitmaps is a device's state serialised by QEMU's VMState interpreter,
with no self-description in the bytes (vmstate.md). To send or receive
those sections, qmigx needs the same machinery:

* ``fields``  -- the model (:class:`VMStateDescription`,
  :class:`VMStateField`, :class:`VMSFlag`) and QEMU's ``VMSTATE_*``
  macros as ``vmstate_*`` helpers;
* ``infos``   -- the basic types (``VMStateInfo``) and their encodings;
* ``codec``   -- :func:`save_state` / :func:`load_state` over plain dicts,
  optionally writing the section's vmdesc entry;
* ``vmdesc``  -- the whole vmdesc trailer document (:class:`VMDescBuilder`);
* ``analyze`` -- generic decoding of FULL sections with a stream's own
  vmdesc, rendering like QEMU's analyze-migration.py and re-encoding
  byte-identically;
* ``sections`` -- the ``configuration`` and ``globalstate`` descriptions.

The JSON text writer itself is :mod:`qmigx.qjson`.
"""

from __future__ import annotations

from qmigx.vmstate.analyze import (
    ANALYZE_ENCODER,
    Leaf,
    StructValue,
    Subsection,
    analyze_value,
    dumps_analyze,
    encode_with_vmdesc,
    walk_with_vmdesc,
)
from qmigx.vmstate.codec import check_migratable, load_state, save_state, section_needed
from qmigx.vmstate.fields import *  # noqa: F401,F403 (re-exported, see __all__)
from qmigx.vmstate.fields import __all__ as _fields_all
from qmigx.vmstate.infos import *  # noqa: F401,F403
from qmigx.vmstate.infos import __all__ as _infos_all
from qmigx.vmstate.sections import (
    CONFIGURATION_LOAD_VERSION,
    RUNSTATE_NAMES,
    VALIDATED_CAPABILITIES,
    VMSTATE_CONFIGURATION,
    VMSTATE_GLOBALSTATE,
    configuration,
    globalstate,
    make_configuration_vmsd,
)
from qmigx.vmstate.vmdesc import VMDescBuilder, write_old_style_entry

__all__ = [
    *_fields_all,
    *_infos_all,
    "save_state",
    "load_state",
    "section_needed",
    "check_migratable",
    "VMDescBuilder",
    "write_old_style_entry",
    "walk_with_vmdesc",
    "encode_with_vmdesc",
    "analyze_value",
    "dumps_analyze",
    "ANALYZE_ENCODER",
    "Leaf",
    "StructValue",
    "Subsection",
    "VMSTATE_CONFIGURATION",
    "VMSTATE_GLOBALSTATE",
    "CONFIGURATION_LOAD_VERSION",
    "RUNSTATE_NAMES",
    "VALIDATED_CAPABILITIES",
    "make_configuration_vmsd",
    "configuration",
    "globalstate",
]
