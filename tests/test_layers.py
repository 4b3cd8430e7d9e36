"""The package's shape: layers that only import downwards, small modules.

The layers are declared once, in pyproject.toml's ``[tool.importlinter]``
contract, and checked here with import-linter (a static import graph:
function-level imports count too). A negative control proves the check
can fail: a copy of the package whose bottom layer imports the command
line must be refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("importlinter")


def _lint(project: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(project))
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml'))")
    return subprocess.run([sys.executable, "-c", code], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(ROOT / "qmigx", dst / "qmigx",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.html"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_every_layer_imports_only_layers_below_it(tmp_path):
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("low,high", [("wire", "qmigx.cli"), ("stream/parser", "qmigx.migration")])
def test_an_upward_import_is_refused(tmp_path, low, high):
    proj = _copy(tmp_path)
    with open(proj / "qmigx" / f"{low}.py", "a") as f:
        f.write(f"\n\ndef _upward():\n    import {high}  # noqa: F401\n")
    r = _lint(proj)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and high in r.stdout


def test_every_module_has_a_layer():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(ROOT / "pyproject.toml", "rb") as f:
        contract = tomllib.load(f)["tool"]["importlinter"]["contracts"][0]
    declared = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    present = {p.stem for p in (ROOT / "qmigx").glob("*.py")} | {
        p.parent.name for p in (ROOT / "qmigx").glob("*/__init__.py")}
    present -= {"__init__", "__main__"}
    assert present - declared == set(), "modules missing from the layers contract"
    assert declared - present == set(), "layers naming modules that do not exist"


def test_no_module_is_over_800_lines():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "qmigx").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 800}
    assert big == {}
