"""The ``qmigx`` command line.

Each subcommand is a thin shell over the library; errors from bad input
become one line, ``qmigx: error: ...``, on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

from qmigx.errors import MigrationError, one_line

__all__ = ["main"]


def _progress(label: str, path: Optional[str]):
    from qmigx.cli.progress import Progress

    try:
        total = None if path is None else os.path.getsize(path)
    except OSError:
        total = None
    return Progress(label, total)


@contextlib.contextmanager
def _stream(path: str):
    """The migration stream in ``path``: the file, or a libvirt save image's body."""
    from qmigx.tools.saveimage import open_stream

    src = open_stream(path)
    try:
        yield src
    finally:
        if src is not path:
            src.close()


def _image_header(path: str):
    from qmigx.tools.saveimage import is_save_image, read_save_image_header

    if not is_save_image(path):
        return None
    with open(path, "rb") as f:
        return read_save_image_header(f)


def cmd_analyze(args) -> int:
    from qmigx.tools import analyze

    if args.extract:
        return _analyze_extract(args)
    if args.dump == "desc":
        with _stream(args.file) as src:
            print(analyze.dumps(analyze.vmdesc_json(src)))
        return 0
    if args.dump != "state":
        raise SystemExit("qmigx: error: Please specify either -x, -d state or -d desc")
    header = _image_header(args.file)
    bar = _progress("analyze", args.file if header is None else None)
    try:
        with _stream(args.file) as src:
            state = analyze.analyze_state(src, memory=args.memory, progress=bar.update)
    finally:
        bar.close()
    if header is not None:  # the image's header and XML first, then the stream's sections
        state = {"libvirt save image": header.describe(), **state}
    print(analyze.dumps(state))
    return 0


def _analyze_extract(args) -> int:
    """``-x``: desc.json, state.json and one file per RAM block, in the cwd."""
    from qmigx.tools import analyze
    from qmigx.ram import RamLoader

    with _stream(args.file) as src:
        desc = analyze.vmdesc_json(src)
    print("desc.json")
    with open("desc.json", "w") as f:
        f.write(analyze.dumps(desc))
    loader = RamLoader(None)
    with _stream(args.file) as src:
        state = analyze.analyze_state(src, loader=loader)
    analyze.extract_blocks(loader, ".", lambda idstr: "./" + idstr.lstrip("/"))
    for blk in loader.blocks:  # the script prints each block's name as it creates it
        print(blk.idstr)
    print("state.json")
    with open("state.json", "w") as f:
        f.write(analyze.dumps(state))
    return 0


def cmd_extract(args) -> int:
    from qmigx.tools import analyze
    from qmigx.ram import RamLoader

    if args.elf is None and args.dir is None:
        raise SystemExit("qmigx: error: extract needs DIR, --elf OUT.elf, or both")
    if args.elf is not None:
        from qmigx.tools.memdump import extract_elf

        bar = _progress("extract --elf", args.file)
        try:
            extract_elf(args.file, args.elf, progress=bar.update,
                        shared_ram=_pairs(args.shared_ram, "--shared-ram"))
        finally:
            bar.close()
        if args.dir is None:
            return 0
    os.makedirs(args.dir, exist_ok=True)
    if args.base:
        return _extract_delta(args)
    from qmigx.tools.memdump import extract_files

    bar = _progress("extract", args.file)
    try:
        state = extract_files(args.file, args.dir, progress=bar.update)
    finally:
        bar.close()
    with open(os.path.join(args.dir, "state.json"), "w") as f:
        f.write(analyze.dumps(state))
    return 0


