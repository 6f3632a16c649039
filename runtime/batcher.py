"""Continuous-batching runner: executes the scheduler's `StepPlan`s on a slot backend.

Ownership:
* `Batcher` owns each running request's generation state: its `Sampler` (one per request, seeded from its own
  options), the tokens emitted so far and the token to feed next. It never writes KV memory.
* The `Scheduler` (runtime/scheduler.py) owns KV slots and decides what runs; the backend owns the KV buffers and
  its graphs write them (runtime/kv.py).

Each request reproduces `stream_generation` (runtime/generation.py) for a batch of one: the first token from a
full-depth prefill, then its own plan's steps in order, the same sampling, the same eos/stop handling and the
same finish_reason. Rows sharing a decode call are gated to exactly their own bucket's layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from .generation import GenerateOptions, check_prompts, resolve_max_length
from .sampling import Sampler
from .schedule import layers_for_budget, make_plan
from .scheduler import DecodeCall, DecodeRow, Scheduler, SchedulerConfig, SchedulerError, SeqSpec, StepPlan


class SlotBackend(Protocol):
    """The slot API of a backend (runtime/ort_backend.py): rows are KV slots, sequences are ragged."""

    num_layers: int
    buckets: tuple[int, ...]
    warmup_layers: int | None
    max_batch: int  # KV slots
    max_length: int  # KV columns per slot

    def prefill_rows(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray:
        ...

    def decode_rows(self, token_ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        ...


@dataclass(frozen=True)
class Request:
    """A validated request: prompt, options, and its own schedule as the scheduler's `SeqSpec`."""

    request_id: int
    prompt: tuple[int, ...]
    options: GenerateOptions
    spec: SeqSpec

    @property
    def stops(self) -> frozenset[int]:
        eos = self.options.eos_token_id
        return frozenset(self.options.stop_token_ids) | ({eos} if eos is not None else frozenset())


def prepare_request(request_id: int, prompt: Sequence[int], opts: GenerateOptions, backend: SlotBackend,
                    vocab_size: int) -> Request:
    """Check a request at the boundary and plan its schedule exactly as `stream_generation` does for it alone."""
    check_prompts([prompt], vocab_size, backend.max_batch)
    p = len(prompt)
    T = resolve_max_length(p, opts, backend.max_length)
    plan = make_plan(opts.schedule(backend.num_layers, backend.warmup_layers), p, T, backend.buckets)
    buckets = tuple(s.bucket for s in plan.steps[: opts.max_new_tokens - 1])
    return Request(request_id, tuple(int(t) for t in prompt), opts, SeqSpec(request_id, p, buckets))


@dataclass(frozen=True)
class TokenEvent:
    """Token number `index` of a request, produced by `budget` layers (its own bucket)."""

    request_id: int
    index: int
    token: int
    budget: int


@dataclass(frozen=True)
class FinishEvent:
    request_id: int
    reason: str  # "eos" | "stop" | "length"


@dataclass(frozen=True)
class StepResult:
    """What one step did: events in order, plus counts for metrics."""

    events: tuple[TokenEvent | FinishEvent, ...]
    decoded_rows: int  # rows advanced by decode calls
    admitted: int  # prompts prefilled
    graph_row_layers: int  # sum over calls of graph budget x rows covered: the compute the graphs were given


class _Sequence:
    """Mutable generation state of one running request; only the Batcher touches it."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sampler = Sampler(request.options.sampling)
        self.stops = request.stops
        self.tokens: list[int] = []
        self.next_token = -1  # the last emitted token: fed at the next decode step


@lru_cache(maxsize=4096)
def gate_row(num_layers: int, warmup: int, graph_bucket: int, row_bucket: int) -> tuple[bool, ...]:
    """gates[j] for the j-th layer of `graph_bucket`'s graph: on iff the row's own layer set has that layer.

    Layer sets are nested (layers_for_budget), so a row of a smaller bucket runs a subset of the graph's layers."""
    mine = set(layers_for_budget(num_layers, row_bucket, warmup))
    graph = layers_for_budget(num_layers, graph_bucket, warmup)
    if not mine <= set(graph):
        raise SchedulerError(f"bucket {row_bucket} is not a subset of graph bucket {graph_bucket}")
    return tuple(layer in mine for layer in graph)


