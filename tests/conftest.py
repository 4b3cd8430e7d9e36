"""Shared test configuration: QEMU markers and gating, and the kernel-backend fixture.

QEMU tests
----------
Every test that starts a real QEMU carries a marker; nothing else gates it:

* ``qemu`` -- needs QEMU 7.2's ``qemu-system-x86_64``: the binary named by
  env ``QMIGX_QEMU``, else ``qemu-system-x86_64`` on ``PATH`` (as
  ``qemu_support.harness.qemu_binary`` finds it). Declare it with
  ``pytestmark = pytest.mark.qemu`` (module) or ``@pytest.mark.qemu``.
* ``qemu10`` -- needs a QEMU 10 ``qemu-system-x86_64``, named by env
  ``QMIGX_QEMU10`` (no ``PATH`` lookup: the 7.2 binary there is not it).

When the binary is absent, :func:`pytest_collection_modifyitems` skips the
marked tests with one reason naming the setting (``-rs`` shows it); test
files do no QEMU gating of their own (no ``skipif``). Tests get the path from the
session fixtures ``qemu_bin`` / ``qemu10_bin`` (or let the harness find
it); both refuse -- the test fails -- when the test lacks the marker, and
so does the harness (``Qemu.start``, ``qemu_binary``) while an unmarked
test runs, so no QEMU test escapes the gate.

Kernel backends
---------------
A test (or fixture) that asks for ``kernel`` runs once per backend of the
kernel named by its ``kernel`` marker, ``@pytest.mark.kernel("xbzrle")``:
the compiled ``qmigx._core.<name>`` (id ``cython``) and its plain-Python
twin ``qmigx.reference.<name>`` (id ``python``). With ``paths=(...)`` the
compiled kernel runs once per SIMD path, pinned with ``_set_simd`` and
restored afterwards (ids ``cython-<path>``). A module may alias it under
its own name: ``@pytest.fixture`` ``def xbz(kernel): return kernel``.
"""

from __future__ import annotations

import os
import sys

import pytest

# tests import helper modules that live beside them (streams.py, qemu_support)
sys.path.insert(0, os.path.dirname(__file__))

from qemu_support import harness  # noqa: E402

from qmigx._backend import load_compiled, load_reference  # noqa: E402

QEMU10_ENV = "QMIGX_QEMU10"


def qemu10_binary() -> str | None:
    """Path of the QEMU 10 ``qemu-system-x86_64`` named by ``QMIGX_QEMU10``, or None."""
    path = os.environ.get(QEMU10_ENV)
    return path if path and os.access(path, os.X_OK) else None


def _qemu_skip_reason() -> str:
    env = os.environ.get("QMIGX_QEMU")
    if env:
        return f"QEMU 7.2 absent: QMIGX_QEMU={env} is not an executable file"
    return (f"QEMU 7.2 absent: no {harness.QEMU_NAME} on PATH "
            f"(install it or set QMIGX_QEMU to its path)")


def _qemu10_skip_reason() -> str:
    env = os.environ.get(QEMU10_ENV)
    if env:
        return f"QEMU 10 absent: {QEMU10_ENV}={env} is not an executable file"
    return f"QEMU 10 absent: set {QEMU10_ENV} to the path of a QEMU 10 qemu-system-x86_64"


#: marker -> (how to find the binary, why its tests are skipped without it, the fixture giving it)
QEMU_MARKERS = {
    "qemu": (harness.qemu_binary, _qemu_skip_reason, "qemu_bin"),
    "qemu10": (qemu10_binary, _qemu10_skip_reason, "qemu10_bin"),
}


def pytest_configure(config: pytest.Config) -> None:
    # "qemu" is also declared in pyproject.toml; declaring it again here is harmless
    config.addinivalue_line("markers", "qemu: starts QEMU 7.2 (QMIGX_QEMU or qemu-system-x86_64 on PATH); "
                                       "skipped when it is absent")
    config.addinivalue_line("markers", "qemu10: starts QEMU 10 (path in env QMIGX_QEMU10); "
                                       "skipped when it is not set")
    config.addinivalue_line("markers", "kernel(name, paths=()): the kernel the `kernel` fixture runs "
                                       "in each backend (compiled per SIMD path, and the Python twin)")


# --- QEMU gating ----------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (find, reason, _) in QEMU_MARKERS.items():
        if find() is not None:
            continue
        skip = pytest.mark.skip(reason=reason())
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


def _qemu_marked(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) is not None for m in QEMU_MARKERS)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (_, _, fixture) in QEMU_MARKERS.items():
        if fixture in item.fixturenames and item.get_closest_marker(marker) is None:
            pytest.fail(f"{item.nodeid} uses the {fixture} fixture but is not marked "
                        f"@pytest.mark.{marker} (see tests/conftest.py)", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    # the harness refuses to start QEMU for a test without a QEMU marker
    harness.unmarked_test = None if _qemu_marked(item) else item.nodeid
    try:
        yield
    finally:
        harness.unmarked_test = None


@pytest.fixture(scope="session")
def qemu_bin() -> str:
    """Path of the QEMU 7.2 binary; only for tests marked ``qemu``."""
    path = harness.qemu_binary()
    if path is None:  # marked tests were skipped already; this is for safety only
        pytest.skip(_qemu_skip_reason())
    return path


@pytest.fixture(scope="session")
def qemu10_bin() -> str:
    """Path of the QEMU 10 binary; only for tests marked ``qemu10``."""
    path = qemu10_binary()
    if path is None:
        pytest.skip(_qemu10_skip_reason())
    return path


# --- kernel backends ------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kernel" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("kernel")
    if marker is None or len(marker.args) != 1:
        pytest.fail(f"{metafunc.definition.nodeid} asks for the `kernel` fixture but has no "
                    f'@pytest.mark.kernel("<name>") (see tests/conftest.py)', pytrace=False)
    name = marker.args[0]
    paths = tuple(marker.kwargs.get("paths", ()))
    params = [pytest.param((name, p), id=f"cython-{p}") for p in paths] or [
        pytest.param((name, None), id="cython")]
    params.append(pytest.param((name, "python"), id="python"))
    metafunc.parametrize("kernel", params, indirect=True)


def _simd_path(compiled) -> str:
    probe = getattr(compiled, "_simd_path", None)
    return probe() if probe is not None else compiled.simd


@pytest.fixture
def kernel(request):
    """One backend of the kernel named by the test's ``kernel`` marker (see the module docstring)."""
    name, variant = request.param
    if variant == "python":
        yield load_reference(name)
        return
    compiled = load_compiled(name)
    if variant is None:
        yield compiled
        return
    previous = compiled._set_simd(variant)
    try:
        assert _simd_path(compiled) == variant
        yield compiled
    finally:
        compiled._set_simd(previous)