def _extract_delta(args) -> int:
    """``extract OUT DIR --base BASE [--base D1 ...]``: a delta loaded over its base."""
    from qmigx.tools import analyze
    from qmigx.tools.delta import load_delta

    loaded = load_delta(args.file, args.base[0], chain=args.base[1:])

    class _Blocks:  # what extract_blocks reads: the loaded blocks
        blocks = loaded.blocks

    analyze.extract_blocks(_Blocks, args.dir, analyze.block_filename)
    with _stream(args.file) as src:
        state = analyze.analyze_state(src)
    with open(os.path.join(args.dir, "state.json"), "w") as f:
        f.write(analyze.dumps(state))
    return 0


def cmd_diff(args) -> int:
    from qmigx.tools.delta import apply_delta, diff_streams

    first, second, output = args.paths
    tmp = output + ".part"
    try:
        with open(tmp, "wb") as out:
            if args.apply:  # diff --apply BASE DELTA FULL
                apply_delta(first, second, out.write, chain=args.chain)
            else:
                stats = diff_streams(first, second, out.write, encoding=args.ram_encoding)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not args.apply:
        print(f"{output}: {stats.changed_pages} of {stats.template_pages} template pages "
              f"differ ({stats.zero_pages} now zero, {stats.xbzrle_pages} as XBZRLE, "
              f"{stats.full_pages} whole), {stats.other_pages} pages of other blocks, "
              f"{stats.bytes} bytes")
    return 0


