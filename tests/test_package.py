"""Packaging: the compiled backend is what runs, and wheels ship no sources."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import qmigx
from qmigx import _backend

ROOT = Path(__file__).resolve().parent.parent
KERNELS = sorted(p.stem for p in (ROOT / "qmigx" / "_core").glob("*.pyx"))


def test_backend_is_the_compiled_one():
    assert qmigx.backend == "cython"
    for name in KERNELS:
        mod = _backend.load(name)
        assert mod.__name__ == f"qmigx._core.{name}"
        assert mod.__file__.endswith((".so", ".pyd")), mod.__file__


#: Kernels with no twin, and why: userfaultfd's fault handler must run
#: without the GIL (a writer blocked in a fault may hold it), so a Python
#: handler cannot exist; it decodes no input either. gnutls binds a C
#: library (GnuTLS, QEMU's TLS): its only possible twin is that library.
NO_TWIN = {"uffd", "gnutls"}


def test_every_kernel_has_a_python_twin():
    assert KERNELS, "no Cython kernels found"
    for name in sorted(set(KERNELS) - NO_TWIN):
        twin = importlib.import_module(f"qmigx.reference.{name}")
        compiled = _backend.load_compiled(name)
        public = {n for n in dir(compiled) if not n.startswith("_")
                  and getattr(getattr(compiled, n), "__module__", compiled.__name__)
                  in (compiled.__name__, "builtins")
                  and not isinstance(getattr(compiled, n), type(sys))}
        missing = {n for n in public if not hasattr(twin, n)}
        assert not missing, (name, missing)


def test_no_extensions_switch_selects_the_twins():
    code = "import qmigx, qmigx.xbzrle as x; print(qmigx.backend, x._impl.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "QMIGX_NO_EXTENSIONS": "1"}, check=True)
    assert r.stdout.split() == ["python", "qmigx.reference.xbzrle"]


def test_console_script_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "qmigx", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "analyze" in r.stdout


@pytest.mark.slow
def test_wheel_carries_no_cython_or_c_sources(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("qmigx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c", ".h"))]
    assert {f"qmigx/_core/{k}" for k in KERNELS} <= {n.split(".")[0] for n in names}
    assert "qmigx/py.typed" in names


def test_public_api_resolves_every_name():
    for name in qmigx.__all__:
        assert getattr(qmigx, name) is not None, name
    assert issubclass(qmigx.XbzrleError, qmigx.MigrationError)
