"""HTTP server over the embeddable service (starlette + uvicorn): OpenAI-style completions, models, health, metrics.

    POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, stop, seed, stream (SSE), logprobs,
                           echo (with logprobs: the prompt scored at full depth, one decode step per prompt
                           token; max_tokens 0: the scored prompt only), stream_options.include_usage, plus
                           SkipDecode's speedup | max_layers + min_layers, lossless (+ draft_speedup,
                           draft_tokens: full-depth output, drafted and accepted counts in the response),
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

Status codes: 400 invalid request (one line naming the value, echoed at most 80 characters, and the limit), and a
non-streamed request that reached its timeout (type "timeout_error": not 504, which the openai client re-submits
although the same request would time out again); 401, 404, 405, 408 request body not received in time, 413 body
too large, 415, 421; 503 overloaded (bounded queue full, with Retry-After) or shutting down; 500 the backend
failed. Every error is JSON: {"error": {"message", "type", "param", "code"}}. finish_reason is OpenAI's "stop"
(end of text or a stop string) or "length" (max_tokens, or cut short by a timeout or a shutdown); ours is under
"skipdecode".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from skipdecode.runtime.batcher import FinishEvent, TokenEvent
from skipdecode.runtime.errors import InputError, ScheduleError
from skipdecode.runtime.logprobs import TokenLogprob
from skipdecode.runtime.service import (
    OverloadedError,
    RequestFailedError,
    RequestHandle,
    Service,
    ServiceClosedError,
)
from skipdecode.server_api import CompletionRequest, ServerLimits, TextStream, parse_completion, show

# OpenAI's finish reasons; ours ("eos", "timeout", "cancelled") are reported under "skipdecode"
OPENAI_REASON = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CLOSE = {"Connection": "close"}  # on refusals before the body is read: the connection is not reused


def error(status: int, message: str, kind: str = "invalid_request_error", headers=None, code: str | None = None
          ) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    v = header.strip().lower()
    if v.startswith("["):
        return v[1:v.index("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


class Guard:
    """ASGI middleware in front of every route: Host check (421), API key (401, /health exempt), JSON content
    type on POST (415). `allowed_hosts` None: any Host."""

    def __init__(self, app, api_key: str | None, allowed_hosts: Iterable[str] | None) -> None:
        self.app, self.api_key = app, api_key
        self.allowed = None if allowed_hosts is None else frozenset(h.strip("[]").lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                self.on_refusal(refusal.status_code)
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def on_refusal(self, status: int) -> None:  # replaced by the app to count refusals
        pass

    def check(self, scope) -> Response | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.allowed is not None and host is not None and host_name(host) not in self.allowed:
            return error(421, f"Host {show(host)} is not served here (allowed: {', '.join(sorted(self.allowed))}; "
                         "add it with --allowed-hosts)", "invalid_request_error", CLOSE, "host_not_allowed")
        if self.api_key is not None and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                             "authentication_error", {**CLOSE, "WWW-Authenticate": "Bearer"}, "invalid_api_key")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return error(415, f"Content-Type must be application/json, got {show(media or None)}",
                             "invalid_request_error", CLOSE, "unsupported_media_type")
        return None


class BodyTimeout(Exception):
    pass


class ServiceCollector:
    """Prometheus view of `Service.stats()`, read at scrape time (no per-token metric updates on hot paths)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self):
        s = self.service.stats()
        done = CounterMetricFamily("skipdecode_requests_finished", "Finished requests by outcome", labels=["outcome"])
        for outcome, n in sorted(s.finished.items()):
            done.add_metric([outcome], n)
        yield done
        yield CounterMetricFamily("skipdecode_requests_submitted", "Requests accepted", value=s.submitted)
        yield CounterMetricFamily("skipdecode_requests_overloaded", "Requests refused: queue full",
                                  value=s.rejected_overloaded)
        yield CounterMetricFamily("skipdecode_generated_tokens", "Tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("skipdecode_layers_executed", "Decoder layers run, summed over generated tokens",
                                  value=s.layers_executed)
        yield GaugeMetricFamily("skipdecode_tokens_per_second", "Tokens generated per second (trailing window)",
                                value=s.tokens_per_s)
        yield GaugeMetricFamily("skipdecode_queue_depth", "Requests waiting for admission", value=s.queue_depth)
        yield GaugeMetricFamily("skipdecode_running_requests", "Requests holding a KV slot", value=s.running)
        yield GaugeMetricFamily("skipdecode_batch_size", "Rows in the last decode step", value=s.last_batch_size)
        yield GaugeMetricFamily("skipdecode_mean_batch_size", "Mean rows per decode step",
                                value=s.decoded_rows / s.decode_steps if s.decode_steps else 0.0)
        yield GaugeMetricFamily("skipdecode_mean_layers_per_token", "Mean decoder layers executed per token",
                                value=s.mean_layers_per_token)
        yield CounterMetricFamily("skipdecode_draft_tokens", "Lossless mode: tokens drafted by the shallow graphs",
                                  value=s.draft_tokens)
        yield CounterMetricFamily("skipdecode_accepted_draft_tokens",
                                  "Lossless mode: drafted tokens the full-depth verifier accepted",
                                  value=s.accepted_draft_tokens)
        yield GaugeMetricFamily("skipdecode_draft_acceptance_rate",
                                "Lossless mode: accepted / drafted tokens since start (0 before any draft)",
                                value=s.accepted_draft_tokens / s.draft_tokens if s.draft_tokens else 0.0)
        yield GaugeMetricFamily("skipdecode_graph_layers_per_row",
                                "Mean graph layers per decoded row (> layers per token when shallow rows are gated "
                                "inside a deeper graph)",
                                value=s.graph_row_layers / s.decoded_rows if s.decoded_rows else 0.0)