def _pairs(items, option: str) -> dict:
    """``NAME=VALUE`` arguments as a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"qmigx: error: {option} takes NAME=VALUE, not {item!r}")
        out[name] = value
    return out


def cmd_verify(args) -> int:
    from qmigx.tools.streams import verify_stream

    header = _image_header(args.file)
    bar = _progress("verify", args.file if header is None else None)
    try:
        with _stream(args.file) as src:
            summary = verify_stream(src, progress=bar.update)
    finally:
        bar.close()
    if header is not None:
        print(f"{args.file}: libvirt save image version {header.version}, "
              f"{header.format} body, domain XML of {len(header.xml)} bytes, "
              f"{'running' if header.was_running else 'paused'} when saved")
    bitmaps = f", {summary['bitmaps']} dirty bitmaps" if summary.get("bitmaps") else ""
    print(f"{args.file}: OK: {summary['bytes']} bytes, {summary['sections']} section records, "
          f"{summary['pages']} page records, {summary['records']} other live-section records, "
          f"{summary['commands']} commands{bitmaps}, "
          f"vmdesc {'present' if summary['vmdesc'] else 'absent'}")
    for message in summary.get("bitmap_warnings", ()):
        print(f"{args.file}: dirty bitmaps would be dropped: {message}")
    return 0


def cmd_convert(args) -> int:
    from qmigx.tools.streams import convert_stream

    from qmigx.tools.saveimage import FORMATS, ImageWriter, SaveImageHeader

    header = _image_header(args.input)
    if args.image_format is not None:
        if header is None:
            if args.xml is None:
                raise SystemExit("qmigx: error: --image-format on a plain stream needs --xml "
                                 "FILE (the domain XML of the image)")
            with open(args.xml) as f:
                header = SaveImageHeader(xml=f.read())
        header.compressed = FORMATS.index(args.image_format)
        header.magic = b"LibvirtQemudSave"
    tmp = args.output + ".part"
    bar = _progress("convert", args.input if header is None else None)
    try:
        with _stream(args.input) as src:
            if header is None:
                with open(tmp, "wb") as out:
                    convert_stream(src, out.write, args.ram_encoding,
                                   compress_level=args.compress_level, progress=bar.update,
                                   target=args.target)
            else:  # an image in, an image out: header and XML kept, the body re-written
                image = ImageWriter(tmp, header)
                try:
                    convert_stream(src, image.write, args.ram_encoding,
                                   compress_level=args.compress_level, progress=bar.update,
                                   target=args.target)
                except BaseException:
                    image.abort()
                    raise
                image.close()
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        bar.close()
    return 0


def cmd_plot(args) -> int:
    from qmigx.cli.plot import plot_report

    plot_report(args.report, args.out)
    return 0


def cmd_demo(args) -> int:
    from qmigx.cli.demo import run_demo

    return run_demo(args)


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cap", metavar="NAME=on|off", action="append", default=[],
                   help="a migration capability (QEMU's names), repeatable")
    p.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                   help="a migration parameter (QEMU's names), repeatable")
    p.add_argument("--object", metavar="TYPE,id=ID,...", action="append", default=[],
                   help="create an object as QEMU's -object does (tls-creds-x509, "
                        "tls-creds-psk, authz-simple, authz-list, authz-listfile), repeatable")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of the migration")


def _live(name: str):
    def run(args):
        from qmigx.cli import live as live_cli

        return getattr(live_cli, name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmigx", description=(
        "Read, write, check and transform QEMU migration streams; migrate memory live."))
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="decode a stream as QEMU's analyze-migration.py does")
    a.add_argument("-f", "--file", required=True, help="migration dump to read from")
    a.add_argument("-m", "--memory", action="store_true", help="dump RAM contents as well")
    a.add_argument("-d", "--dump", default="state", help='what to dump ("state" or "desc")')
    a.add_argument("-x", "--extract", action="store_true",
                   help="extract contents into individual files")
    a.set_defaults(func=cmd_analyze)

    e = sub.add_parser("extract", help="write each RAM block and state.json to DIR, or an ELF "
                                       "memory dump")
    e.add_argument("file")
    e.add_argument("dir", nargs="?", help="where the block files and state.json go")
    e.add_argument("--elf", metavar="OUT.elf",
                   help="write the guest-physical memory and vCPU notes as QEMU's "
                        "dump-guest-memory (paging off) would")
    e.add_argument("--shared-ram", metavar="IDSTR=PATH", action="append", default=[],
                   help="with --elf: the file of a block an x-ignore-shared stream leaves out")
    e.add_argument("--base", metavar="STREAM", action="append", default=[],
                   help="FILE is a delta (qmigx diff): load it over this full stream; repeat "
                        "for the deltas in between, oldest first")

    df = sub.add_parser("diff", help="write NEW as a delta against the template BASE "
                                     "(or, with --apply, a delta back as a full stream)")
    df.add_argument("paths", nargs=3, metavar="PATH",
                    help="BASE NEW OUT; with --apply: BASE DELTA FULL")
    df.add_argument("--apply", action="store_true",
                    help="write the full stream a delta stands for")
    df.add_argument("--chain", metavar="DELTA", action="append", default=[],
                    help="with --apply: a delta between BASE and DELTA, oldest first")
    df.add_argument("--ram-encoding", default="page", choices=["page", "xbzrle"],
                    help="changed pages whole, or as XBZRLE against BASE's page when smaller")
    df.set_defaults(func=cmd_diff)
    e.set_defaults(func=cmd_extract)

    v = sub.add_parser("verify", help="check a stream's whole structure")
    v.add_argument("file")
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("convert", help="re-encode a stream's RAM (keeping device state), or "
                       "rewrite it for QEMU 7.2 or 10.0")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--ram-encoding", default="keep",
                   choices=["keep", "page", "zero", "xbzrle", "compress"])
    c.add_argument("--compress-level", type=int, default=1, choices=range(10),
                   metavar="0-9", help="zlib level for --ram-encoding compress (default 1)")
    c.add_argument("--for", dest="target", choices=["7.2", "10.0"], default=None,
                   help="rewrite the stream's conventions so that this QEMU version loads it")
    c.add_argument("--image-format", choices=["raw", "gzip", "bzip2", "xz", "lzop"],
                   help="write a libvirt save image with this body format (an image input "
                        "keeps its own format otherwise)")
    c.add_argument("--xml", metavar="FILE",
                   help="the domain XML when --image-format wraps a plain stream")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("incoming", help="accept one incoming migration (from QEMU or qmigx)")
    i.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, fd:N, exec:CMD or file:PATH")
    i.add_argument("--save", metavar="FILE", help="write the received state as a plain stream")
    i.add_argument("--ram-dir", metavar="DIR", help="write each RAM block as extract names them")
    i.add_argument("--shared-ram", metavar="IDSTR=PATH", action="append", default=[],
                   help="map PATH privately (copy-on-write) as block IDSTR (x-ignore-shared)")
    i.add_argument("--drive", metavar="NAME=PATH", action="append", default=[],
                   help="write block migration's disk NAME into the existing image PATH, "
                        "repeatable")
    i.add_argument("--bitmaps", metavar="OUT.json",
                   help="write the block dirty bitmaps that arrived (dirty-bitmap section)")
    i.add_argument("--bitmap-node", metavar="NODE[=SIZE]", action="append", default=[],
                   help="a block node bitmaps may land on (size in bytes); with any given, "
                        "bitmaps for other nodes are dropped as QEMU drops them")
    i.add_argument("--colo-heartbeat", metavar="SECONDS", type=float,
                   help="COLO secondary (a primary with x-colo): fail over when no checkpoint "
                        "arrives for this long (QEMU has no such timeout)")
    i.add_argument("--recover-uri", metavar="URI",
                   help="postcopy: where to listen for a resuming source after a lost "
                        "connection (default: the URI above)")
    i.add_argument("--touch", metavar="RATE", nargs="?", type=float, const=1000.0, default=0.0,
                   help="postcopy: once the destination runs, read random guest pages at RATE "
                        "per second (default 1000), as a vCPU would; missing ones are requested")
    _settings_args(i)
    i.set_defaults(func=_live("cmd_incoming"))

    s = sub.add_parser("send", help="live-migrate a saved state to a destination")
    s.add_argument("file", help="a stream file (e.g. from qmigx incoming --save)")
    s.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, fd:N, exec:CMD or file:PATH")
    s.add_argument("--shared-ram", metavar="IDSTR=PATH", action="append", default=[],
                   help="back block IDSTR with PATH, shared (x-ignore-shared skips it)")
    s.add_argument("--drive", metavar="NAME=PATH", action="append", default=[],
                   help="migrate the raw image PATH as disk NAME (needs --cap block=on), "
                        "repeatable")
    s.add_argument("--bitmaps", metavar="IN.json",
                   help="block dirty bitmaps to migrate (needs --cap dirty-bitmaps=on)")
    s.add_argument("--start-postcopy", action="store_true",
                   help="switch to postcopy at the first opportunity (needs "
                        "--cap postcopy-ram=on or, for the bitmaps alone, "
                        "--cap dirty-bitmaps=on, on both sides)")
    s.add_argument("--recover-timeout", metavar="SECONDS", type=float, default=60.0,
                   help="postcopy: after a lost connection, retry URI with resume for this "
                        "long (default 60)")
    s.add_argument("-v", "--verbose", action="store_true", help="print the final summary")
    _settings_args(s)
    s.set_defaults(func=_live("cmd_send"))

    pl = sub.add_parser("plot", help="draw a migration report (needs matplotlib)")
    pl.add_argument("report", help="a JSON report written with --report")
    pl.add_argument("--out", required=True, metavar="PNG", help="the picture to write")
    pl.set_defaults(func=cmd_plot)

    from qmigx.cli.serve import add_serve_parser

    add_serve_parser(sub)

    d = sub.add_parser("demo", help="run the main job on built-in defaults")
    d.add_argument("--ram", default="256M", help="guest RAM size (default 256M)")
    d.add_argument("--workdir", default=None, help="where to keep the demo's files")
    d.add_argument("--offline", action="store_true",
                   help="save to a stream file and load it back instead of migrating live")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MigrationError as exc:
        print(f"qmigx: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except OSError as exc:
        print(f"qmigx: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qmigx: error: interrupted", file=sys.stderr)
        return 130
