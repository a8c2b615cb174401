"""Running the app with uvicorn, hardened: a deadline for each request's headers, and a graceful
shutdown on SIGTERM/Ctrl-C that ends running streams properly.

    server = make_server(app, http_timeout=30, log_level="info", shutdown_timeout=10)
    server.run(sockets=[sock])

uvicorn closes idle keep-alive connections, but a connection that trickles its request line and
headers one byte at a time (slowloris) is held for ever, so enough of them exhaust the process's
sockets. Here each connection must deliver a request's headers within `http_timeout` of opening
(or of the previous response), else it is closed; the body then has the app's body_timeout.
"""
from __future__ import annotations

import asyncio
import functools
import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("opencamp.server")


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive within
    `http_timeout` seconds of the connection opening or of the previous response."""

    def __init__(self, *args, http_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.http_timeout = http_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_for = None  # the request cycle current when the deadline was armed

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle
        self._deadline = self.loop.call_later(self.http_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.cycle is self._armed_for and not self.transport.is_closing():
            log.info("closing a connection from %s: no request headers within %g s",
                     "%s:%d" % self.client if self.client else "?", self.http_timeout)
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.cycle is not self._armed_for:
            self._disarm()  # a new request's headers arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers get the same time

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class GracefulServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C, before uvicorn stops accepting: the app stops admitting requests
    and gives running ones `shutdown_timeout` seconds, then ends them with an error event and
    `data: [DONE]` (ServerState.begin_shutdown). A second Ctrl-C still quits at once."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        state = getattr(getattr(self.config.app, "state", None), "opencamp", None)
        loop = getattr(state, "loop", None)
        if state is not None and loop is not None and not self.should_exit:
            running = len(state.scheduler.generations()) if state.scheduler else 0
            logging.getLogger("uvicorn.error").info(
                "shutting down: %d request(s) running get %g s to finish", running,
                self.shutdown_timeout)
            # From a signal handler: hand it to the event loop.
            loop.call_soon_threadsafe(state.begin_shutdown, self.shutdown_timeout)
        super().handle_exit(sig, frame)


def make_server(app, http_timeout: float = 30.0, log_level: str = "info",
                limit_concurrency: int | None = None,
                shutdown_timeout: float = 10.0) -> GracefulServer:
    """A uvicorn server for `app` with the header deadline, idle keep-alive connections closed
    after min(5, http_timeout) s, at most `limit_concurrency` connections (more get 503), and the
    graceful shutdown. uvicorn's own grace period is a little longer than `shutdown_timeout`
    so the streams the app ends at the deadline still get their last events out."""
    config = uvicorn.Config(
        app, log_level=log_level, http=functools.partial(HeaderDeadlineH11,
                                                         http_timeout=http_timeout),
        timeout_keep_alive=min(5.0, http_timeout), limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=shutdown_timeout + 5)
    return GracefulServer(config, shutdown_timeout)