class CompletionsApp:
    """Request handlers bound to one engine and one service. The service is owned by the caller."""

    def __init__(self, engine, service: Service, model_name: str, limits: ServerLimits,
                 drain_timeout_s: float = 30.0, api_key: str | None = None,
                 allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS, text_threads: int = 4) -> None:
        self.engine, self.service, self.model_name, self.limits = engine, service, model_name, limits
        self.drain_timeout_s, self.api_key, self.allowed_hosts = drain_timeout_s, api_key, allowed_hosts
        self.created = int(time.time())
        self._echo_ids = count()
        # JSON, validation, tokenizing and detokenizing: off the event loop, never more than this many at once
        self.pool = ThreadPoolExecutor(text_threads, thread_name_prefix="skipdecode-text")
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service))
        self.invalid = Counter("skipdecode_requests_invalid", "Requests refused as invalid (4xx)",
                               registry=self.registry)
        self.latency = Histogram("skipdecode_request_seconds", "Time from submit to the last token",
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def starlette(self) -> Guard:
        @asynccontextmanager
        async def lifespan(app):
            yield
            # uvicorn has stopped accepting connections and waited for open ones; finish what is left in the
            # service, then cancel anything still running explicitly
            await asyncio.to_thread(self.service.shutdown, False, self.drain_timeout_s)
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
        guard = Guard(app, self.api_key, self.allowed_hosts)
        guard.on_refusal = lambda status: self.invalid.inc()
        return guard

    # -- small routes -------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.service.stats()
        ok = not self.service.closing
        return JSONResponse({"status": "ok" if ok else "shutting down", "queue_depth": s.queue_depth,
                             "running": s.running}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "skipdecode"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model_id"] != self.model_name:
            return error(404, f"model {show(request.path_params['model_id'])} does not exist; this server serves "
                         f"{self.model_name!r}", code="model_not_found")
        return JSONResponse(self._model_object())

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """404 and 405 (and any other HTTPException) as JSON like every other error."""
        if exc.status_code == 404:
            message = f"no route {show(request.url.path)}: see /v1/completions, /v1/models, /health, /metrics"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {show(request.url.path)}"
        else:
            message = exc.detail
        return error(exc.status_code, message, headers=exc.headers,
                     code="not_found" if exc.status_code == 404 else None)

    async def server_error(self, request: Request, exc: Exception) -> Response:
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    # -- completions --------------------------------------------------------------------------------------------
    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._read_body(request)
        except BodyTimeout:
            self.invalid.inc()
            return error(408, f"request body not received within {self.limits.body_timeout_s:g} s",
                         "timeout_error", CLOSE, "body_timeout")
        if body is None:
            self.invalid.inc()
            return error(413, f"request body is above the limit of {self.limits.max_body_bytes} bytes",
                         headers=CLOSE)
        try:
            req = await self._off_loop(self._parse, body)
        except (InputError, ScheduleError) as exc:
            self.invalid.inc()
            return error(400, str(exc))
        try:
            prefix = await self._prefix(req)
        except (InputError, ScheduleError) as exc:
            self.invalid.inc()
            return error(400, str(exc))
        except OverloadedError as exc:
            return error(503, str(exc), "overloaded_error", headers={"Retry-After": "1"})
        except ServiceClosedError as exc:
            return error(503, str(exc), "unavailable_error")
        except Exception as exc:  # the backend failed while scoring the prompt
            return error(500, f"scoring the prompt failed: {type(exc).__name__}: {exc}", "server_error")
        if req.max_tokens == 0:
            return self._echo_only(req, prefix)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        try:
            handle = self.service.submit(req.prompt, req.options, req.timeout_s,
                                         listener=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except (InputError, ScheduleError) as exc:
            self.invalid.inc()
            return error(400, str(exc))
        except OverloadedError as exc:
            return error(503, str(exc), "overloaded_error", headers={"Retry-After": "1"})
        except ServiceClosedError as exc:
            return error(503, str(exc), "unavailable_error")
        if req.stream:
            return StreamingResponse(self._sse(req, handle, queue, prefix), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(req, handle, queue, request, prefix)

    async def _prefix(self, req: CompletionRequest) -> Prefix:
        """The echoed prompt (text, and with logprobs its tokens scored at full depth by the service: one decode
        step per prompt token) and where the completion's text offsets start. Raises the service's errors."""
        if not req.echo and req.logprobs is None:
            return Prefix(None, None, 0)  # nothing to do (the common case)
        scored = None
        if req.echo and req.logprobs is not None:
            scored = await asyncio.wrap_future(self.service.score(req.prompt, req.logprobs))
        return await self._off_loop(self._make_prefix, req, scored)

    def _make_prefix(self, req: CompletionRequest, scored) -> Prefix:
        """Worker thread: detokenize the prompt and the scored entries."""
        codec = self.engine.codec
        text = req.prompt_text if req.prompt_text is not None else (
            codec.decode(list(req.prompt)) if codec is not None else None)
        if not req.echo:
            return Prefix(None, None, len(text or ""))
        block, end = None, len(text or "")
        if req.logprobs is not None:
            block, end = self._block(list(zip(req.prompt, [None, *scored], strict=True)), 0)
        return Prefix(text, block, end)

    def _token_text(self, token: int) -> str:
        codec = self.engine.codec
        return codec.decode([token]) if codec is not None else str(token)

    def _block(self, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> tuple[dict, int]:
        """Worker thread: OpenAI's completions `logprobs` object for (token, its TokenLogprob or None), the text
        offsets counted from `offset`, plus the ids (token strings of two ids can be equal). -> (it, next offset)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "token_ids": [],
               "top_token_ids": []}
        for token, e in entries:
            piece = self._token_text(token)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            out["token_ids"].append(token)
            offset += len(piece)
            out["token_logprobs"].append(e.logprob if e is not None else None)
            out["top_logprobs"].append({self._token_text(t): v for t, v in e.top} if e is not None else None)
            out["top_token_ids"].append([t for t, _ in e.top] if e is not None else None)
        return out, offset

    def _echo_only(self, req: CompletionRequest, prefix: Prefix) -> Response:
        """max_tokens 0 with echo: the prompt (and its logprobs), nothing generated."""
        rid = f"cmpl-echo-{next(self._echo_ids)}"
        choice = {"index": 0, "text": prefix.text, "tokens": [], "logprobs": prefix.block, "finish_reason": "length"}
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": 0, "total_tokens": len(req.prompt)}
        if not req.stream:
            return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                                 "model": self.model_name, "choices": [choice], "usage": usage,
                                 "skipdecode": {"finish_reason": "length", "budgets": [], "mean_layers": None}})

        async def events() -> AsyncIterator[str]:
            head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            if req.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _parse(self, body: bytes) -> CompletionRequest:
        """Worker thread: decode and validate the body (tokenizing a text prompt)."""
        try:
            data = json.loads(body)
        except UnicodeDecodeError as exc:
            raise InputError(f"request body is not valid UTF-8 (byte {exc.start}): send JSON text") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON body: {exc}") from None
        except RecursionError:
            raise InputError("invalid JSON body: nested too deeply") from None
        except ValueError:  # the int-from-string limit (sys.get_int_max_str_digits)
            raise InputError(f"invalid JSON body: a number has more than {sys.get_int_max_str_digits()} "
                             "digits") from None
        return parse_completion(data, self.limits, self.engine.codec)

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None as soon as it is known to exceed the limit (never buffers more than the limit).
        Raises BodyTimeout when the whole body has not arrived within the limit's body timeout."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None

        async def read() -> bytes | None:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise BodyTimeout from None

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
                deltas, tail = await self._off_loop(_advance, text, [ev.token for ev in tokens], finish is not None)
            # deltas end at the token that completed a stop string, if one did
            for i, (ev, delta) in enumerate(zip(tokens[:len(deltas)], deltas, strict=True)):
                if text is not None and text.stopped and i == len(deltas) - 1:
                    handle.cancel("stop")  # end here, stop generating
                    self.latency.observe(time.monotonic() - t0)
                    yield ev, delta, "stop"
                    return
                yield ev, delta, None
            if finish is not None:
                self.latency.observe(time.monotonic() - t0)
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
        if reason == "timeout":
            return error(400, f"request timed out after {req.timeout_s:g} s ({len(tokens)} tokens generated); "
                         "raise `timeout` or lower `max_tokens`", "timeout_error", {"x-should-retry": "false"},
                         "request_timeout")
        if reason == "cancelled":  # the server is shutting down and did not finish it in time
            return error(503, f"request cancelled by the server shutting down ({len(tokens)} tokens generated)",
                         "unavailable_error")
        if reason == "error":
            return error(500, f"generation failed: {self._failure(handle)}", "server_error")
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = await self._off_loop(self._block, list(zip(tokens, lps, strict=True)), prefix.offset)
            if prefix.block is not None:
                logprobs = {k: prefix.block[k] + v for k, v in logprobs.items()}
        completion = "".join(text) if self.engine.codec else None
        if prefix.text is not None:
            completion = prefix.text + (completion or "")
        choice = {"index": 0, "text": completion, "tokens": tokens,
                  "logprobs": logprobs, "finish_reason": OPENAI_REASON.get(reason, reason)}
        return JSONResponse({
            "id": f"cmpl-{handle.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [choice],
            "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": len(tokens),
                      "total_tokens": len(req.prompt) + len(tokens)},
            "skipdecode": {"finish_reason": reason, "budgets": budgets,
                           "mean_layers": sum(budgets) / len(budgets) if budgets else None,
                           **self._lossless(req, handle)}})

    async def _sse(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue, prefix: Prefix
                   ) -> AsyncIterator[str]:
        head = {"id": f"cmpl-{handle.request_id}", "object": "text_completion", "model": self.model_name}
        offset, generated = prefix.offset, 0
        try:
            if req.echo:  # the prompt first, as its own chunk
                choice = {"index": 0, "text": prefix.text, "logprobs": prefix.block, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'created': int(time.time()), 'choices': [choice]})}\n\n"
            async for ev, delta, reason in self._events(req, handle, queue):
                if reason == "error":  # as OpenAI reports a failure mid-stream: an error event (clients raise)
                    failure = {"message": f"generation failed: {self._failure(handle)}", "type": "server_error",
                               "param": None, "code": None}
                    yield f"data: {json.dumps({'error': failure})}\n\n"
                    break
                logprobs = None
                if ev is not None and ev.logprob is not None:
                    logprobs, offset = await self._off_loop(self._block, [(ev.token, ev.logprob)], offset)
                choice = {"index": 0, "text": delta if self.engine.codec else None, "logprobs": logprobs,
                          "finish_reason": OPENAI_REASON.get(reason, reason) if reason else None}
                if ev is not None:
                    generated += 1
                    choice.update(token=ev.token, budget=ev.budget)
                chunk = {**head, "created": int(time.time()), "choices": [choice]}
                if reason:
                    chunk["skipdecode"] = {"finish_reason": reason}
                yield f"data: {json.dumps(chunk)}\n\n"
            if req.include_usage:  # OpenAI's stream_options.include_usage: usage in a last chunk without choices
                usage = {"prompt_tokens": len(req.prompt), "completion_tokens": generated,
                         "total_tokens": len(req.prompt) + generated}
                yield f"data: {json.dumps({**head, 'created': int(time.time()), 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # the client went away (task cancelled) or the stream ended: no-op once finished

    @staticmethod
    def _lossless(req: CompletionRequest, handle: RequestHandle) -> dict:
        if not req.options.lossless:
            return {}
        drafted, accepted = handle.drafts
        return {"lossless": {"drafted": drafted, "accepted": accepted}}

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


@dataclass(frozen=True)
class Prefix:
    """What comes before the completion: the echoed prompt text (None without echo), its logprobs object (echo
    with logprobs) and the text offset the completion's tokens start at."""

    text: str | None
    block: dict | None
    offset: int


def _advance(text: TextStream, tokens: list[int], final: bool) -> tuple[list[str], str]:
    """Worker thread: the text deltas of `tokens` (ending at the one that completes a stop string) and, at the
    end of generation, the held-back text."""
    deltas = []
    for t in tokens:
        deltas.append(text.push(t))
        if text.stopped:
            break
    return deltas, text.flush() if final else ""


def create_app(engine, service: Service, model_name: str = "skipdecode", max_timeout_s: float = 600.0,
               drain_timeout_s: float = 30.0, *, api_key: str | None = None,
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS, max_prompt_chars: int | None = None,
               body_timeout_s: float = 30.0) -> Guard:
    """The ASGI app. `allowed_hosts` None accepts any Host header; `api_key` None needs no key."""
    be = engine.backend
    limits = ServerLimits(max_length=be.max_length, vocab_size=engine.vocab_size, eos_token_id=engine.eos_token_id,
                          max_timeout_s=max_timeout_s, max_prompt_chars=max_prompt_chars,
                          body_timeout_s=body_timeout_s)
    return CompletionsApp(engine, service, model_name, limits, drain_timeout_s, api_key, allowed_hosts).starlette()
