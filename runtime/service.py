"""Embeddable, thread-safe serving API over the continuous batcher.

    service = Service(engine, ServiceConfig(max_queue=64))
    handle = service.submit(engine.encode("Hello"), GenerateOptions(max_new_tokens=32, speedup=2), timeout_s=30)
    for event in handle: print(event.token)        # streams as tokens are produced
    handle.result().finish_reason                  # "eos" | "stop" | "length" | "cancelled" | "timeout"
    service.shutdown(cancel=False)                 # finish in-flight requests (or cancel=True), then stop

Ownership and threads:
* One worker thread owns the `Batcher` (and through it the scheduler, the KV slots and the backend): it is the
  only thread that runs graphs. Callers never touch it; they talk to the worker through an inbox and a set of
  cancellations, both guarded by one condition variable.
* A `RequestHandle` is written only by the worker and read by any thread. A `listener` given to `submit` is
  called on the worker thread for every event: it must not block (the HTTP server hands events to its event
  loop with `call_soon_threadsafe`).
* Backpressure: at most `max_queue` requests wait for admission; beyond that `submit` raises `OverloadedError`
  at once instead of queueing without bound.
* Chunked prefill: each step prefills at most `max_prefill_tokens` prompt tokens, so a long prompt is prefilled in
  chunks over several steps while running requests keep getting a token every step (runtime/scheduler.py), on
  backends where chunks give the tokens of a one-call prefill (`SlotBackend.chunked_prefill`; elsewhere a prompt
  above the budget is prefilled alone, in one call).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from .batcher import Batcher, Request, StepResult, prepare_request
from .errors import (  # the service's errors live with every other error; imported from here too
    BackendError,
    InputError,
    OverloadedError,
    RequestFailedError,
    RequestTimeoutError,
    ServiceClosedError,
    check_int,
    check_number,
)
from .generator import NonFiniteLogitsError
from .logprobs import MAX_LOGPROBS, PromptScore
from .request import FinishEvent, GenerateOptions, Generation, TokenEvent, check_prompts
from .scheduler import SchedulerConfig, check_admissible
from .slot_backend import SlotBackend

Listener = Callable[[TokenEvent | FinishEvent], None]


@dataclass
class _ScoreJob:
    score: PromptScore
    future: Future
    deadline: float | None  # time.monotonic() value, or None


# Prompt tokens a service step prefills: the longest a long prompt's prefill holds up the decode steps of running
# requests, in exchange for a later first token of that prompt (docs/serving.md, "Chunked prefill", measures both).
DEFAULT_MAX_PREFILL_TOKENS = 64


@dataclass(frozen=True)
class ServiceConfig:
    max_batch: int | None = None  # running rows; default: every KV slot of the backend
    max_tokens_in_flight: int | None = None  # reserved KV columns; default: max_batch x max_length (no limit)
    max_queue: int = 64  # requests waiting for admission before submit raises OverloadedError
    # prompt tokens prefilled per step: longer prompts are prefilled in chunks that share steps with decoding;
    # None: no limit, every prompt is prefilled in one call when admitted (running requests wait for it)
    max_prefill_tokens: int | None = DEFAULT_MAX_PREFILL_TOKENS
    strategy: str = "gate"
    default_timeout_s: float | None = None
    metrics_window_s: float = 10.0  # tokens/s is measured over this trailing window
    max_speculative_rows: int = 1  # lossless requests draft automatically in steps with at most this many of them

    def __post_init__(self) -> None:
        check_int("max_queue", self.max_queue, lo=1)
        if self.max_prefill_tokens is not None:
            check_int("max_prefill_tokens", self.max_prefill_tokens, lo=1)
        for name in ("default_timeout_s", "metrics_window_s"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), above=0)

    def scheduler_config(self, slots: int, max_length: int, chunked_prefill: bool = False) -> SchedulerConfig:
        """`chunked_prefill`: whether the backend may prefill a prompt in chunks (`SlotBackend.chunked_prefill`)."""
        batch = self.max_batch or slots
        return SchedulerConfig(batch, self.max_tokens_in_flight or batch * max_length, self.max_prefill_tokens,
                               self.strategy, self.max_speculative_rows,
                               chunked_prefill and self.max_prefill_tokens is not None)


@dataclass(frozen=True)
class ServiceStats:
    submitted: int
    rejected_overloaded: int
    finished: dict[str, int]  # by finish_reason, "error" included
    generated_tokens: int
    layers_executed: int  # sum over generated tokens of the layers each ran
    decode_steps: int
    decoded_rows: int
    graph_row_layers: int  # sum of graph budget x rows covered per call: the compute handed to graphs
    queue_depth: int
    running: int
    last_batch_size: int
    tokens_per_s: float  # over the trailing metrics window
    draft_tokens: int = 0  # lossless requests: tokens drafted by the shallow graphs, and accepted by the verifier
    accepted_draft_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens prefilled (whole prompts and chunks)

    @property
    def mean_layers_per_token(self) -> float:
        return self.layers_executed / self.generated_tokens if self.generated_tokens else 0.0


class RequestHandle:
    """One request's token stream and outcome. Iterating blocks until the next token or the end."""

    def __init__(self, request: Request, deadline: float | None, service: Service, listener: Listener | None):
        self.request_id = request.request_id
        self.prompt = request.prompt
        self.deadline = deadline  # time.monotonic() value, or None
        self._service, self._listener = service, listener
        self._cv = threading.Condition()
        self._events: list[TokenEvent] = []
        self._reason: str | None = None
        self._error: BaseException | None = None
        self._drafts = (0, 0)  # lossless mode: (drafted, accepted), from its FinishEvent

    def __iter__(self) -> Iterator[TokenEvent]:
        i = 0
        while True:
            with self._cv:
                self._cv.wait_for(lambda i=i: len(self._events) > i or self._reason is not None)
                batch, done, error = self._events[i:], self._reason is not None, self._error
            yield from batch
            i += len(batch)
            if done and i == len(self._events):
                if error is not None:
                    raise RequestFailedError(f"request {self.request_id} failed: {error}") from error
                return

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the worker to stop this request; it ends with finish_reason `reason` (no-op once done). "stop" is
        for callers that detect a stop condition themselves (the HTTP server's stop strings)."""
        if reason not in ("cancelled", "stop"):
            raise InputError(f"cancel reason {reason!r} is not one of ['cancelled', 'stop']")
        self._service._cancel(self.request_id, reason)

    @property
    def done(self) -> bool:
        with self._cv:
            return self._reason is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has ended (whatever the reason); -> False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._reason is not None, timeout)

    @property
    def drafts(self) -> tuple[int, int]:
        """Lossless mode: (tokens drafted, tokens the full model accepted), once the request has finished."""
        with self._cv:
            return self._drafts

    def result(self, timeout: float | None = None) -> Generation:
        with self._cv:
            if not self._cv.wait_for(lambda: self._reason is not None, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            if self._error is not None:
                raise RequestFailedError(f"request {self.request_id} failed: {self._error}") from self._error
            out = Generation(request_id=self.request_id, prompt=self.prompt)
            for ev in self._events:
                out.add(ev)
            out.finish_reason, (out.drafted, out.accepted) = self._reason, self._drafts
            return out

    # -- worker thread only -------------------------------------------------------------------------------
    def _push(self, event: TokenEvent) -> None:
        with self._cv:
            self._events.append(event)
            self._cv.notify_all()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cv:
            self._reason, self._error = reason, error
            self._cv.notify_all()


class Service:
    """Thread-safe front of one backend: submit from any thread, one worker thread runs the batcher."""

    def __init__(self, generator, config: ServiceConfig | None = None) -> None:
        # generator: an Engine (or any Generator); its backend's slot table is shared with other generations on it
        self.generator, self.config = generator, config or ServiceConfig()
        be = generator.backend
        if not isinstance(be, SlotBackend):
            raise BackendError(f"{type(be).__name__} is not a SlotBackend (runtime/slot_backend.py): continuous "
                               "batching needs the slot API")
        self._sched_config = self.config.scheduler_config(be.max_batch, be.max_length, be.chunked_prefill)
        self._batcher = Batcher(be, self._sched_config)  # worker thread only
        self._cv = threading.Condition()  # guards everything below
        self._ids = itertools.count()
        self._inbox: deque[tuple[Request, RequestHandle]] = deque()
        self._scores: deque[_ScoreJob] = deque()  # prompts to score (echo logprobs), not yet seen by the worker
        self._scoring: deque[_ScoreJob] = deque()  # worker thread only: the one being scored first, then the queue
        self._cancels: dict[int, str] = {}
        self._handles: dict[int, RequestHandle] = {}  # submitted and not finished
        self._closing = self._cancel_all = False
        self._waiting = self._running = self._last_batch = 0
        self._score_jobs = 0  # scoring jobs the worker holds: the first is scored, the others wait
        self._counts: Counter[str] = Counter()
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="skipdecode-batcher", daemon=True)
        self._thread.start()
        # A process that exits without shutdown() would tear onnxruntime down under the running worker (SIGABRT):
        # stop it at interpreter exit. The hook holds only a weak reference, so it keeps nothing alive.
        self._at_exit = functools.partial(_shutdown_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    # -- any thread -----------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], options: GenerateOptions, timeout_s: float | None = None,
               listener: Listener | None = None) -> RequestHandle:
        """Validate and enqueue; raises InputError/ScheduleError (bad request), OverloadedError (queue full) or
        ServiceClosedError (shutting down) without enqueueing anything."""
        deadline = self._deadline(timeout_s)
        with self._cv:
            rid = next(self._ids)
        g = self.generator
        request = prepare_request(rid, prompt, options, g.backend, g.vocab_size)
        check_admissible(request.spec, self._sched_config)
        handle = RequestHandle(request, deadline, self, listener)
        with self._cv:
            self._check_admission()
            self._counts["submitted"] += 1
            self._inbox.append((request, handle))
            self._handles[rid] = handle
            self._cv.notify_all()
        return handle

    def score(self, prompt: Sequence[int], k: int = 0, timeout_s: float | None = None) -> Future:
        """Log-probabilities of prompt[1:] (`TokenLogprob`s, each with its top `k`), teacher-forced at full depth.
        Ordinary work of the service: it waits in the same bounded queue as requests (OverloadedError when full),
        is scored one at a time in a KV slot of its own, SCORE_CHUNK tokens per worker step between decode steps
        (runtime/logprobs.py), fails with RequestTimeoutError past `timeout_s` (default: the service's), and is
        dropped when the Future is cancelled (a client that hung up). -> a Future of the list."""
        check_int("logprobs", k, lo=0, hi=MAX_LOGPROBS)
        deadline = self._deadline(timeout_s)
        g = self.generator
        check_prompts([prompt], g.vocab_size, g.backend.max_batch)
        check_int("prompt length", len(prompt), lo=1, hi=g.backend.max_length - 1)
        job = _ScoreJob(PromptScore(prompt, k), Future(), deadline)
        with self._cv:
            self._check_admission()
            self._counts["submitted_scores"] += 1
            self._scores.append(job)
            self._cv.notify_all()
        return job.future

    def _deadline(self, timeout_s: float | None) -> float | None:
        """The time.monotonic() by which a request or scoring job must end (default: the service's timeout)."""
        timeout_s = timeout_s if timeout_s is not None else self.config.default_timeout_s
        if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
            raise InputError(f"timeout={timeout_s!r} must be a number of seconds > 0")
        return time.monotonic() + timeout_s if timeout_s is not None else None

    def _check_admission(self) -> None:
        """Held under `_cv`: refuse new work while shutting down or with the queue full."""
        if self._closing:
            raise ServiceClosedError("the service is shutting down and accepts no new requests")
        queued = self._queued()
        if queued >= self.config.max_queue:
            self._counts["rejected_overloaded"] += 1
            raise OverloadedError(f"overloaded: {queued} requests are waiting, the queue limit is "
                                  f"{self.config.max_queue}; retry later")

    def _queued(self) -> int:
        """Requests and scoring jobs waiting to start (held under `_cv`): the one queue `max_queue` bounds."""
        return len(self._inbox) + self._waiting + len(self._scores) + max(0, self._score_jobs - 1)

    def generate(self, prompt: Sequence[int], options: GenerateOptions, timeout_s: float | None = None) -> Generation:
        return self.submit(prompt, options, timeout_s).result()

    def stats(self) -> ServiceStats:
        now = time.monotonic()
        with self._cv:
            c = self._counts
            window = [n for t, n in self._window if t >= now - self.config.metrics_window_s]
            span = max(min(self.config.metrics_window_s, now - self._started), 1e-3)
            return ServiceStats(
                submitted=c["submitted"], rejected_overloaded=c["rejected_overloaded"],
                finished={k[9:]: v for k, v in c.items() if k.startswith("finished_")},
                generated_tokens=c["tokens"], layers_executed=c["layers"], decode_steps=c["steps"],
                decoded_rows=c["rows"], graph_row_layers=c["graph_row_layers"],
                queue_depth=self._queued(),
                running=self._running + min(1, self._score_jobs),
                last_batch_size=self._last_batch, tokens_per_s=sum(window) / span,
                draft_tokens=c["drafted"], accepted_draft_tokens=c["accepted"], prefill_tokens=c["prefill_tokens"])

    def shutdown(self, cancel: bool = False, timeout_s: float | None = None) -> None:
        """Stop accepting requests; then finish every in-flight one (cancel=False) or end each with
        finish_reason "cancelled" (cancel=True). If finishing takes longer than `timeout_s`, the rest is
        cancelled explicitly. Returns when the worker thread has exited."""
        with self._cv:
            self._closing = True
            self._cancel_all |= cancel
            self._cv.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._cv:
                self._cancel_all = True
                self._cv.notify_all()
            self._thread.join()
        atexit.unregister(self._at_exit)  # this partial only: other services keep their hooks

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(cancel=exc[0] is not None)

    @property
    def closing(self) -> bool:
        with self._cv:
            return self._closing

    @property
    def alive(self) -> bool:
        """True while the worker thread runs. It exits only after shutdown(), so False on a service that was not
        shut down means no request will ever progress: a supervisor's health check (Ray Serve's) restarts it."""
        return self._thread.is_alive()

    def _cancel(self, request_id: int, reason: str) -> None:
        with self._cv:
            if request_id in self._handles:
                self._cancels.setdefault(request_id, reason)
                self._cv.notify_all()

    # -- worker thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._inbox or self._cancels or self._closing or self._scores
                                  or self._scoring or not self._batcher.idle)
                inbox, cancels = list(self._inbox), dict(self._cancels)
                self._scoring.extend(self._scores)
                self._inbox.clear()
                self._cancels.clear()
                self._scores.clear()
                self._score_jobs = len(self._scoring)
                if self._cancel_all:
                    cancels.update({rid: "cancelled" for rid in self._handles})
                closing = self._closing
            for request, _ in inbox:
                self._batcher.add(request)
            self._apply_cancels(cancels)
            # new requests are admitted (prefilled) before the next scoring chunk: their first token waits for at
            # most the chunk already running
            progressed = self._score() if not inbox else True
            if self._batcher.idle:
                if closing and not self._scoring:
                    return
                if not progressed:
                    with self._cv:  # a slot frees only when another generation on the engine ends
                        self._cv.wait(0.01)
                continue
            try:
                result = self._batcher.step()
            except Exception as exc:  # a backend failure ends the requests in flight, not the service
                self._fail_all(exc)
                continue
            self._dispatch(result)

    def _score(self) -> bool:
        """One chunk of the first scoring job (one at a time: it holds one KV slot, the others wait without one).
        Cancelled and expired jobs end first. -> False when the job waits for a slot that nothing here will free."""
        be, now = self.generator.backend, time.monotonic()
        for job in list(self._scoring):
            error = None
            if job.future.cancelled():
                self._counts["finished_scores_cancelled"] += 1
            elif self._cancel_all:
                error = ServiceClosedError("the service shut down before the prompt was scored")
            elif job.deadline is not None and job.deadline <= now:
                error = RequestTimeoutError("the prompt was not scored within the request's timeout")
            else:
                continue
            self._end_score(job, error=error)
        if not self._scoring:
            return True
        job = self._scoring[0]
        try:
            started = job.score.advance(be)
        except Exception as exc:  # a backend failure fails this job, not the service
            self._end_score(job, error=exc)
            return True
        if not started:
            if self._batcher.idle:  # no slot will free here: other generations on the engine hold them all
                self._end_score(job, error=OverloadedError("no free KV slot to score the prompt in: every slot is "
                                                           "held by other generations on this engine"))
            return False
        if job.score.done:
            self._end_score(job, result=job.score.result)
        return True

    def _end_score(self, job: _ScoreJob, result=None, error: BaseException | None = None) -> None:
        job.score.release(self.generator.backend)
        self._scoring.remove(job)
        if job.future.set_running_or_notify_cancel():
            if error is not None:
                self._counts["finished_scores_error"] += 1
                job.future.set_exception(error)
            else:
                self._counts["finished_scores"] += 1
                job.future.set_result(result)
        with self._cv:
            self._score_jobs = len(self._scoring)

    def _apply_cancels(self, cancels: dict[int, str]) -> None:
        now = time.monotonic()
        with self._cv:
            expired = {rid: "timeout" for rid, h in self._handles.items()
                       if h.deadline is not None and h.deadline <= now}
        for rid, reason in {**expired, **cancels}.items():
            drafts = self._batcher.drafts(rid)  # a request ended early (a stop string, a timeout) drafted too
            if self._batcher.cancel(rid):
                with self._cv:
                    handle = self._handles.get(rid)
                if handle is not None:
                    handle._drafts = drafts
                self._end(rid, reason)

    def _dispatch(self, result: StepResult) -> None:
        tokens = layers = 0
        with self._cv:
            handles = dict(self._handles)
        for ev in result.events:
            if ev.request_id not in handles:
                continue  # ended earlier in this loop because its listener raised
            if isinstance(ev, TokenEvent):
                tokens, layers = tokens + 1, layers + ev.budget
                handles[ev.request_id]._push(ev)
                self._notify(handles[ev.request_id], ev)
                if handles[ev.request_id].done:
                    del handles[ev.request_id]
            else:
                error = NonFiniteLogitsError(ev.error) if ev.reason == "error" else None
                handles[ev.request_id]._drafts = (ev.drafted, ev.accepted)
                self._end(ev.request_id, ev.reason, error)
        with self._cv:
            c = self._counts
            c["tokens"] += tokens
            c["layers"] += layers
            c["steps"] += bool(result.decoded_rows)
            c["rows"] += result.decoded_rows
            c["graph_row_layers"] += result.graph_row_layers
            c["drafted"] += result.drafted
            c["accepted"] += result.accepted
            c["prefill_tokens"] += result.prefill_tokens
            self._last_batch = result.decoded_rows
            self._window.append((time.monotonic(), tokens))
            while self._window and self._window[0][0] < time.monotonic() - self.config.metrics_window_s:
                self._window.popleft()
            self._waiting = self._batcher.scheduler.num_waiting
            self._running = self._batcher.scheduler.num_running

    def _end(self, request_id: int, reason: str, error: BaseException | None = None) -> None:
        with self._cv:
            handle = self._handles.pop(request_id)
            self._counts[f"finished_{reason}"] += 1
            self._waiting = self._batcher.scheduler.num_waiting
            self._running = self._batcher.scheduler.num_running
        handle._finish(reason, error)
        self._notify(handle, FinishEvent(request_id, reason))

    def _notify(self, handle: RequestHandle, event: TokenEvent | FinishEvent) -> None:
        """Call the handle's listener; one that raises ends its own request (reason "error"), not the worker."""
        if handle._listener is None:
            return
        try:
            handle._listener(event)
        except Exception as exc:  # caller code: contain it to its request
            with self._cv:
                self._counts["listener_errors"] += 1
            if isinstance(event, TokenEvent) and self._batcher.cancel(event.request_id):
                self._end(event.request_id, "error", exc)

    def _fail_all(self, exc: Exception) -> None:
        for rid in self._batcher.reset():
            self._end(rid, "error", exc)


def _shutdown_at_exit(ref: weakref.ref) -> None:
    service = ref()
    if service is not None:
        service.shutdown(cancel=True)
