"""The router's HTTP server: uvicorn, with read timeouts, bounded headers and the API's
error shape at the connection level.

uvicorn bounds how long an idle kept-alive connection stays open (``timeout_keep_alive``)
but not how long a client may take to send a request, and its httptools parser keeps
every header byte it is sent. ``guarded_protocol`` is uvicorn's httptools protocol with:

* a header timeout: a request's line and headers must be complete within
  ``header_timeout_s`` of its first byte (of the connection, for its first request);
* a body timeout: its body must be complete within ``body_timeout_s`` of the end of its
  headers — a body shorter than its ``Content-Length`` included;
* at most ``MAX_HEADER_BYTES`` of request line and headers (431 beyond).

A request that runs out of time gets a 408 when no response to it has started, and its
connection is closed either way (a connection that never sent a byte is just closed).
Time is not counted while the server itself has stopped reading the connection (a
pipelined request waiting for the one before it). Malformed HTTP gets uvicorn's 400, and
every answer given here is JSON in the API's error shape (``openai_api.error_body``).
Other connections are not affected by any of this.
"""

from __future__ import annotations

import json

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvmesh.router.openai_api import error_body
from kvmesh.router.settings import RouterSettings

MAX_HEADER_BYTES = 64 * 1024

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the module's timeouts and header bound; the
    timeouts are class attributes, set by ``guarded_protocol``."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = None
        self._header_bytes = 0
        self._arm(self.header_timeout_s, "headers", begun=False)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm(self.header_timeout_s, "headers", begun=True)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s, "body", begun=True)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(400, "malformed HTTP request")

    # -------------------------------------------------------------- timers

    def _arm(self, seconds: float, what: str, begun: bool) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out, seconds, what, begun)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, seconds: float, what: str, begun: bool) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server is not reading: the client is not late
            self._arm(seconds, what, begun)
            return
        self.logger.info("closing a connection that did not send a request's %s within %g s",
                         what, seconds)
        answered = what == "body" and self.cycle is not None and self.cycle.response_started
        if not begun or answered:
            self.transport.close()
        else:
            self._answer_and_close(408, f"the request's {what} did not arrive within {seconds:g} s")

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._answer_and_close(431, f"request line and headers longer than {MAX_HEADER_BYTES} bytes")

    def _answer_and_close(self, status: int, message: str) -> None:
        """Write a whole JSON error response and close the connection; the request (if
        its app runs) sees a disconnect and anything it sends is dropped. With another
        response under way on the connection (pipelining) it is only closed."""
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True
            cycle.message_event.set()
        body = json.dumps(error_body(message, status)).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def guarded_protocol(header_timeout_s: float, body_timeout_s: float) -> type[GuardedHttpProtocol]:
    """``GuardedHttpProtocol`` with these timeouts, for ``uvicorn.Config(http=...)``."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})


def http_server(app, settings: RouterSettings) -> uvicorn.Server:
    """A uvicorn server of ``app`` on ``settings.host:settings.port`` (port 0: a free one)
    with the settings' header and body timeouts."""
    return uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", ws="none",
        http=guarded_protocol(settings.header_timeout, settings.body_timeout)))
