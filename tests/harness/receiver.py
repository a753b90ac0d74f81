"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 (a free port) that
records every request, and answers 500 to the first ``fail_first`` of them, 200 after;
or, while ``hang`` is set, takes the connection and never answers."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True)
class Received:
    """One request as the receiver got it, and what it answered (None: nothing)."""

    headers: dict[str, str]
    body: bytes
    status: int | None


@dataclass
class Receiver:
    """A recording HTTP receiver (use it as a context manager)."""

    fail_first: int = 0
    hang: bool = False
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """Where to send."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def accepted(self) -> list[Received]:
        """The requests answered 2xx."""
        with self._lock:
            return [r for r in self.received if r.status is not None and 200 <= r.status < 300]

    def all(self) -> list[Received]:
        """Every request so far."""
        with self._lock:
            return list(self.received)

    def answer(self) -> None:
        """Stop hanging: requests from now on (and those waiting) are answered."""
        self.hang = False
        self._released.set()

    def __enter__(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver.hang:
                    with receiver._lock:
                        receiver.received.append(Received(headers, body, None))
                    receiver._released.wait(120)
                    return  # the connection closes without an answer
                with receiver._lock:
                    failing = len(receiver.received) < receiver.fail_first
                    status = 500 if failing else 200
                    receiver.received.append(Received(headers, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
