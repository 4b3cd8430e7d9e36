"""Children qmigx starts import the package that started them, never the cwd's.

``qmigx demo`` run from a source checkout once started its destination as
``python -m qmigx``, which imported the checkout (no compiled extensions)
instead of the installed package. These tests run the helper's command
lines from a directory holding a decoy ``qmigx`` package that fails on
import, the situation of a checkout's root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qmigx
from qmigx._child import python_command, qmigx_command

DECOY = "raise SystemExit('imported the decoy qmigx from the working directory')\n"


@pytest.fixture
def decoy_cwd(tmp_path: Path) -> Path:
    """A directory whose ``qmigx`` package cannot be imported."""
    (tmp_path / "qmigx").mkdir()
    (tmp_path / "qmigx" / "__init__.py").write_text(DECOY)
    (tmp_path / "qmigx" / "__main__.py").write_text(DECOY)
    return tmp_path


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_plain_python_m_would_import_the_decoy(decoy_cwd):
    """The decoy is effective: without the helper the child imports it."""
    r = run([sys.executable, "-m", "qmigx", "--help"], decoy_cwd)
    assert r.returncode != 0 and "decoy" in r.stderr


def test_code_child_imports_this_qmigx(decoy_cwd):
    r = run(python_command("import qmigx, sys; print(qmigx.__file__); print(sys.argv[1:])")
            + ["a", "b"], decoy_cwd)
    assert r.returncode == 0, r.stderr
    path, args = r.stdout.splitlines()
    assert Path(path).resolve() == Path(qmigx.__file__).resolve()
    assert args == "['a', 'b']"


def test_module_child_runs_this_qmigx_cli(decoy_cwd):
    r = run(qmigx_command() + ["--help"], decoy_cwd)
    assert r.returncode == 0, r.stderr
    assert "decoy" not in r.stderr and "analyze" in r.stdout and "demo" in r.stdout


def test_module_child_reports_cli_errors_like_python_m(decoy_cwd):
    """Exit status and stderr pass through as with ``python -m qmigx``."""
    r = run(qmigx_command() + ["demo", "--ram", "12345"], decoy_cwd)
    assert r.returncode == 1
    assert r.stderr.startswith("qmigx: error: size must be a positive multiple of 4 KiB")


def test_child_keeps_the_rest_of_sys_path_under_safe_path(decoy_cwd):
    """With PYTHONSAFEPATH there is no cwd entry: nothing else is dropped."""
    show = "import json, sys; print(json.dumps(sys.path))"
    plain = run([sys.executable, "-c", show], decoy_cwd, PYTHONSAFEPATH="1")
    child = run(python_command("import qmigx; " + show), decoy_cwd, PYTHONSAFEPATH="1")
    assert plain.returncode == 0 and child.returncode == 0, child.stderr
    assert set(json.loads(plain.stdout)) <= set(json.loads(child.stdout))


def test_library_spawns_qmigx_only_through_the_helper():
    """No module of the package builds its own ``python -m qmigx`` command line."""
    root = Path(qmigx.__file__).resolve().parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "_child.py":
            continue
        text = path.read_text()
        if any(p in text for p in ('"-m", "qmigx', "'-m', 'qmigx", 'sys.executable, "-c"')):
            offenders.append(str(path.relative_to(root)))
    assert not offenders
