"""The README's examples, run against the real service so that they cannot rot.

Every ``python`` block runs in a subprocess with ``localhost:8000`` pointed at a service
started for the test; the Flask block is served through Flask's test client; the shell block
after "Then:" runs command by command.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from tests.service import ROOT, Service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", README, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def client_blocks() -> list[str]:
    return [code for code in PYTHON if "localhost:8000" in code]


def test_readme_has_the_examples() -> None:
    assert len(client_blocks()) >= 3
    assert any("stream_response" in code for code in PYTHON)


@pytest.mark.parametrize("index", range(len(client_blocks())))
def test_python_example_runs(service: Service, index: int, tmp_path: Path) -> None:
    code = client_blocks()[index].replace("http://localhost:8000", service.url)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the example printed nothing"


def test_flask_example_streams() -> None:
    code = next(code for code in PYTHON if "stream_response" in code)
    namespace: dict[str, object] = {
        "__name__": "__main__",
        "expensive_model": lambda: iter(["Hello", ",", " world"]),
    }
    exec(textwrap.dedent(code), namespace)  # noqa: S102 - the README's own example
    app = namespace["app"]
    resp = app.test_client().get("/answer")  # type: ignore[attr-defined]
    assert resp.status_code == 200
    lines = [orjson.loads(line) for line in resp.data.split(b"\n") if line.strip()]
    assert lines == [{"token": "Hello"}, {"token": ","}, {"token": " world"}]


def test_shell_examples_run(service: Service) -> None:
    block = README.split("Then:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    for line in block.strip().splitlines():
        command = line.split("  #", 1)[0].strip().replace("localhost:8000", service.url[7:])
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        proc = subprocess.run(argv, capture_output=True, timeout=30, cwd=ROOT)
        assert proc.returncode == 0, (command, proc.stderr)
        assert b"some data" in proc.stdout, command
