"""uvicorn's httptools protocol with a cap on the request head.

uvicorn's fast HTTP parser (httptools, llhttp in C) has no limit on the size of a request line and headers, so a
client could make the server hold an unbounded head; its pure-Python parser (h11) has one, but costs several times
the CPU per request (measured: ``benchmarks/bench_http_path.py``, results/http-path-cpu.md). This protocol keeps
httptools and counts the bytes received while a head is incomplete: past ``max_head_bytes`` the client gets 431
and the connection is closed, so the server holds at most the cap plus one read.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that answers 431 and closes when a request head exceeds ``max_head_bytes``."""

    max_head_bytes = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request head
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # what follows on this connection is the next request's head

    def _refuse_head(self) -> None:
        message = f"request head larger than max_header_bytes={self.max_head_bytes}".encode()
        self.transport.write(b"".join([STATUS_LINE[431], b"content-type: text/plain; charset=utf-8\r\n",
                                       b"content-length: ", str(len(message)).encode(), b"\r\n",
                                       b"connection: close\r\n\r\n", message]))
        self.transport.close()


def bounded_httptools_protocol(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=`` setting, capping request heads at ``max_head_bytes``."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})
