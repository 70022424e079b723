"""``python -m stream URL`` in a subprocess against the scripted raw server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream.__main__ import build_parser, main
from tests.rawserver import SSE, Hold, RawServer, Script, Wait

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stream", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, str]:
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out, err.decode()


def line(data: Any) -> bytes:
    return orjson.dumps(data) + b"\n"


def test_lines_are_printed_as_they_arrive() -> None:
    go = threading.Event()
    body = [line({"n": 1}), Wait(go), line({"n": 2})]
    with RawServer([Script(body)]) as server:
        proc = cli(server.url + "/events")
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b'{"n":1}\n'  # before the server sends the second
            go.set()
            code, out, err = finish(proc)
        finally:
            go.set()
            proc.kill()
    assert (code, out) == (0, b'{"n":2}\n')
    assert "HTTP 200" in err


def test_envelopes_print_their_data_and_the_end_marker_ends() -> None:
    body = [
        b'{"id": "1", "event": "message", "data": {"a": [1, 2]}}\n',
        b'{"id": "2", "event": "end", "data": null}\n',
    ]
    with RawServer([Script(body)]) as server:
        code, out, _ = finish(cli(server.url, "--quiet"))
    assert (code, out) == (0, b'{"a":[1,2]}\n')


def test_max_stops_after_n_events() -> None:
    body = [line(1), line(2), line(3), Hold()]
    with RawServer([Script(body)]) as server:
        code, out, _ = finish(cli(server.url, "--max", "2"))
        assert server.connections[0].client_closed.wait(5)
    assert (code, out) == (0, b"1\n2\n")


def test_raw_writes_the_body_bytes() -> None:
    body = [b": hello\n\n", b'id: 1\ndata: {"a": 1}\n\n', b"event: end\ndata: null\n\n"]
    with RawServer([Script(body, content_type=SSE)]) as server:
        code, out, _ = finish(cli(server.url, "--raw", "--format", "sse"))
        assert server.requests[0].headers["accept"] == SSE
    assert (code, out) == (0, b"".join(body))


def test_headers_and_last_event_id_are_sent() -> None:
    with RawServer([Script([line(1)], framing="close")]) as server:
        code, _, _ = finish(
            cli(server.url, "-H", "X-Token: abc", "--last-event-id", "5-0", "--no-reconnect")
        )
        request = server.requests[0]
    assert code == 0
    assert (request.headers["x-token"], request.headers["last-event-id"]) == ("abc", "5-0")


@pytest.mark.parametrize(
    ("script", "code", "message"),
    [
        pytest.param(
            Script(
                [b'{"error": {"code": "not_found", "message": "no such job"}}'],
                status=404,
                content_type="application/json",
                framing="length",
            ),
            3,
            "not_found: no such job",
            id="http-error",
        ),
        pytest.param(
            Script([line(1), b'{"error": {"code": "boom", "message": "it broke"}}\n']),
            4,
            "boom: it broke",
            id="server-error-event",
        ),
        pytest.param(Script([line(1), b"{oops\n"]), 6, "line 2", id="decode-error"),
        pytest.param(
            Script([b"<html>"], content_type="text/html"), 7, "text/html", id="media-type"
        ),
    ],
)
def test_exit_codes(script: Script, code: int, message: str) -> None:
    with RawServer([script]) as server:
        got, _, err = finish(cli(server.url))
    assert got == code
    assert message in err


def test_exit_code_for_a_timeout() -> None:
    never = threading.Event()
    with RawServer([Script([line(1), Wait(never)])]) as server:
        try:
            code, out, err = finish(cli(server.url, "--timeout", "0.3"))
        finally:
            never.set()
    assert (code, out) == (5, b"1\n")
    assert "timed out" in err or "no data" in err


def test_exit_code_when_the_connection_fails() -> None:
    with RawServer([]) as server:
        url = server.url
    code, _, err = finish(cli(url))
    assert code == 8
    assert "connection" in err
    # One line that says where, not the name of the client's connection class.
    assert err.count("\n") == 1
    assert url.removeprefix("http://").rstrip("/") in err
    assert "_HeadersDeadline" not in err


def test_a_connect_timeout_names_host_and_port_not_a_connection_object() -> None:
    # urllib3 puts its connection object in a connect timeout's args; no loopback address
    # makes a connect time out, so the error is built as requests raises it.
    import requests
    import urllib3.exceptions

    from stream.client import _HeadersDeadline, _translate

    conn = _HeadersDeadline("127.0.0.1", 9)
    cause = urllib3.exceptions.ConnectTimeoutError(conn, "Connection to 127.0.0.1 timed out.")
    retry = urllib3.exceptions.MaxRetryError(None, "/events", cause)  # type: ignore[arg-type]
    error = _translate(requests.ConnectTimeout(retry))
    assert str(error) == "timed out: 127.0.0.1:9: Connection to 127.0.0.1 timed out."


def test_the_script_is_named_as_it_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/home/me/.local/bin/stream"])
    assert build_parser().prog == "stream"
    monkeypatch.setattr(sys, "argv", ["/src/stream/__main__.py"])
    assert build_parser().prog == "python -m stream"


def test_without_the_client_extra_one_line_names_it() -> None:
    # requests made unimportable, as in an install without the client extra
    code = (
        "import sys; sys.modules['requests'] = None\n"
        "from stream.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", code, "http://127.0.0.1:1/"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert "pip install 'flask-json-stream[client]'" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["ftp://example.com/f"], "only http:// and https://", id="ftp-url"),
        pytest.param(["file:///etc/passwd"], "only http:// and https://", id="file-url"),
        pytest.param(["http:///events"], "no host", id="no-host"),
        pytest.param(["http://127.0.0.1:99999/"], "not a valid URL", id="bad-port"),
        pytest.param(["http://x", "--max", "-1"], "--max: expected a whole number", id="max-neg"),
        pytest.param(["http://x", "--max", "abc"], "--max: expected a whole number", id="max-abc"),
        pytest.param(["http://x", "--max", "1.5"], "--max: expected a whole number", id="max-1.5"),
        pytest.param(["http://x", "--timeout", "soon"], "--timeout: expected", id="timeout-abc"),
        pytest.param(["http://x", "--timeout", "inf"], "--timeout: expected", id="timeout-inf"),
        pytest.param([], "required: URL", id="no-url"),
    ],
)
def test_a_bad_command_line_is_one_clear_line(argv: list[str], says: str) -> None:
    code, out, err = finish(cli(*argv))
    assert (code, out) == (2, b"")
    assert err.startswith("python -m stream: error: ")
    assert err.count("\n") == 1, err  # no usage block, no traceback
    assert says in err
    for internal in ("Traceback", "_positive", "_seconds", "_http_url", "ValueError"):
        assert internal not in err


def test_ctrl_c_exits_quietly_with_130() -> None:
    with RawServer([Script([line(1), Hold()])]) as server:
        proc = cli(server.url, "--quiet")
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"1\n"
            proc.send_signal(signal.SIGINT)
            code, _, err = finish(proc)
        finally:
            proc.kill()
    assert code == 130
    assert err == ""


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for code in ("0", "3", "4", "5", "6", "7", "8", "130"):
        assert f"\n  {code} " in out


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["http://x", "--header", "no colon"], id="bad-header"),
        pytest.param(["http://x", "--max", "0"], id="max-zero"),
        pytest.param(["http://x", "--format", "xml"], id="bad-format"),
        pytest.param(["ftp://x/y"], id="ftp-url"),
        pytest.param(["http://x", "--max", "nope"], id="max-not-a-number"),
    ],
)
def test_bad_command_line_is_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_main_in_process(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with RawServer([Script([line({"a": 1}), line([2])])]) as server:
        assert main([server.url, "--quiet"]) == 0
    assert capsysbinary.readouterr().out == b'{"a":1}\n[2]\n'


def test_terminal_output_is_readable(
    monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    body = [
        b'{"id": "1", "event": "message", "data": {"a": 1}}\n',
        b'{"id": "2", "event": "reset", "data": null}\n',
        b'{"id": "3", "event": "end", "data": null}\n',
    ]
    with RawServer([Script(body)]) as server:
        assert main([server.url.removeprefix("http://")]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == (
        b'\x1b[2m1\x1b[0m \x1b[36mmessage\x1b[0m {"a":1}\n'
        b"\x1b[2m2\x1b[0m \x1b[33mreset\x1b[0m null\n"
    )
    assert b"events: 1" in captured.err  # the live count, erased at the end
    assert captured.err.endswith(b"\r\x1b[K")


def test_terminal_output_without_colour(
    monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("NO_COLOR", "1")
    with RawServer([Script([line(5)])]) as server:
        assert main([server.url, "-q"]) == 0
    assert capsysbinary.readouterr().out == b"message 5\n"


def test_reconnections_and_resets_are_reported(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    first = Script([b'{"id": "1", "event": "message", "data": 1}\n'], framing="close")
    second = Script(
        [
            b'{"id": "2", "event": "reset", "data": null}\n',
            b'{"id": "3", "event": "message", "data": 3}\n',
            b'{"id": "4", "event": "end", "data": null}\n',
        ]
    )
    with RawServer([first, second]) as server:
        assert main([server.url]) == 0
        assert server.requests[1].headers["last-event-id"] == "1"
    captured = capsysbinary.readouterr()
    assert captured.out == b"1\n3\n"
    err = captured.err.decode()
    assert "resuming after '1'" in err
    assert "reset" in err


def test_finite_sse_stream_with_ids_ends(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    # sse-starlette's finite stream: ids, a normal end; a resume would replay it from the start.
    body = b"".join(b"id: %d\ndata: %d\n\n" % (i, i) for i in range(3))
    replay = Script([body], content_type=SSE)
    with RawServer([replay, replay]) as server:
        assert main([server.url]) == 0
        assert len(server.requests) == 1
    assert capsysbinary.readouterr().out == b"0\n1\n2\n"


def test_openai_style_done_ends(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    body = [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n", Hold()]
    with RawServer([Script(body, content_type=SSE)]) as server:
        assert main([server.url]) == 0
    assert capsysbinary.readouterr().out == b'{"n":1}\n'
