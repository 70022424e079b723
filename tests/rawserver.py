"""A tiny scripted HTTP/1.1 server on raw sockets, for client tests of exact bytes and timing.

Each accepted connection plays the next ``Script`` of the list it was given: a status line and
headers, then body pieces sent exactly as written (as one chunk each when ``framing="chunked"``),
with pauses between them: ``Sleep(seconds)``, ``Wait(threading.Event)`` (until the test sets it),
``Hold()`` (until the client closes the connection). The body ends per its framing (the terminal
chunk, the connection's close, or nothing more after ``Content-Length``), or is cut: ``Close()``
closes gracefully where it stands (FIN, no terminal chunk), ``Cut()`` resets the connection (RST).

The server records every request (method, target, headers with lower-case names, body), so
tests can check ``Last-Event-ID`` on a reconnection. Every connection is served in its own
thread and answered with ``Connection: close``, so each request takes exactly one script.

    with RawServer([Script([b'{"a":1}\\n'])]) as server:
        values = list(Client(server.url).stream("/events"))
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON_SEQ = "application/json-seq"

#: how long any wait inside the server lasts at most (tests time out well before)
MAX_WAIT = 20.0


@dataclass(frozen=True)
class Sleep:
    """Pause the body for ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Wait:
    """Pause the body until the test sets ``event`` (at most ``MAX_WAIT`` seconds)."""

    event: threading.Event


@dataclass(frozen=True)
class Hold:
    """Send nothing more until the client closes the connection (records ``client_closed``)."""


@dataclass(frozen=True)
class Close:
    """Close the connection gracefully here, without ending the body (a cut for chunked bodies)."""


@dataclass(frozen=True)
class Cut:
    """Reset the connection here (RST): the client sees ``ECONNRESET``."""


Piece = bytes | Sleep | Wait | Hold | Close | Cut
Framing = Literal["chunked", "close", "length"]


@dataclass
class Script:
    """One response: ``body`` pieces in order, framed per ``framing``."""

    body: Sequence[Piece] = ()
    status: int = 200
    content_type: str | None = NDJSON
    framing: Framing = "chunked"
    headers: Sequence[tuple[str, str]] = ()
    #: overrides the computed ``Content-Length`` (say more than is sent, to cut a length body)
    content_length: int | None = None
    #: send the status line and headers one byte per this many seconds (a slow or hostile server)
    trickle_headers: float | None = None


@dataclass
class Request:
    """One request as the server received it."""

    method: str
    target: str
    headers: dict[str, str]
    raw_headers: bytes
    body: bytes = b""


@dataclass
class _Connection:
    script: Script
    request: Request | None = None
    client_closed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    302: "Found",
    307: "Temporary Redirect",
    400: "Bad Request",
    404: "Not Found",
    500: "Error",
}


class RawServer:
    """Serve ``scripts`` in order, one per connection, on 127.0.0.1 and a free port."""

    def __init__(self, scripts: Iterable[Script]) -> None:
        self.scripts = list(scripts)
        self.requests: list[Request] = []
        self.connections: list[_Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._accepter = threading.Thread(target=self._accept, name="rawserver", daemon=True)

    def __enter__(self) -> RawServer:
        self._accepter.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting and wait (bounded) for the connection threads."""
        self._stopping = True
        self._accepter.join(MAX_WAIT)
        self._listener.close()
        for thread in self._threads:
            thread.join(MAX_WAIT)

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[Request]:
        """Wait until ``count`` requests arrived (bounded poll) and return them."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} requests, wanted {count}")
            time.sleep(0.005)
        return self.requests

    # -- serving ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        # A short accept timeout, because closing a listener does not wake a blocked accept().
        self._listener.settimeout(0.05)
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                index = len(self.connections)
                script = self.scripts[index] if index < len(self.scripts) else None
                if script is None:
                    # Out of script: refuse by closing at once (the client sees a failed attempt).
                    sock.close()
                    continue
                conn = _Connection(script)
                self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: _Connection) -> None:
        try:
            with sock:
                sock.settimeout(MAX_WAIT)
                request = _read_request(sock)
                if request is None:
                    return
                conn.request = request
                self.requests.append(request)
                if self._respond(sock, conn):
                    sock.shutdown(socket.SHUT_WR)
                    _drain(sock)
        except OSError:
            pass
        finally:
            conn.done.set()

    def _respond(self, sock: socket.socket, conn: _Connection) -> bool:
        """Play the script; False when the connection was already closed or cut."""
        script = conn.script
        framing = script.framing
        lines = [f"HTTP/1.1 {script.status} {_REASONS.get(script.status, 'Status')}"]
        if script.content_type is not None:
            lines.append(f"Content-Type: {script.content_type}")
        lines.extend(f"{name}: {value}" for name, value in script.headers)
        if framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        elif framing == "length" and script.status != 204:
            length = script.content_length
            if length is None:
                length = sum(len(p) for p in script.body if isinstance(p, bytes))
            lines.append(f"Content-Length: {length}")
        lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if script.trickle_headers is None:
            sock.sendall(head)
        else:
            for index in range(len(head)):
                sock.sendall(head[index : index + 1])
                time.sleep(script.trickle_headers)
        for piece in script.body:
            if isinstance(piece, bytes):
                if framing == "chunked":
                    if piece:  # an empty chunk would end the body
                        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    sock.sendall(piece)
            elif isinstance(piece, Sleep):
                time.sleep(piece.seconds)
            elif isinstance(piece, Wait):
                piece.event.wait(MAX_WAIT)
            elif isinstance(piece, Hold):
                _drain(sock)
                conn.client_closed.set()
                return False
            elif isinstance(piece, Close):
                return True
            elif isinstance(piece, Cut):
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return False
        if framing == "chunked":
            sock.sendall(b"0\r\n\r\n")
        return True


def _read_request(sock: socket.socket) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return None
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.split(b"\r\n")
    method, target, _ = request_line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return Request(method, target, headers, head, rest[:length])


def _drain(sock: socket.socket) -> None:
    """Read until the client closes its side (or the bounded wait ends)."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
