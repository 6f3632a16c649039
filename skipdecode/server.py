"""HTTP server over the embeddable service (starlette + uvicorn): OpenAI-style completions, health, metrics.

    POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, stop, seed, stream (SSE), plus
                           SkipDecode's speedup | max_layers + min_layers, stop_token_ids, ignore_eos, timeout
    GET  /health           200 while serving, 503 while shutting down
    GET  /metrics          Prometheus text format

Threads: handlers run on the event loop and never block on generation. Each request's tokens arrive from the
service's worker thread through its handle listener, which only hands them to the loop
(`call_soon_threadsafe`). A client that disconnects from a stream cancels its request.

Status codes: 400 invalid request (one line naming the value and the limit), 413 body too large, 503 overloaded
(bounded queue full, with Retry-After) or shutting down, 504 a non-streamed request hit its timeout, 500 the
backend failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from skipdecode.runtime.batcher import FinishEvent, TokenEvent
from skipdecode.runtime.errors import InputError, ScheduleError
from skipdecode.runtime.service import (
    OverloadedError,
    RequestFailedError,
    RequestHandle,
    Service,
    ServiceClosedError,
)
from skipdecode.server_api import CompletionRequest, ServerLimits, TextStream, parse_completion

OPENAI_REASON = {"eos": "stop", "stop": "stop", "length": "length"}  # others ("timeout", ...) pass through


def error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


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
        yield GaugeMetricFamily("skipdecode_graph_layers_per_row",
                                "Mean graph layers per decoded row (> layers per token when shallow rows are gated "
                                "inside a deeper graph)",
                                value=s.graph_row_layers / s.decoded_rows if s.decoded_rows else 0.0)


class CompletionsApp:
    """Request handlers bound to one engine and one service. The service is owned by the caller."""

    def __init__(self, engine, service: Service, model_name: str, limits: ServerLimits,
                 drain_timeout_s: float = 30.0) -> None:
        self.engine, self.service, self.model_name, self.limits = engine, service, model_name, limits
        self.drain_timeout_s = drain_timeout_s
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service))
        self.invalid = Counter("skipdecode_requests_invalid", "Requests refused as invalid (4xx)",
                               registry=self.registry)
        self.latency = Histogram("skipdecode_request_seconds", "Time from submit to the last token",
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def starlette(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            yield
            # uvicorn has stopped accepting connections and waited for open ones; finish what is left in the
            # service, then cancel anything still running explicitly
            await asyncio.to_thread(self.service.shutdown, False, self.drain_timeout_s)
            s = self.service.stats()
            print(f"skipdecode serve: stopped after {s.submitted} requests (finished: {s.finished})",
                  file=sys.stderr, flush=True)

        return Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                 Route("/health", self.health, methods=["GET"]),
                                 Route("/metrics", self.metrics, methods=["GET"])], lifespan=lifespan)

    async def health(self, request: Request) -> Response:
        s = self.service.stats()
        ok = not self.service.closing
        return JSONResponse({"status": "ok" if ok else "shutting down", "queue_depth": s.queue_depth,
                             "running": s.running}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> Response:
        body = await self._read_body(request)
        if body is None:
            self.invalid.inc()
            return error(413, f"request body is above the limit of {self.limits.max_body_bytes} bytes")
        try:
            req = parse_completion(json.loads(body), self.limits, self.engine.codec)
        except json.JSONDecodeError as exc:
            self.invalid.inc()
            return error(400, f"invalid JSON body: {exc}")
        except (InputError, ScheduleError) as exc:
            self.invalid.inc()
            return error(400, str(exc))
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
            return StreamingResponse(self._sse(req, handle, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(req, handle, queue, request)

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None as soon as it is known to exceed the limit (never buffers more than the limit)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _events(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue
                      ) -> AsyncIterator[tuple[TokenEvent | None, str, str | None]]:
        """-> (token event or None, text delta, internal finish_reason or None); ends after the finish."""
        text = TextStream(self.engine.codec, req.stop) if self.engine.codec is not None else None
        t0 = time.monotonic()
        while True:
            ev = await queue.get()
            if isinstance(ev, FinishEvent):
                self.latency.observe(time.monotonic() - t0)
                yield None, text.flush() if text else "", ev.reason
                return
            delta = text.push(ev.token) if text else ""
            if text is not None and text.stopped:  # a stop string completed: end here, stop generating
                handle.cancel("stop")
                self.latency.observe(time.monotonic() - t0)
                yield ev, delta, "stop"
                return
            yield ev, delta, None

    async def _complete(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue,
                        request: Request) -> Response:
        tokens, budgets, text, reason = [], [], [], None
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, handle))
        try:
            async for ev, delta, end in self._events(req, handle, queue):
                text.append(delta)
                reason = end or reason
                if ev is not None:
                    tokens.append(ev.token)
                    budgets.append(ev.budget)
        finally:
            watcher.cancel()
            handle.cancel()  # no-op once finished; ends the request if this handler is cancelled
        if reason == "timeout":
            return error(504, f"request timed out after {req.timeout_s:g} s ({len(tokens)} tokens generated)",
                         "timeout_error")
        if reason == "error":
            return error(500, f"generation failed: {self._failure(handle)}", "server_error")
        choice = {"index": 0, "text": "".join(text) if self.engine.codec else None, "tokens": tokens,
                  "logprobs": None, "finish_reason": OPENAI_REASON.get(reason, reason)}
        return JSONResponse({
            "id": f"cmpl-{handle.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or self.model_name, "choices": [choice],
            "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": len(tokens),
                      "total_tokens": len(req.prompt) + len(tokens)},
            "skipdecode": {"finish_reason": reason, "budgets": budgets,
                           "mean_layers": sum(budgets) / len(budgets) if budgets else None}})

    async def _sse(self, req: CompletionRequest, handle: RequestHandle, queue: asyncio.Queue) -> AsyncIterator[str]:
        head = {"id": f"cmpl-{handle.request_id}", "object": "text_completion", "model": req.model or self.model_name}
        try:
            async for ev, delta, reason in self._events(req, handle, queue):
                choice = {"index": 0, "text": delta if self.engine.codec else None, "logprobs": None,
                          "finish_reason": OPENAI_REASON.get(reason, reason) if reason else None}
                if ev is not None:
                    choice.update(token=ev.token, budget=ev.budget)
                if reason == "error":
                    choice["error"] = f"generation failed: {self._failure(handle)}"
                yield f"data: {json.dumps({**head, 'created': int(time.time()), 'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"
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


def create_app(engine, service: Service, model_name: str = "skipdecode", max_timeout_s: float = 600.0,
               drain_timeout_s: float = 30.0) -> Starlette:
    be = engine.backend
    limits = ServerLimits(max_length=be.max_length, vocab_size=engine.vocab_size, eos_token_id=engine.eos_token_id,
                          max_timeout_s=max_timeout_s)
    return CompletionsApp(engine, service, model_name, limits, drain_timeout_s).starlette()
