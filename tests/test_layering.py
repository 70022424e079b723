"""The layering rule guards itself: the pure modules import no framework or transport.

The wire-format modules, the clients' driver and the brokers' core must stay usable anywhere
(a server, a client, a script) without pulling in Flask, requests, httpx, gevent or Redis, so
they are imported in a fresh interpreter and ``sys.modules`` is checked afterwards. Inside the
broker package, imports point one way (``memory`` and ``redis`` import ``base``, ``base``
imports neither): read from the source, since importing any of them runs the package first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the pure core (``stream/__init__.py`` lists it): the standard library and orjson only
PURE = [
    "stream",
    "stream.wire",
    "stream.lines",
    "stream.ndjson",
    "stream.sse",
    "stream.jsonseq",
    "stream.event",
    "stream.errors",
    "stream.formats",
    "stream.encoders",
    "stream.protocol",
    "stream.broker",
    "stream.broker.base",
    "stream.broker.memory",
]
FORBIDDEN = [
    "flask",
    "werkzeug",
    "requests",
    "urllib3",
    "httpx",
    "gevent",
    "redis",
    "gunicorn",
    "prometheus_client",
]


def _imported_in_a_fresh_interpreter(*modules: str) -> list[str]:
    """The forbidden modules in ``sys.modules`` after importing ``modules``."""
    imports = "".join(f"import {name}\n" for name in modules)
    code = f"import sys\n{imports}print(','.join(n for n in {FORBIDDEN!r} if n in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_framework(module: str) -> None:
    assert _imported_in_a_fresh_interpreter(module) == []


@pytest.mark.timeout(60)
def test_all_pure_modules_together_import_no_framework() -> None:
    assert _imported_in_a_fresh_interpreter(*PURE) == []


@pytest.mark.timeout(60)
def test_the_redis_broker_is_what_imports_redis() -> None:
    # The check above would pass vacuously if "redis" were never the name redis-py is
    # imported under: stream.broker.redis (a module named like it) must really load it.
    assert "redis" in _imported_in_a_fresh_interpreter("stream.broker.redis")


def _stream_imports(path: Path) -> set[str]:
    """The ``stream`` modules a source file imports (at any level, lazily or not)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            # ``from stream.broker import redis`` names a module too
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "stream" or name.startswith("stream.")}


BROKER = ROOT / "stream" / "broker"
BROKER_MODULES = {"stream.broker.base", "stream.broker.memory", "stream.broker.redis"}


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        pytest.param("base", set(), id="base-imports-no-broker"),
        pytest.param("memory", {"stream.broker.base"}, id="memory-imports-base-only"),
        pytest.param("redis", {"stream.broker.base"}, id="redis-imports-base-only"),
    ],
)
def test_broker_modules_import_one_way(module: str, allowed: set[str]) -> None:
    imported = _stream_imports(BROKER / f"{module}.py")
    # ``stream.broker`` itself would run __init__, which imports memory: a cycle for base.
    assert "stream.broker" not in imported
    assert imported & BROKER_MODULES <= allowed


def test_the_memory_broker_source_never_mentions_redis_py() -> None:
    tree = ast.parse((BROKER / "memory.py").read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in names if name == "redis" or name.startswith("redis.")}
