"""Connection-level limits for `skipdecode serve`, on top of uvicorn's h11 protocol (uvicorn 0.54).

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) but never one that connects and sends nothing
or stops in the middle of its request head: each would hold a socket forever. `GuardedH11Protocol` adds
* a header timeout: a request head must be complete `header_timeout_s` after the connection opens, or after the
  first byte of a later request on a kept-alive connection; else the connection is closed;
* a connection limit: a connection beyond `max_connections` open ones is closed at once.
A stalled request body is the app's to time out (`ServerLimits.body_timeout_s`: 408 and the connection closed),
and a stalled reader of a response is bounded by the stream's own request timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

from skipdecode.runtime.errors import InputError


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive)
    max_connections: int | None = 512

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise InputError(f"max_connections={self.max_connections!r} must be >= 1")


def guarded_protocol(limits: ConnectionLimits) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if limits.max_connections is not None and len(self.connections) > limits.max_connections:
                transport.close()
                return
            self._await_head()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._await_head()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._cancel_head_timer()  # uvicorn's keep-alive timer runs until the next request starts...
            if self.cycle.response_complete and self.conn.trailing_data[0]:
                self._await_head()  # ...unless part of it came already, with the request before

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_deadline, self.cycle)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self, cycle) -> None:
            self._head_timer = None
            if self.cycle is cycle and not self.transport.is_closing():  # no new request head since armed
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, limits: ConnectionLimits | None = None, **kw):
    """A uvicorn.Config serving `app` with these connection limits (other uvicorn settings in `kw`)."""
    import uvicorn

    limits = limits or ConnectionLimits()
    return uvicorn.Config(app, http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive_s, **kw)
