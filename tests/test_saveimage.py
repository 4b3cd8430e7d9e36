"""libvirt save images around real QEMU 7.2 streams: read by every tool, written back.

Images are built as libvirt 9.0 builds them (qemu_support.libvirt_image:
its header, XML, cookie and padding, the body piped through the real
gzip/bzip2/xz/lzop programs). ``analyze``, ``extract``, ``verify`` and
``convert`` must read them as they read the bare stream, ``convert`` must
write an image libvirt's layout accepts whose body a QEMU 7.2 loads, and
bad headers and cut bodies must fail with libvirt's texts and a typed error.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qmigx.errors import SaveImageError, TruncatedStreamError
from qmigx.tools.saveimage import open_body, read_save_image_header
from qmigx.tools.streams import verify_stream

from qemu_support import streams
from qemu_support.harness import load_stream
from qemu_support.libvirt_image import (COOKIE, DOMAIN_XML, FORMATS, PROGRAM_ARGS, body_offset,
                                        header, make_image, program_available)

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


vectorTOR = REPO / "tests" / "data" / "qemu72-pc-paused.mig.gz"


@pytest.fixture(scope="module")
def info():
    """A real QEMU 7.2 stream whose source RAM is known, for the restore test."""
    return streams.get_stream("pc-paused")


@pytest.fixture(scope="module")
def vector(tmp_path_factory) -> Path:
    """The stored QEMU 7.2 stream (small: the format matrix runs every tool on it)."""
    import gzip

    path = tmp_path_factory.mktemp("vector") / "qemu72-pc-paused.mig"
    path.write_bytes(gzip.decompress(vectorTOR.read_bytes()))
    return path


def qmigx(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qmigx", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def fmt_param(fmt):
    return pytest.param(fmt, marks=pytest.mark.skipif(not program_available(fmt),
                                                      reason=f"no {fmt} program"))


ALL = [fmt_param(f) for f in FORMATS]


def decompress_body(image: Path, fmt: str, out: Path, *, xml=DOMAIN_XML, cookie=COOKIE) -> Path:
    """The body of ``image`` with the real program (as libvirt restores it)."""
    with open(image, "rb") as f, open(out, "wb") as o:
        f.seek(body_offset(xml, cookie))
        if fmt == "raw":
            shutil.copyfileobj(f, o)
        else:
            args = ["-dc"] + (["--ignore-warn"] if fmt == "lzop" else [])
            subprocess.run([shutil.which(fmt), *args], stdin=f, stdout=o, check=True)
    return out


@pytest.mark.parametrize("fmt", ALL)
def test_every_tool_reads_an_image_as_its_stream(vector, tmp_path, fmt):
    img = make_image(vector, tmp_path / f"vm.{fmt}.save", fmt)
    r = ok(qmigx("verify", img))
    assert f"{fmt} body" in r.stdout and "OK:" in r.stdout
    state = json.loads(ok(qmigx("analyze", "-f", img)).stdout)
    head = state.pop("libvirt save image")
    assert head["xml"] == DOMAIN_XML and head["cookie"] == COOKIE and head["format"] == fmt
    assert head["version"] == 2 and head["was_running"] == 1
    assert state == json.loads(ok(qmigx("analyze", "-f", vector)).stdout)
    assert json.loads(ok(qmigx("analyze", "-f", img, "-d", "desc")).stdout) == \
        streams.vmdesc(vector.read_bytes())
    ok(qmigx("extract", img, tmp_path / "from-image"))
    ok(qmigx("extract", vector, tmp_path / "from-stream"))
    for name in os.listdir(tmp_path / "from-stream"):
        assert (tmp_path / "from-image" / name).read_bytes() == \
            (tmp_path / "from-stream" / name).read_bytes(), name


@pytest.mark.parametrize("fmt", ALL)
def test_convert_writes_the_image_back(vector, tmp_path, fmt):
    img = make_image(vector, tmp_path / "in.save", fmt, was_running=False)
    out = tmp_path / "out.save"
    ok(qmigx("convert", img, out))
    with open(img, "rb") as a, open(out, "rb") as b:
        ha, hb = read_save_image_header(a), read_save_image_header(b)
    assert (hb.xml, hb.cookie, hb.compressed, hb.was_running, hb.data_len) == \
        (ha.xml, ha.cookie, ha.compressed, 0, ha.data_len)
    assert out.read_bytes()[:body_offset()] == img.read_bytes()[:body_offset()]
    body = decompress_body(out, fmt, tmp_path / "body.mig")
    assert body.read_bytes() == vector.read_bytes()  # keep: the same stream


def test_a_converted_image_restores_in_qemu(info, tmp_path):
    """gzip image in, xz image out with every page re-encoded; QEMU loads its body."""
    if not (program_available("gzip") and program_available("xz")):
        pytest.skip("needs gzip and xz")
    img = make_image(Path(info.stream), tmp_path / "in.save", "gzip")
    out = tmp_path / "out.save"
    ok(qmigx("convert", img, out, "--image-format", "xz", "--ram-encoding", "page"))
    with open(out, "rb") as f:
        assert read_save_image_header(f).format == "xz"
    body = decompress_body(out, "xz", tmp_path / "body.mig")
    assert body.read_bytes() != Path(info.stream).read_bytes()
    assert load_stream(body, like=info) == Path(info.mem).read_bytes()


def test_a_plain_stream_is_wrapped_with_its_xml(vector, tmp_path):
    xml = tmp_path / "domain.xml"
    xml.write_text(DOMAIN_XML)
    out = tmp_path / "wrapped.save"
    ok(qmigx("convert", vector, out, "--image-format", "bzip2", "--xml", xml))
    with open(out, "rb") as f:
        h = read_save_image_header(f)
    assert h.xml == DOMAIN_XML and h.cookie is None and h.format == "bzip2"
    assert h.data_len == len(DOMAIN_XML) + 1 + 64 * 1024
    assert decompress_body(out, "bzip2", tmp_path / "b.mig", cookie=None).read_bytes() == \
        vector.read_bytes()


def test_extract_elf_reads_an_image(vector, tmp_path):
    img = make_image(vector, tmp_path / "vm.save", "gzip")
    ok(qmigx("extract", vector, "--elf", tmp_path / "plain.elf"))
    ok(qmigx("extract", img, "--elf", tmp_path / "image.elf"))
    assert (tmp_path / "plain.elf").read_bytes() == (tmp_path / "image.elf").read_bytes()


def _rewrite(img: Path, out: Path, at: int, data: bytes) -> Path:
    raw = bytearray(img.read_bytes())
    raw[at : at + len(data)] = data
    out.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize("what, change, message", [
    ("magic", lambda raw: b"LibvirtQemuXSave" + raw[16:], "image magic is incorrect"),
    ("partial", lambda raw: b"LibvirtQemudPart" + raw[16:], "save image is incomplete"),
    ("short", lambda raw: raw[:60], "failed to read qemu header"),
    # libvirt byte-swaps a version above 2 before giving up, and reports the swapped value
    ("version", lambda raw: raw[:16] + struct.pack("<I", 3) + raw[20:],
     "image version is not supported (50331648 > 2)"),
    ("format", lambda raw: raw[:28] + struct.pack("<I", 5) + raw[32:],
     "Invalid compressed save format 5"),
    ("data_len", lambda raw: raw[:20] + struct.pack("<I", 0) + raw[24:],
     "invalid header data length: 0"),
    ("xml", lambda raw: raw[: body_offset() - 100], "failed to read domain XML"),
])
def test_bad_headers_are_refused_with_libvirts_words(vector, tmp_path, what, change, message):
    img = make_image(vector, tmp_path / "vm.save", "raw")
    bad = tmp_path / f"bad-{what}.save"
    bad.write_bytes(change(img.read_bytes()))
    if what == "magic":
        r = qmigx("verify", bad)  # not an image at all: read as a stream, which it is not
        assert r.returncode == 1 and "Not a migration stream" in r.stderr
        with open(bad, "rb") as f, pytest.raises(SaveImageError, match=message):
            read_save_image_header(f)
        return
    r = qmigx("verify", bad)
    assert r.returncode == 1
    assert r.stderr.startswith("qmigx: error: ") and message in r.stderr
    with pytest.raises(SaveImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_body(bad)


def test_a_byte_swapped_header_is_read(vector, tmp_path):
    img = make_image(vector, tmp_path / "vm.save", "raw")
    raw = bytearray(img.read_bytes())
    fields = struct.unpack_from("<5I", raw, 16)
    struct.pack_into(">5I", raw, 16, *fields)
    swapped = tmp_path / "be.save"
    swapped.write_bytes(bytes(raw))
    with open(swapped, "rb") as f:
        h = read_save_image_header(f)
    assert h.byteorder == ">" and h.xml == DOMAIN_XML and h.cookie == COOKIE
    with open_body(swapped) as body:
        assert verify_stream(body)["vmdesc"]


@pytest.mark.parametrize("fmt", ALL)
def test_a_cut_body_is_refused(vector, tmp_path, fmt):
    img = make_image(vector, tmp_path / "vm.save", fmt)
    size = img.stat().st_size
    cut = tmp_path / "cut.save"
    cut.write_bytes(img.read_bytes()[: body_offset() + (size - body_offset()) * 2 // 3])
    r = qmigx("verify", cut)
    assert r.returncode == 1 and r.stderr.startswith("qmigx: error: ")
    if fmt == "raw":
        with pytest.raises(TruncatedStreamError), open_body(cut) as body:
            verify_stream(body)
    else:
        assert fmt in r.stderr and "cut" in r.stderr
        with pytest.raises(SaveImageError) as exc, open_body(cut) as body:
            verify_stream(body)
        assert exc.value.field == "body"


def test_header_fields_are_where_libvirt_puts_them():
    raw = header("xz", "<domain/>", None, False, partial=False, data_len=100)
    assert raw[:16] == b"LibvirtQemudSave" and len(raw) == 92 + 100
    assert struct.unpack_from("<5I", raw, 16) == (2, 100, 0, 3, 0)
    assert PROGRAM_ARGS["xz"] == ["-c", "-3"]
