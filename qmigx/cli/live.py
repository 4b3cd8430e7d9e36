"""The live-migration subcommands: ``incoming`` and ``send``.

Both build QEMU's capabilities and parameters from ``--cap NAME=on|off``
and ``--param NAME=VALUE`` (QEMU's names and checks), run one migration,
draw progress on a terminal and exit 0 only when it completed.
``--drive NAME=PATH`` names a disk image: ``send`` migrates it (with
``--cap block=on``), ``incoming`` writes the chunks of disk NAME into it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from qmigx.cli.progress import Progress
from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.errors import CapabilityError, MigrationError, ParameterError
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["settings_from_args", "objects_from_args", "cmd_incoming", "cmd_send", "info_migrate"]


def _bool(text: str, name: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise ParameterError(f"capability {name}: expected on or off, not {text!r}", field=name)


def settings_from_args(caps: list, params: list, *, incoming: bool,
                       qemu_version: Optional[str] = None, defaults: Optional[dict] = None) -> tuple:
    """Capabilities and Parameters from ``NAME=on|off`` and ``NAME=VALUE`` lists.

    ``qemu_version`` None accepts the names of QEMU 7.2 and 10.0 alike
    (qmigx speaks both); ``defaults`` sets other starting values (the
    machine type's ``zero-page-detection``).
    """
    c = Capabilities(qemu_version=qemu_version)
    changes = []
    for item in caps or ():
        name, _, value = item.partition("=")
        changes.append((name, _bool(value or "on", name)))
    if changes:
        c.set_many(changes, incoming=incoming)
    p = Parameters(capabilities=c, qemu_version=qemu_version, defaults=defaults)
    values = {}
    for item in params or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise ParameterError(f"--param {item!r}: expected NAME=VALUE", field=name)
        values[name] = _parse_value(value)
    if values:
        p.set(values)
    return c, p


def objects_from_args(items: list):
    """An :class:`~qmigx.crypto.ObjectRoot` holding the ``--object`` options, in order."""
    from qmigx.crypto import ObjectRoot

    root = ObjectRoot()
    for text in items or ():
        root.add_option(text)
    return root


def _print_refusal(peer: str, exc: BaseException) -> None:
    """A refused TLS peer: one line on stderr, as QEMU reports it; the destination keeps listening."""
    print(f"qmigx: {exc}", file=sys.stderr, flush=True)


def _parse_value(text: str):
    """A ``--param`` value: integer, boolean, size (``64M``), JSON list/object, else text."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    if text[:1] in ("[", "{"):  # block-bitmap-mapping
        try:
            return json.loads(text)
        except ValueError:
            raise ParameterError(f"--param value is not valid JSON: {text!r}") from None
    if text.lower() in ("true", "false", "on", "off"):
        return text.lower() in ("true", "on")
    if text and text[-1].upper() in "KMGT" and text[:-1].isdigit():
        return int(text[:-1]) << {"K": 10, "M": 20, "G": 30, "T": 40}[text[-1].upper()]
    return text


def _shared_ram(items: list, *, private: bool) -> RAMBlockList:
    blocks = RAMBlockList()
    for item in items or ():
        idstr, sep, path = item.partition("=")
        if not sep:
            raise ParameterError(f"--shared-ram {item!r}: expected IDSTR=PATH", field="shared-ram")
        blocks.add(RAMBlock.from_file(idstr, path, shared=not private))
    return blocks


def info_migrate(q: dict) -> str:
    """A ``query-migrate`` reply laid out like HMP's ``info migrate``."""
    lines = [f"Migration status: {q.get('status', 'none')}"]
    for key in ("total-time", "setup-time", "downtime", "expected-downtime"):
        if key in q:
            lines.append(f"{key.replace('-', ' ')}: {q[key]} ms")
    ram = q.get("ram")
    if ram:
        kib = lambda n: f"{n >> 10} kbytes"  # noqa: E731
        lines += [
            f"transferred ram: {kib(ram['transferred'])}",
            f"throughput: {ram['mbps']:.2f} mbps",
            f"remaining ram: {kib(ram.get('remaining', 0))}",
            f"total ram: {kib(ram['total'])}",
            f"duplicate: {ram['duplicate']} pages",
            f"skipped: {ram.get('skipped', 0)} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {kib(ram['normal-bytes'])}",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] >> 10} kbytes",
            f"multifd bytes: {kib(ram.get('multifd-bytes', 0))}",
            f"pages-per-second: {int(ram.get('pages-per-second', 0))}",
        ]
    x = q.get("xbzrle-cache")
    if x:
        lines += [
            f"cache size: {x['cache-size']} bytes",
            f"xbzrle transferred: {x['bytes'] >> 10} kbytes",
            f"xbzrle pages: {x['pages']} pages",
            f"xbzrle cache miss: {x['cache-miss']} pages",
            f"xbzrle cache miss rate: {x['cache-miss-rate']:.2f}",
            f"xbzrle encoding rate: {x.get('encoding-rate', 0):.2f}",
            f"xbzrle overflow: {x['overflow']}",
        ]
    disk = q.get("disk")
    if disk:
        lines += [
            f"transferred disk: {disk['transferred'] >> 10} kbytes",
            f"remaining disk: {disk['remaining'] >> 10} kbytes",
            f"total disk: {disk['total'] >> 10} kbytes",
        ]
    if "error-desc" in q:
        lines.append(f"error description: {q['error-desc']}")
    return "\n".join(lines)


def _watch(mig, label: str, total: Optional[int], done_bytes, tick=None) -> MigrationStatus:
    bar = Progress(label, total)
    try:
        while not mig.c.done.wait(0.1):
            if tick is not None:
                tick()
            bar.update(done_bytes(), mig.state.state.value)
    finally:
        bar.close()
    return mig.state.state


#: capabilities with which received pages must also be held in RAM: multifd pages land
#: in RAM from their own threads, postcopy and COLO keep the guest's memory, shared
#: and mapped-ram blocks are RAM the destination maps
_KEEPS_RAM = frozenset({"multifd", "postcopy-ram", "x-colo", "x-ignore-shared", "mapped-ram"})


def _spools(caps, args, given) -> bool:
    """Whether ``--save`` can write received pages straight to OUT, without guest RAM."""
    return not (caps.enabled() & _KEEPS_RAM or args.ram_dir or len(given) or args.touch)


def cmd_incoming(args) -> int:
    from qmigx.block import BlockLoadHandler
    from qmigx.migration import MigrationDestination
    from qmigx.tools.analyze import block_filename

    caps, params = settings_from_args(args.cap, args.param, incoming=True)
    objects = objects_from_args(args.object)
    t_start = time.monotonic()
    given = _shared_ram(args.shared_ram, private=True)
    bitmaps = _bitmap_destination(args, params)
    # always there: block records naming a disk that was not given fail, as in QEMU
    disks = BlockLoadHandler(args.drive)
    dst = MigrationDestination(given if len(given) else None, capabilities=caps,
                               parameters=params,
                               handlers=[disks] + ([bitmaps] if bitmaps else []),
                               objects=objects)
    dst.on_refused = _print_refusal
    dst.touch_rate = args.touch
    dst.colo_heartbeat_timeout = args.colo_heartbeat
    if len(given):
        dst.loader_create_missing = True
    journal = None
    if args.save:  # OUT written while pages arrive
        from qmigx.tools.journal import SaveJournal

        journal = SaveJournal(args.save, dst, spool=_spools(caps, args, given))
        dst.loader_placement = journal.placement
        journal.start()
    dst.incoming(args.uri)
    t_listen = time.monotonic()
    def recover() -> None:  # a broken postcopy listens again for the source that resumes
        if dst.state.state is MigrationStatus.POSTCOPY_PAUSED and dst._recover_uri is None:
            where = dst.recover(args.recover_uri or args.uri)
            print(f"qmigx: postcopy paused ({dst.pause_reason}); waiting for the source to "
                  f"resume on {where}", file=sys.stderr, flush=True)

    state = _watch(dst, "incoming", None,
                   lambda: (dst.loader.pages_loaded * TARGET_PAGE_SIZE if dst.loader else 0)
                   + disks.bytes_written, tick=recover)
    t_end = dst.t_done or time.monotonic()
    if state != MigrationStatus.COMPLETED:
        if journal is not None:
            journal.abort()
        raise dst.error if isinstance(dst.error, MigrationError) else MigrationError(
            f"incoming migration {state.value}: {dst.error}")
    if dst.colo is not None:  # a COLO secondary that failed over: what it now holds
        print(f"qmigx: COLO secondary took over after {dst.colo.checkpoints} checkpoint(s)"
              + (f" ({dst.colo.error})" if dst.colo.error is not None else ""),
              file=sys.stderr, flush=True)
    if journal is not None:
        journal.finish()
    if args.ram_dir:
        os.makedirs(args.ram_dir, exist_ok=True)
        for blk in dst.blocks:
            with open(os.path.join(args.ram_dir, block_filename(blk.idstr)), "wb") as f:
                f.write(memoryview(blk.memory))
    if bitmaps is not None and args.bitmaps:
        bitmaps.result.save(args.bitmaps)
    if args.report:
        from qmigx.report import write_report

        write_report(args.report, side="destination", query=dst.query(), iterations=[],
                     timings={"listen_s": t_listen - t_start,
                              "first_byte_s": (dst.t_first_byte or t_end) - t_listen,
                              "migration_s": t_end - (dst.t_first_byte or t_end)},
                     extra=_incoming_extra(dst, bitmaps))
    return 0


def _incoming_extra(dst, bitmaps) -> Optional[dict]:
    extra = dict(_bitmap_report(bitmaps)) if bitmaps is not None else {}
    pc = dst.postcopy_report()
    if pc is not None:
        extra["postcopy"] = pc
    if dst.colo is not None:
        from qmigx.report import colo_report

        extra.update(colo_report(dst.colo, dst.colo_status))
    return extra or None


def _send_extra(src) -> Optional[dict]:
    extra = src.postcopy_report() or {}
    if src.colo is not None:
        from qmigx.report import colo_report

        extra = dict(extra, **colo_report(src.colo, src.colo_status))
    return extra or None


def send_compat(loaded):
    """The conventions ``qmigx send`` follows: those of the machine type FILE names.

    As QEMU 10 migrates that machine type (7.2's for the machine types
    7.2 has), corrected by what FILE itself shows: a MULTIFD_FLUSH in its
    setup section means multifd syncs per round, a SWITCHOVER_START
    command that the source sends one.
    """
    import dataclasses

    from qmigx.compat import migration_compat
    from qmigx.wire import MigCmd

    machine = loaded.configuration.machine_type if loaded.configuration else "pc-i440fx-7.2"
    compat = migration_compat(machine, "10.0")
    if loaded.multifd_sync == "round":
        compat = dataclasses.replace(compat, multifd_flush_after_each_section=False)
    if any(c.cmd == MigCmd.SWITCHOVER_START for c in loaded.commands):
        compat = dataclasses.replace(compat, send_switchover_start=True)
    return compat


def _bitmap_destination(args, params):
    """The dirty-bitmap loader ``--bitmaps``/``--bitmap-node`` ask for, or None."""
    if not (args.bitmaps or args.bitmap_node):
        return None
    from qmigx.block_dirty_bitmap import DirtyBitmapDestination

    nodes = None
    if args.bitmap_node:
        nodes = {}
        for item in args.bitmap_node:
            name, sep, size = item.partition("=")
            value = _parse_value(size) if sep and size else None
            if not name or (value is not None and not isinstance(value, int)):
                raise ParameterError(f"--bitmap-node {item!r}: expected NODE or NODE=SIZE",
                                     field="bitmap-node")
            nodes[name] = value
    return DirtyBitmapDestination(
        nodes=nodes, parameters=params,
        warn=lambda message: print(f"qmigx: warning: {message}", file=sys.stderr, flush=True))


def _bitmap_report(loader) -> dict:
    return {"dirty-bitmaps": {
        "received": [{"node": node, "name": bm.name, "granularity": bm.granularity,
                      "size": bm.size, "dirty-granules": bm.dirty_granules()}
                     for node, bm in loader.result],
        "cancelled": loader.cancelled.message if loader.cancelled is not None else None,
        "warnings": list(loader.warnings),
    }}


def cmd_send(args) -> int:
    from qmigx.block import BlockSaveHandler
    from qmigx.block_image import check_image
    from qmigx.migration import MigrationSource
    from qmigx.tools.feed import FEED_CLEAR_SHIFT, StreamFeed
    from qmigx.tools.pagerelay import NEEDS_RAM

    # the options are checked before FILE is read (its machine type only sets defaults)
    caps, params = settings_from_args(args.cap, args.param, incoming=False)
    if args.drive and not caps.get("block"):
        raise ParameterError("--drive needs --cap block=on (without it no disk is migrated)",
                             field="drive")
    if caps.get("block") and params.get("block-incremental"):
        raise ParameterError("block-incremental is not supported: the disks are raw images, "
                             "migrated whole", field="block-incremental")
    if args.start_postcopy and not (caps.get("postcopy-ram") or caps.get("dirty-bitmaps")):
        raise CapabilityError("--start-postcopy needs --cap postcopy-ram=on or "
                              "--cap dirty-bitmaps=on (on both sides)", field="postcopy-ram")
    disks = BlockSaveHandler(args.drive, capabilities=caps)  # checks the drive names too
    shared = _shared_ram(args.shared_ram, private=False)
    # FILE is loaded by a thread while it is sent (qmigx.tools.feed); plain records
    # go from FILE itself where nothing needs the pages in RAM
    relay = (os.path.isfile(args.file) and not len(shared)
             and not any(caps.get(c) for c in NEEDS_RAM))
    feed = StreamFeed(args.file, shared if len(shared) else None, create_missing=True,
                      relay=relay)
    loaded = feed.begin()
    if caps.get("postcopy-ram") or caps.get("x-colo"):
        feed.wait()  # postcopy places a page once, COLO checkpoints: RAM must be whole first
    compat = send_compat(loaded)
    caps, params = settings_from_args(args.cap, args.param, incoming=False,
                                      defaults={"zero-page-detection": compat.zero_page_detection})
    disks.capabilities = caps
    objects = objects_from_args(args.object)
    setup = loaded.ram_setup
    blocks = RAMBlockList()
    for info in (setup.blocks if setup else ()):
        blk = loaded.blocks[info.idstr]
        if info.gpa is not None:
            blk.gpa = info.gpa
        blocks.add(blk)
    machine = loaded.configuration.machine_type if loaded.configuration else "pc-i440fx-7.2"
    handlers: list = [disks]
    if args.bitmaps:
        from qmigx.block_bitmaps import DirtyBitmapSet
        from qmigx.block_dirty_bitmap import DirtyBitmapSource

        if not caps.get("dirty-bitmaps"):
            raise CapabilityError("--bitmaps needs the dirty-bitmaps capability "
                                  "(--cap dirty-bitmaps=on)", field="dirty-bitmaps")
        handlers.append(DirtyBitmapSource(DirtyBitmapSet.load(args.bitmaps), capabilities=caps,
                                          parameters=params, running=lambda: src.guest.running))
    src = MigrationSource(
        blocks, devices=loaded.sections, vmdesc=loaded.vmdesc, machine_type=machine,
        capabilities=caps, parameters=params, globalstate=False,
        ram_section_id=setup.section.section_id if setup else 2, handlers=handlers,
        compat=compat, objects=objects, dirty_logs=feed.dirty_logs(),
        clear_bitmap_shift=FEED_CLEAR_SHIFT)
    src.page_relay = feed.placement if relay else None
    src.guest.running = False  # replaying a recorded state: nothing runs

    def settle() -> None:  # before the final pass: FILE whole, its device state known
        feed.wait()
        src.devices = list(loaded.sections)
        src.vmdesc = loaded.vmdesc
        src.compat = send_compat(loaded)
    src.before_complete = settle
    src.recover_timeout = args.recover_timeout
    src.migrate(args.uri, start_postcopy=args.start_postcopy)
    last_try = [0.0]

    def resume() -> None:  # a broken postcopy: reconnect to the same URI, again and again
        if src.state.state is MigrationStatus.POSTCOPY_PAUSED and not src._resume.is_set() \
                and time.monotonic() - last_try[0] > 0.5:
            last_try[0] = time.monotonic()
            src.migrate(args.uri, resume=True)
    total = src.ram.total if src.ram else sum(b.used_length for b in blocks)
    if disks.is_active():
        total += sum(check_image(name, path, writable=False) for name, path in disks.drives)
    state = _watch(src, "send", total, lambda: src.stats.transferred + disks.bytes_sent,
                   tick=resume)
    q = src.query()
    if sys.stdout.isatty() or args.verbose:
        print(info_migrate(q))
        if disks.is_active():
            print(f"disk chunks: {disks.data_chunks} sent with data, {disks.zero_chunks} as zero "
                  f"blocks, {disks.dirty_found} found changed after sending (sent again)")
    if args.report:
        from qmigx.report import write_report

        write_report(args.report, side="source", query=q, iterations=src.iterations,
                     timings={"load_file_s": 0.0},
                     extra=dict(_send_extra(src) or {}, file={
                         "bytes": loaded.size,
                         # FILE is read as it is sent: how much was parsed when sending began
                         "parsed_at_first_send": feed.parsed_at_first_send,
                         # pages sent from their records in FILE, and from RAM
                         "pages_relayed": getattr(feed.placement, "relayed_pages", None),
                         "pages_from_ram": getattr(feed.placement, "ram_pages", None)}))
    if state != MigrationStatus.COMPLETED:
        raise src.error if isinstance(src.error, MigrationError) else MigrationError(
            f"migration {state.value}: {src.error}")
    return 0
