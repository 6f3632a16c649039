"""The network edge of `skipdecode serve`: which Host names it answers, the exposure warning, and connection-level
limits on top of uvicorn's h11 protocol (uvicorn 0.54).

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) but never one that connects and sends nothing
or stops in the middle of its request head: each would hold a socket forever. `guarded_protocol` adds
* a header timeout: a request head must be complete `header_timeout` seconds after the connection opens, or after
  the first byte of a later request on a kept-alive connection; else the connection is closed;
* connection limits: a connection beyond `max_connections` open ones, or beyond `max_client_connections` from
  one client address, is closed at once (one client reconnecting in a loop cannot lock the others out).
A stalled request body is the app's to time out (`body_timeout`: 408 and the connection closed), and a stalled
reader of a response is bounded by the stream's own request timeout.

No web framework at import time: the Ray driver uses the host helpers.
"""

from __future__ import annotations

import ipaddress
import sys

from skipdecode.serve.config import API_KEY_ENV, ServeConfig

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: str) -> tuple[str, ...] | None:
    """Host header names accepted: localhost, the bind address (unless it is a wildcard) and the comma-separated
    names of `extra`; None (any) when `extra` holds '*'."""
    names = [h.strip() for h in extra.split(",") if h.strip()]
    if "*" in names:
        return None
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *([bind] if bind not in ANY_ADDRESS else []), *names]))


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    v = header.strip().lower()
    if v.startswith("["):
        return v[1:v.index("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if api_key or is_loopback(host):
        return
    bar = "!" * 100
    print(f"{bar}\nskipdecode serve: WARNING: listening on {host}, beyond this machine, WITHOUT an API key: anyone who "
          f"can reach the port can use it.\nSet --api-key or ${API_KEY_ENV}.\n{bar}", file=sys.stderr, flush=True)


def guarded_protocol(config: ServeConfig) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    header_timeout, max_connections = config.header_timeout, config.max_connections
    per_client, open_by_client = config.max_client_connections, {}  # client address -> its open connections

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None
        _client = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            client = peer[0] if isinstance(peer, tuple) and peer else None
            if client is not None:
                self._client = client
                open_by_client[client] = open_by_client.get(client, 0) + 1
            if len(self.connections) > max_connections or (client is not None
                                                           and open_by_client[client] > per_client):
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
            if self._client is not None:
                left = open_by_client.pop(self._client) - 1
                if left:
                    open_by_client[self._client] = left
                self._client = None
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_deadline, self.cycle)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self, cycle) -> None:
            self._head_timer = None
            if self.cycle is cycle and not self.transport.is_closing():  # no new request head since armed
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, config: ServeConfig, **kw):
    """A uvicorn.Config serving `app` with the connection limits of `config` (other uvicorn settings in `kw`)."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(config), timeout_keep_alive=config.keep_alive_timeout, **kw)