class Batcher:
    """Runs requests through a `Scheduler` and a slot backend, one `step()` at a time (single-threaded)."""

    def __init__(self, backend: SlotBackend, config: SchedulerConfig) -> None:
        self.backend = backend
        self.config = config
        self.scheduler = Scheduler(config, backend.max_batch)
        self._warmup = backend.warmup_layers if backend.warmup_layers is not None else 1
        self._seqs: dict[int, _Sequence] = {}

    def add(self, request: Request) -> None:
        self.scheduler.submit(request.spec)
        self._seqs[request.request_id] = _Sequence(request)

    def cancel(self, request_id: int) -> bool:
        """Drop a request between steps (its slot is freed at once); False if it is not here."""
        self._seqs.pop(request_id, None)
        return self.scheduler.cancel(request_id)

    def reset(self) -> list[int]:
        """Forget every request (after a backend failure): a fresh scheduler owns all slots again."""
        dropped = list(self._seqs)
        self._seqs.clear()
        self.scheduler = Scheduler(self.config, self.backend.max_batch)
        return dropped

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def step(self) -> StepResult:
        plan = self.scheduler.plan()
        events: list[TokenEvent | FinishEvent] = []
        finished: set[int] = set()
        work = 0
        for call in plan.calls:  # decode first: a call writes a discarded column into every slot it covers
            work += call.bucket * call.num_rows
            self._decode(plan, call, events, finished)
        if plan.admits:
            self._prefill(plan, events, finished)
        self.scheduler.commit(plan, finished)
        for rid in finished:
            del self._seqs[rid]
        return StepResult(tuple(events), len(plan.rows), len(plan.admits), work)

    def _prefill(self, plan: StepPlan, events: list, finished: set[int]) -> None:
        seqs = [self._seqs[a.request_id] for a in plan.admits]
        logits = self.backend.prefill_rows([s.request.prompt for s in seqs], [a.slot for a in plan.admits])
        for i, seq in enumerate(seqs):  # the first token comes from the prefill at full depth
            self._emit(seq, logits[i: i + 1], self.backend.num_layers, events, finished)

    def _decode(self, plan: StepPlan, call: DecodeCall, events: list, finished: set[int]) -> None:
        n, L = call.num_rows, self.backend.num_layers
        ids = np.zeros(n, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)  # free slots: token 0, length 0, all gates off
        gates = np.zeros((n, call.bucket), dtype=bool)
        mine = {row.request_id for row in call.rows}
        for other in plan.rows:  # "group" strategy: rows advanced by another call of this step
            if other.slot < n and other.request_id not in mine:
                lengths[other.slot] = self._scratch_column(other)
        for row in call.rows:
            ids[row.slot] = self._seqs[row.request_id].next_token
            lengths[row.slot] = row.column
            gates[row.slot] = gate_row(L, self._warmup, call.bucket, row.bucket)
        logits = self.backend.decode_rows(ids, lengths, call.bucket, gates)
        for row in call.rows:  # sample before the next call: the logits are a view the backend reuses
            self._emit(self._seqs[row.request_id], logits[row.slot: row.slot + 1], row.bucket, events, finished)

    def _scratch_column(self, row: DecodeRow) -> int:
        """Column a gated-off live row points at in a call that does not advance it.

        The graph writes a (pass-through) K/V column at lengths[i] for every row; at `column` it would clobber the
        row's real K/V if its own call ran first, at 0 its prompt. column + 1 is never read before the row's next
        step overwrites it (or the row ends). It exists: column <= T - 2 <= max_length - 2."""
        c = row.column + 1
        if c >= self.backend.max_length:
            raise SchedulerError(f"row of request {row.request_id} at column {row.column} has no scratch column "
                                 f"below max_length {self.backend.max_length}")
        return c

    def _emit(self, seq: _Sequence, logits: np.ndarray, budget: int, events: list, finished: set[int]) -> None:
        # logits: [1, V]; the same Sampler call as stream_generation makes for a batch of one
        tok = int(seq.sampler(logits)[0])
        seq.tokens.append(tok)
        rid, opts = seq.request.request_id, seq.request.options
        events.append(TokenEvent(rid, len(seq.tokens) - 1, tok, budget))
        if tok in seq.stops:
            reason = "eos" if tok == opts.eos_token_id else "stop"
        elif len(seq.tokens) == seq.request.spec.max_new_tokens:
            reason = "length"
        else:
            seq.next_token = tok
            return
        finished.add(rid)
        events.append(FinishEvent(rid, reason))
