"""What a machine type decides about the migration wire (QEMU's compat properties).

QEMU keeps the wire behaviour of old machine types through properties of
its ``migration`` object, which each machine type's compat list sets
(qemu10.md §2). Both ends of a migration use the same machine type (the
configuration section carries it and the destination compares), so the
machine type name is what tells a peer which conventions to follow:

==================================  ================  ===========================
property (QEMU 10)                  10.0 machines      old value, for machines
==================================  ================  ===========================
``send-switchover-start``           on                 off, <= 9.2
``multifd-flush-after-each-section`` off               on, <= 8.0
``zero-page-detection`` (parameter) ``multifd``        ``legacy``, <= 8.2
``x-preempt-pre-7-2``               off                on, <= 7.2
==================================  ================  ===========================

A QEMU 7.2 peer has 7.2's behaviour whatever the machine (it knows no
newer machine type). :func:`migration_compat` gives the conventions of a
machine type on a QEMU version; :func:`check_machine_known` refuses a
machine type that QEMU version does not have, as its configuration check
would ("Machine type received is ... and local is ...").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from qmigx.errors import IncompatibleStreamError

__all__ = ["QEMU_VERSIONS", "MigrationCompat", "machine_version", "migration_compat",
           "check_machine_known", "default_machine"]

#: The QEMU versions qmigx speaks as a peer.
QEMU_VERSIONS = ("7.2", "10.0")

_VERSIONED = re.compile(r"^(?:pc-(?:i440fx|q35)|pc)-(\d+)\.(\d+)$")


def _parse_version(text: str) -> tuple[int, int]:
    if text not in QEMU_VERSIONS:
        raise ValueError(f"QEMU version must be one of {QEMU_VERSIONS}, not {text!r}")
    major, minor = text.split(".")
    return int(major), int(minor)


def machine_version(machine_type: str) -> Optional[tuple[int, int]]:
    """The QEMU release a versioned x86 machine type is frozen at (``pc-q35-7.2`` -> (7, 2)).

    None for an unversioned type (``microvm``, ``isapc``), which behaves as
    the newest machine of the QEMU running it.
    """
    m = _VERSIONED.match(machine_type)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_machine(kind: str, qemu_version: str) -> str:
    """What the ``pc`` / ``q35`` aliases resolve to on a QEMU version."""
    chipset = {"pc": "i440fx", "q35": "q35"}[kind]
    return f"pc-{chipset}-{qemu_version}"


@dataclass(frozen=True)
class MigrationCompat:
    """The wire conventions of one machine type on one QEMU version.

    Attributes:
        machine_type: the configuration section's name.
        qemu_version: the QEMU that runs it (``"7.2"`` or ``"10.0"``).
        send_switchover_start: write ``MIG_CMD_SWITCHOVER_START`` before
            the END sections (qemu10.md §3.1).
        multifd_flush_after_each_section: sync multifd before every RAM
            EOS (QEMU 7.2's model) instead of per round, announced by
            ``MULTIFD_FLUSH`` records (qemu10.md §4.4).
        zero_page_detection: where zero pages are found and sent:
            ``legacy`` (ZERO records on the main channel) or ``multifd``
            (listed in multifd packets); without multifd both send ZERO
            records.
        compress: the ``compress`` capability exists (QEMU <= 8.x).
        zero_fill_any: a ZERO record may fill a page with any byte (7.2);
            QEMU 10 refuses any fill but 0.
        vmdesc_configuration: the vmdesc starts with a ``configuration``
            entry (QEMU 10).
        preempt_pre_7_2: the postcopy-preempt channel is connected during
            setup and ends with a RAM EOS (7.2); otherwise it is connected
            when postcopy starts and the destination closes it itself
            (qemu10.md §8).
    """

    machine_type: str
    qemu_version: str
    send_switchover_start: bool
    multifd_flush_after_each_section: bool
    zero_page_detection: str
    compress: bool
    zero_fill_any: bool
    vmdesc_configuration: bool
    preempt_pre_7_2: bool

    @property
    def multifd_sync(self) -> str:
        """``"section"`` (7.2's model) or ``"round"`` (10.0 machines >= 8.1)."""
        return "section" if self.multifd_flush_after_each_section else "round"


def migration_compat(machine_type: str, qemu_version: str = "10.0") -> MigrationCompat:
    """The conventions QEMU ``qemu_version`` follows when migrating ``machine_type``."""
    qv = _parse_version(qemu_version)
    if qv < (10, 0):
        return MigrationCompat(machine_type, qemu_version, send_switchover_start=False,
                               multifd_flush_after_each_section=True,
                               zero_page_detection="legacy", compress=True, zero_fill_any=True,
                               vmdesc_configuration=False, preempt_pre_7_2=True)
    mv = machine_version(machine_type) or qv
    return MigrationCompat(
        machine_type, qemu_version,
        send_switchover_start=mv >= (10, 0),
        multifd_flush_after_each_section=mv <= (8, 0),
        zero_page_detection="legacy" if mv <= (8, 2) else "multifd",
        compress=False, zero_fill_any=False, vmdesc_configuration=True,
        preempt_pre_7_2=mv <= (7, 2))


def check_machine_known(machine_type: str, qemu_version: str, *,
                        offset: Optional[int] = None) -> None:
    """Refuse a versioned machine type newer than the QEMU that must run it.

    Raises:
        IncompatibleStreamError: e.g. ``pc-i440fx-10.0`` for QEMU 7.2, which
            lacks that machine type, so its destination would refuse the
            stream at the configuration section.
    """
    mv = machine_version(machine_type)
    if mv is not None and mv > _parse_version(qemu_version):
        raise IncompatibleStreamError(
            f"QEMU {qemu_version} lacks machine type {machine_type!r} (its newest are "
            f"pc-i440fx-{qemu_version} and pc-q35-{qemu_version}); its destination refuses "
            f"the stream at the configuration section", offset=offset,
            section="configuration", field="machine_type")
