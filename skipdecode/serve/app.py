"""HTTP server over the embeddable service (starlette + uvicorn): OpenAI-style completions, models, health, metrics.

    POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, stop, seed, stream (SSE), logprobs,
                           echo (with logprobs: the prompt scored at full depth, one decode step per prompt
                           token; max_tokens 0: the scored prompt only), stream_options.include_usage, plus
                           SkipDecode's speedup | max_layers + min_layers, lossless (+ draft_speedup,
                           draft_tokens, draft_weights: full-depth output, drafted and accepted counts in the
                           response),
                           stop_token_ids, ignore_eos, timeout
    GET  /v1/models        the one served model (OpenAI list shape); GET /v1/models/{id} the model object
    GET  /health           200 while serving, 503 while shutting down (never needs the API key)
    GET  /metrics          Prometheus text format

Threads: handlers run on the event loop and never block on generation or on text work. Each request's tokens
arrive from the service's worker thread through its handle listener, which only hands them to the loop
(`call_soon_threadsafe`). JSON decoding, validation, tokenizing and detokenizing run on a small thread pool, on
sizes bounded before they start (body bytes, prompt characters, stop string lengths). A client that disconnects
from a stream cancels its request.

Access (`Guard`, before routing): the Host header must name an allowed host (421 otherwise: DNS rebinding), an
API key when set must come as `Authorization: Bearer KEY` (401), and a POST must be `application/json` (415).

Status codes: every failure is a `SkipDecodeError` that carries its status, error type, code and headers
(runtime/errors.py), turned into JSON by `error_response` alone: 400 invalid request (one line naming the value,
echoed at most 80 characters, and the limit), and a non-streamed request that reached its timeout (type
"timeout_error": not 504, which the openai client re-submits although the same request would time out again);
401, 404, 405, 408 request body not received in time, 413 body too large, 415, 421; 503 overloaded (bounded queue
full, with Retry-After) or shutting down; 500 the backend failed. Every error is JSON: {"error": {"message",
"type", "param", "code"}}; the bodies themselves are built by the protocol module (skipdecode/serve/protocol.py).
finish_reason is OpenAI's "stop" (end of text or a stop string) or "length" (max_tokens, or cut short by a timeout
or a shutdown); ours is under "skipdecode".
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from itertools import count

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from skipdecode.runtime.errors import (
    AuthenticationError,
    BodyTimeoutError,
    BodyTooLargeError,
    HostNotAllowedError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
    RequestFailedError,
    RouteError,
    ServerError,
    ServiceClosedError,
    SkipDecodeError,
    UnsupportedMediaTypeError,
    show,
)
from skipdecode.runtime.request import FinishEvent, TokenEvent
from skipdecode.runtime.service import RequestHandle, Service
from skipdecode.serve import protocol as P
from skipdecode.serve.config import ServeConfig
from skipdecode.serve.metrics import RequestCounters, Snapshot, render
from skipdecode.serve.net import allowed_hosts, host_name
from skipdecode.serve.protocol import CompletionRequest, Prefix, ServerLimits, TextStream


def error_response(exc: SkipDecodeError) -> JSONResponse:
    """Every error answer of the server: the error's own status and headers, the protocol's JSON body."""
    return JSONResponse(P.error_body(exc), status_code=exc.status, headers=dict(exc.headers))


class Guard:
    """ASGI middleware in front of every route: Host check (421), API key (401, /health exempt), JSON content
    type on POST (415). `allowed_hosts` None: any Host. `on_refusal` is called with each refusal (metrics)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: Iterable[str] | None,
                 on_refusal=lambda exc: None) -> None:
        self.app, self.api_key, self.on_refusal = app, api_key, on_refusal
        self.allowed = None if allowed_hosts is None else frozenset(h.strip("[]").lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                self.on_refusal(refusal)
                return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> RequestError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.allowed is not None and host is not None and host_name(host) not in self.allowed:
            return HostNotAllowedError(f"Host {show(host)} is not served here (allowed: "
                                       f"{', '.join(sorted(self.allowed))}; add it with --allowed-hosts)")
        if self.api_key is not None and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer KEY'")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return UnsupportedMediaTypeError(f"Content-Type must be application/json, got {show(media or None)}")
        return None


class CompletionsApp:
    """Request handlers bound to one engine, one service and the server's options. The service is owned by the
    caller."""

    def __init__(self, engine, service: Service, config: ServeConfig, text_threads: int = 4) -> None:
        self.engine, self.service, self.config = engine, service, config
        self.model_name = config.served_name
        self.limits = ServerLimits.of(engine, config)
        self.created = int(time.time())
        self._echo_ids = count()
        # JSON, validation, tokenizing and detokenizing: off the event loop, never more than this many at once
        self.pool = ThreadPoolExecutor(text_threads, thread_name_prefix="skipdecode-text")
        self.counters = RequestCounters()
        # what /metrics shows: this server's own snapshot; a Ray replica replaces it with the sum over every
        # replica's (skipdecode/serve/ray.py), so a scrape through Ray's proxy sees the whole application
        self.metrics_snapshot: Callable[[], Awaitable[Snapshot]] = self._own_snapshot

    def starlette(self) -> Guard:
        @asynccontextmanager
        async def lifespan(app):
            yield
            # uvicorn has stopped accepting connections and waited for open ones; finish what is left in the
            # service, then cancel anything still running explicitly
            await asyncio.to_thread(self.service.shutdown, False, self.config.drain_timeout)
            self.pool.shutdown(wait=False, cancel_futures=True)
            s = self.service.stats()
            print(f"skipdecode serve: stopped after {s.submitted} requests (finished: {s.finished})",
                  file=sys.stderr, flush=True)

        app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                Route("/v1/models", self.models, methods=["GET"]),
                                Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                                Route("/health", self.health, methods=["GET"]),
                                Route("/metrics", self.metrics, methods=["GET"])],
                        exception_handlers={HTTPException: self.http_error, Exception: self.server_error},
                        lifespan=lifespan)
        return Guard(app, self.config.api_key, allowed_hosts(self.config.host, self.config.allowed_hosts),
                     on_refusal=lambda exc: self.counters.refused())

    # -- small routes -------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.service.stats()
        ok = not self.service.closing
        return JSONResponse({"status": "ok" if ok else "shutting down", "queue_depth": s.queue_depth,
                             "running": s.running}, status_code=200 if ok else 503)

    def snapshot(self) -> Snapshot:
        """This server's metrics as raw sums (skipdecode/serve/metrics.py)."""
        return self.counters.snapshot(self.service)

    async def _own_snapshot(self) -> Snapshot:
        return self.snapshot()

    async def metrics(self, request: Request) -> Response:
        body, media_type = render(await self.metrics_snapshot())
        return Response(body, media_type=media_type)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [P.model_object(self.model_name, self.created)]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model_id"] != self.model_name:
            return error_response(ModelNotFoundError(f"model {show(request.path_params['model_id'])} does not exist; "
                                                     f"this server serves {self.model_name!r}"))
        return JSONResponse(P.model_object(self.model_name, self.created))

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """404 and 405 (and any other HTTPException) as JSON like every other error."""
        if exc.status_code == 404:
            message = f"no route {show(request.url.path)}: see /v1/completions, /v1/models, /health, /metrics"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {show(request.url.path)}"
        else:
            message = exc.detail
        return error_response(RouteError(message, exc.status_code, exc.headers))

    async def server_error(self, request: Request, exc: Exception) -> Response:
        return error_response(ServerError(f"internal error: {type(exc).__name__}"))

    # -- completions --------------------------------------------------------------------------------------------
    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def completions(self, request: Request) -> Response:
        try:
            req = await self._off_loop(P.parse_body, await self._read_body(request), self.limits, self.engine.codec)
            prefix = await self._prefix(req)
            if req.max_tokens == 0:
                return self._echo_only(req, prefix)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            handle = self.service.submit(req.prompt, req.options, req.timeout_s,
                                         listener=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except SkipDecodeError as exc:
            if isinstance(exc, RequestError):
                self.counters.refused()
            return error_response(exc)
        except ClientDisconnect:  # hung up before its whole body arrived: nothing was submitted, nobody to answer
            self.counters.hung_up()
            return Response(status_code=499)  # nginx's "client closed request": a count, not a server error
        if req.stream:
            return self._stream(self._sse(req, handle, queue, prefix))
        return await self._complete(req, handle, queue, request, prefix)

    @staticmethod
    def _stream(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _read_body(self, request: Request) -> bytes:
        """The body; BodyTooLargeError as soon as it is known to exceed the limit (never buffers more than the
        limit), BodyTimeoutError when the whole body has not arrived within the body timeout."""
        limit = self.limits.max_body_bytes
        too_large = BodyTooLargeError(f"request body is above the limit of {limit} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large

        async def read() -> bytes | None:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self.config.body_timeout)
        except asyncio.TimeoutError:
            raise BodyTimeoutError(f"request body not received within {self.config.body_timeout:g} s") from None
        if body is None:
            raise too_large
        return body

    async def _prefix(self, req: CompletionRequest) -> Prefix:
        """The echoed prompt (text, and with logprobs its tokens scored at full depth by the service, a chunk per
        worker step between decode steps; cancelled when the client hangs up) and where the completion's text
        offsets start. Raises the service's errors; a
        backend failure while scoring as RequestFailedError."""
        if not req.echo and req.logprobs is None:
            return P.NO_PREFIX  # nothing to do (the common case)
        scored = None
        if req.echo and req.logprobs is not None:
            try:
                scored = await asyncio.wrap_future(self.service.score(req.prompt, req.logprobs, req.timeout_s))
            except (RequestError, OverloadedError, ServiceClosedError):
                raise
            except Exception as exc:  # the backend failed while scoring the prompt
                raise RequestFailedError(f"scoring the prompt failed: {type(exc).__name__}: {exc}") from exc
        return await self._off_loop(P.make_prefix, self.engine.codec, req, scored)

    def _echo_only(self, req: CompletionRequest, prefix: Prefix) -> Response:
        """max_tokens 0 with echo: the prompt (and its logprobs), nothing generated."""
        rid = f"cmpl-echo-{next(self._echo_ids)}"
        choice = P.choice(prefix.text, prefix.block, "length", tokens=[])
        usage = P.usage(req, 0)
        if not req.stream:
            return JSONResponse(P.completion(rid, self.model_name, choice, usage, P.skipdecode_block("length", [])))

        async def events() -> AsyncIterator[str]:
            yield P.chunk(rid, self.model_name, [choice])
            if req.include_usage:
                yield P.chunk(rid, self.model_name, [], usage=usage)
            yield P.DONE
        return self._stream(events())

    async def _events(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue
                      ) -> AsyncIterator[tuple[TokenEvent | None, str, str | None]]:
        """-> (token event or None, text delta, internal finish_reason or None); ends after the finish. The
        events that arrived together are detokenized together, off the loop."""
        text = TextStream(self.engine.codec, req.stop) if self.engine.codec is not None else None
        t0 = time.monotonic()
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            tokens = [ev for ev in batch if isinstance(ev, TokenEvent)]
            finish = next((ev for ev in batch if isinstance(ev, FinishEvent)), None)
            deltas, tail = [""] * len(tokens), ""
            if text is not None:
                deltas, tail = await self._off_loop(P.advance, text, [ev.token for ev in tokens], finish is not None)
            # deltas end at the token that completed a stop string, if one did
            for i, (ev, delta) in enumerate(zip(tokens[:len(deltas)], deltas, strict=True)):
                if text is not None and text.stopped and i == len(deltas) - 1:
                    handle.cancel("stop")  # end here, stop generating
                    self.counters.observe(time.monotonic() - t0)
                    yield ev, delta, "stop"
                    return
                yield ev, delta, None
            if finish is not None:
                self.counters.observe(time.monotonic() - t0)
                yield None, tail, finish.reason
                return

    async def _complete(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue,
                        request: Request, prefix: Prefix) -> Response:
        tokens, budgets, text, reason, lps = [], [], [], None, []
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, handle))
        try:
            async for ev, delta, end in self._events(req, handle, queue):
                text.append(delta)
                reason = end or reason
                if ev is not None:
                    tokens.append(ev.token)
                    budgets.append(ev.budget)
                    lps.append(ev.logprob)
        finally:
            watcher.cancel()
            handle.cancel()  # no-op once finished; ends the request if this handler is cancelled
        failed = P.finish_error(reason, req, len(tokens), self._failure(handle) if reason == "error" else "")
        if failed is not None:
            return error_response(failed)
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = await self._off_loop(P.logprobs_block, self.engine.codec,
                                               list(zip(tokens, lps, strict=True)), prefix.offset)
        completion = "".join(text) if self.engine.codec else None
        if prefix.text is not None:
            completion = prefix.text + (completion or "")
        choice = P.choice(completion, P.join_logprobs(prefix, logprobs), reason, tokens=tokens)
        drafts = None
        if req.options.lossless:  # a stop string ends the request on the worker: its counts are final after that
            await self._off_loop(handle.wait, 30.0)
            drafts = handle.drafts
        return JSONResponse(P.completion(f"cmpl-{handle.request_id}", self.model_name, choice,
                                         P.usage(req, len(tokens)), P.skipdecode_block(reason, budgets, drafts)))

    async def _sse(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue, prefix: Prefix
                   ) -> AsyncIterator[str]:
        rid, codec = f"cmpl-{handle.request_id}", self.engine.codec
        offset, generated = prefix.offset, 0
        try:
            if req.echo:  # the prompt first, as its own chunk
                yield P.chunk(rid, self.model_name, [P.choice(prefix.text, prefix.block, None)])
            async for ev, delta, reason in self._events(req, handle, queue):
                if reason == "error":  # as OpenAI reports a failure mid-stream: an error event (clients raise)
                    yield P.event(P.error_body(P.generation_failed(self._failure(handle))))
                    break
                logprobs, extra = None, {}
                if ev is not None:
                    generated += 1
                    extra = {"token": ev.token, "budget": ev.budget}
                    if ev.logprob is not None:
                        logprobs, offset = await self._off_loop(P.logprobs_block, codec, [(ev.token, ev.logprob)],
                                                                offset)
                choice = P.choice(delta if codec else None, logprobs, reason, **extra)
                yield P.chunk(rid, self.model_name, [choice], **({"skipdecode": {"finish_reason": reason}}
                                                                 if reason else {}))
            if req.include_usage:  # OpenAI's stream_options.include_usage: usage in a last chunk without choices
                yield P.chunk(rid, self.model_name, [], usage=P.usage(req, generated))
            yield P.DONE
        finally:
            handle.cancel()  # the client went away (task cancelled) or the stream ended: no-op once finished

    @staticmethod
    async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
        """A client that hangs up on a non-streamed request cancels it (the body was read: the next message is
        the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    @staticmethod
    def _failure(handle: RequestHandle) -> str:
        try:
            handle.result(timeout=0)
        except RequestFailedError as exc:  # the stored failure of this request, reported to its client
            return str(exc)
        return "unknown failure"


def create_app(engine, service: Service, config: ServeConfig | None = None) -> Guard:
    """The ASGI app over `engine` and `service` (owned by the caller) with the options of `config` (default:
    every default: loopback Host names only, no API key)."""
    return CompletionsApp(engine, service, config or ServeConfig()).starlette()
