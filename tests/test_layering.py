"""The layering rule guards itself: the pure modules import no framework or transport.

The wire-format modules must stay usable anywhere (a server, a client, a script) without
pulling in Flask, requests, httpx, gevent or Redis, so they are imported in a fresh interpreter
and ``sys.modules`` is checked afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PURE = [
    "stream.lines",
    "stream.ndjson",
    "stream.sse",
    "stream.jsonseq",
    "stream.event",
    "stream.errors",
]
#: pure too, once they exist (written by others, at their own pace)
PURE_IF_PRESENT = ["stream.formats", "stream.encoders"]
FORBIDDEN = ["flask", "werkzeug", "requests", "urllib3", "httpx", "gevent", "redis", "gunicorn"]


def _pure_modules() -> list[str]:
    present = [
        name for name in PURE_IF_PRESENT if (ROOT / (name.replace(".", "/") + ".py")).exists()
    ]
    return PURE + present


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", _pure_modules())
def test_pure_module_imports_no_framework(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"bad = sorted(n for n in {FORBIDDEN!r} if n in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"


@pytest.mark.timeout(60)
def test_all_pure_modules_together_import_no_framework() -> None:
    imports = "".join(f"import {name}\n" for name in _pure_modules())
    code = (
        f"import sys\n{imports}"
        f"print(','.join(sorted(n for n in {FORBIDDEN!r} if n in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
