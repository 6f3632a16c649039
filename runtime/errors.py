"""Typed errors and the validators that raise them. Every message names the offending value and the limit it broke.

Two branches under `SkipDecodeError`: `RequestError` (the caller's input is at fault: HTTP 4xx) and `ServerError`
(this process cannot do what was asked: HTTP 5xx). Each class carries how the HTTP server reports it: `status`,
OpenAI's error `kind` ("type" in the JSON body), a machine-readable `code` and extra response `headers`, so the
server turns any of them into its JSON error in one place. The CLI turns any `SkipDecodeError` into a one-line
message and a non-zero exit, never a traceback. A broken internal invariant is a bug, not one of these: it raises
`RuntimeError`.

The validators (`check_int`, `check_number`, `check_bool`, `check_choice`) are the one way values are checked,
from manifests to HTTP request bodies to server options; `show` bounds a value echoed in a message.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from types import MappingProxyType

CLOSE = MappingProxyType({"Connection": "close"})  # a refusal before the body was read: the connection is not reused


class SkipDecodeError(ValueError):
    """Base class of every error this package raises on bad input, a bad artefact or a server that cannot answer."""

    status = 500
    kind = "server_error"
    code: str | None = None
    headers: Mapping[str, str] = MappingProxyType({})


class SchedulerError(RuntimeError):
    """A broken contract between scheduler and runner: a bug, never bad user input (so not a SkipDecodeError)."""


# -- request errors (4xx): the caller can fix them -------------------------------------------------------------------
class RequestError(SkipDecodeError):
    """The request (or command line) is at fault; sending it again unchanged fails the same way."""

    status = 400
    kind = "invalid_request_error"


class InputError(RequestError):
    """Invalid request: prompts, lengths, batch size, sampling values or options."""


class ScheduleError(RequestError):
    """Invalid schedule parameters (budgets, warm-up, speedup, lengths)."""


class ModelError(RequestError):
    """A model name or checkpoint that cannot be resolved or is not an OPT model."""


class RequestTimeoutError(RequestError):
    """A non-streamed request reached its own `timeout`. 400, not 504: clients re-submit a 504, and the same
    request would time out again."""

    kind = "timeout_error"
    code = "request_timeout"
    headers = MappingProxyType({"x-should-retry": "false"})


class BodyTooLargeError(RequestError):
    status = 413
    headers = CLOSE


class BodyTimeoutError(RequestError):
    """The request body did not arrive within the server's body timeout."""

    status = 408
    kind = "timeout_error"
    code = "body_timeout"
    headers = CLOSE


class AuthenticationError(RequestError):
    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"
    headers = MappingProxyType({**CLOSE, "WWW-Authenticate": "Bearer"})


class UnsupportedMediaTypeError(RequestError):
    status = 415
    code = "unsupported_media_type"
    headers = CLOSE


class HostNotAllowedError(RequestError):
    """The Host header names a host this server does not serve (a DNS-rebinding guard)."""

    status = 421
    code = "host_not_allowed"
    headers = CLOSE


class ModelNotFoundError(RequestError):
    status = 404
    code = "model_not_found"


class RouteError(RequestError):
    """No such route (404) or method (405): the status and headers (Allow) are the router's."""

    def __init__(self, message: str, status: int = 404, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, MappingProxyType(dict(headers or {}))
        self.code = "not_found" if status == 404 else None


# -- server errors (5xx): this process cannot answer ------------------------------------------------------------------
class ServerError(SkipDecodeError):
    """The server (its engine, its backend, its capacity) is at fault, not the request."""


class EngineError(ServerError):
    """Missing, corrupted or incompatible engine directory."""


class BackendError(ServerError):
    """A requested backend or execution provider cannot be used, or it failed."""


class RequestFailedError(ServerError):
    """The backend failed while this request was running."""


class OverloadedError(ServerError):
    """The admission queue is full: the caller should retry later."""

    status = 503
    kind = "overloaded_error"
    headers = MappingProxyType({"Retry-After": "1"})


class ServiceClosedError(ServerError):
    """The service is shutting down or stopped and accepts no new requests."""

    status = 503
    kind = "unavailable_error"


class RequestCancelledError(ServiceClosedError):
    """A running request the server cancelled because it is shutting down and the drain time ran out."""


class ReplicaFailedError(ServerError):
    """Scale-out: the replica serving a request stopped before it answered (the proxy reports it)."""

    status = 502
    code = "replica_failed"


# -- validators -------------------------------------------------------------------------------------------------------
def show(v: object, limit: int = 80) -> str:
    """A value for an error message, bounded: never echo unbounded input."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 256:
        return f"<integer of about {int(v.bit_length() * 0.30103)} digits>"  # repr of a huge int is slow
    if isinstance(v, (list, dict)) and len(v) > limit:
        v = v[:limit] if isinstance(v, list) else dict(list(v.items())[:limit])
    try:
        text = repr(v)
    except RecursionError:
        text = f"<deeply nested {type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None,
              error: type[SkipDecodeError] = InputError, hint: str = "") -> int:
    """Return `value` if it is an int with lo <= value <= hi; raise `error` naming the value and the limit
    (`hint` is appended to the above-the-maximum message)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer, got {show(value)}")
    if lo is not None and value < lo:
        raise error(f"{name}={show(value)} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise error(f"{name}={show(value)} is above the maximum {hi}{hint}")
    return value


def check_number(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
                 above: float | None = None, error: type[SkipDecodeError] = InputError, unit: str = "") -> float:
    """Return `value` if it is a finite int or float with lo <= value <= hi and value > `above`; raise `error`
    naming the value and the limit (an interval when both ends are set; `unit` follows the limit)."""
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise error(f"{name} must be a finite number, got {show(value)}")
    low_ok = (above is None or value > above) and (lo is None or value >= lo)
    if low_ok and (hi is None or value <= hi):
        return value
    if hi is not None and (above is not None or lo is not None):
        left = f"({above:g}" if above is not None else f"[{lo:g}"
        raise error(f"{name}={show(value)} must be in {left}, {hi:g}]{unit}")
    if above is not None and not low_ok:
        raise error(f"{name}={show(value)} must be a number > {above:g}{unit}")
    if not low_ok:
        raise error(f"{name}={show(value)} is below the minimum {lo:g}{unit}")
    raise error(f"{name}={show(value)} is above the maximum {hi:g}{unit}")


def check_bool(name: str, value: object, error: type[SkipDecodeError] = InputError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {show(value)}")
    return value


def check_choice(name: str, value: object, choices: Collection, error: type[SkipDecodeError] = InputError):
    """Return `value` if it is one of `choices` (compared by type as well: 1 is not True)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise error(f"{name}={show(value)} is not one of {list(choices)}")
    return value
