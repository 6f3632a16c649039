"""Continuous-batching scheduler: planning only (no backend, no graphs). It decides and records what runs; the
runner executes it.

Ownership:
* The backend's `SlotTable` (runtime/kv.py) is the one owner of KV slots (row i of every layer's K/V buffer); it
  is shared by every generation on the backend. A scheduler takes a slot from it for a request at admission and
  gives it back when that request finishes or is cancelled.
* `Scheduler` owns admission and per-step plans. The runner (runtime/batcher.py) executes a `StepPlan`, then
  reports back with `commit` which requests finished. Nothing here reads logits or tokens.

Exactness (docs/DESIGN.md §2, the KV invariant): a request's layer set at each step is fixed in advance by its own
schedule (`SeqSpec.buckets`, from `make_plan` with its own prompt length and max length). A step plan gives every
row exactly its own bucket; rows that share a graph call are gated to their own layers, never more, never fewer.

Policy:
* FIFO admission with head-of-line blocking: a waiting request is never overtaken, so a large request cannot
  starve behind a stream of small ones; it waits only for running requests, which finish within their
  max_new_tokens steps (no preemption, so nothing already admitted is ever evicted).
* Limits: `max_batch` running rows (<= KV slots), `max_tokens_in_flight` reserved KV columns (each running
  request reserves prompt + max_new_tokens columns), `max_prefill_tokens` prompt tokens prefilled per step (bounds
  the stall that prefills add to the decode steps of running rows).
* Chunked prefill (`chunked_prefill`): a prompt longer than `max_prefill_tokens` is prefilled over several steps,
  at most that many of its tokens per step, while the running rows keep decoding; prompts that are being prefilled
  get the step's budget first, in admission order, then new requests. A prompt that fits the budget is never split
  (it waits for a step with room instead), so short prompts keep their one batched prefill call. Without
  chunking, a prompt above the budget is admitted alone and prefilled in one call.
* Every running request decodes in every step, so running requests are served round-robin by construction.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from .errors import InputError, SchedulerError, check_choice, check_int
from .kv import SlotTable

STRATEGIES = ("gate", "group")
# Automatic lossless drafting backs off after this many rounds in a row with no draft accepted, for up to
# BACKOFF_MAX steps (random-weight opt-125m, whose shallow graphs never agree with full depth: 0.60x full depth at
# batch 1 without the backoff).
BACKOFF_AFTER = 2
BACKOFF_MAX = 64


@dataclass(frozen=True)
class Draft:
    """A lossless request's drafting: `tokens` per round with the graph of `bucket`.

    `auto` (no draft length asked for): rounds end early at a draft token the draft is unsure of, and drafting backs
    off while the drafts keep failing; with an explicit length every round drafts exactly `tokens` (fewer only at
    the end of the request). `shared` (automatic greedy requests only): the request drafts only in steps with at
    most `SchedulerConfig.max_speculative_rows` lossless rows, and otherwise decodes at full depth. Greedy tokens are
    the same either way; a sampled request's tokens depend on its rounds, so its choices depend on itself alone and
    a seeded request gives the same tokens alone, batched or served. `quantized`: it drafts with the quantized draft
    graph of `bucket` (`SlotBackend.draft_buckets`), a request property like the others."""

    bucket: int
    tokens: int
    auto: bool = True
    shared: bool = False
    quantized: bool = False  # draft with the bucket's quantized draft graph (the engine's int8/int4 copy)
    stop_below: float | None = None  # automatic drafting: a round ends at a draft token below this probability


@dataclass(frozen=True)
class SeqSpec:
    """What the scheduler knows of a request: its id, prompt length and the bucket of each decode step.

    `buckets[k]` is the graph budget of the k-th decode step (the pass over column prompt_length + k), so the
    request produces len(buckets) + 1 tokens at most (the first one comes from the prefill)."""

    request_id: int
    prompt_length: int
    buckets: tuple[int, ...]
    # lossless mode: how it drafts. Its buckets are all full depth (what the verifier runs); a round emits
    # 1..draft.tokens + 1 of them.
    draft: Draft | None = None

    @property
    def max_new_tokens(self) -> int:
        return len(self.buckets) + 1

    @property
    def reserved_tokens(self) -> int:
        """KV columns this request may occupy: its whole prompt plus every token it may generate."""
        return self.prompt_length + self.max_new_tokens


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int
    max_tokens_in_flight: int
    max_prefill_tokens: int | None = None  # prompt tokens prefilled per step; None: admit as many prompts as fit
    # "gate": one call of the deepest row's graph, shallower rows gated; "group": one call per distinct bucket.
    # gate is the default: on tiny-opt-kjv (serve_bench, 64 Poisson requests) grouping reached about half of gating's
    # tokens/s at 2x and 3x and a step over 8 rows of spread buckets took several times as long (docs/serving.md,
    # "Measured", 2026-11-22). Every call covers slots 0..n-1, so a group pays for all rows below its highest slot,
    # plus one call per bucket.
    strategy: str = "gate"
    # Lossless requests without an explicit draft length speculate only in steps with at most this many lossless
    # rows: on the embedded model a verify pass of 5 columns costs a little more than a full-depth step at batch 1
    # but two to three at batches 2-8, where a step is already compute-bound, and drafting there ran slower than
    # full depth (docs/DESIGN.md §9; docs/bench/2026-11-30/quick/bench.md, "Lossless mode").
    max_speculative_rows: int = 1
    # Split prompts longer than max_prefill_tokens into chunks over several steps (the service sets it where the
    # backend's chunks are exact: SlotBackend.chunked_prefill); False: such a prompt is admitted alone, in one call.
    chunked_prefill: bool = False

    def __post_init__(self) -> None:
        check_int("max_batch", self.max_batch, lo=1)
        check_int("max_tokens_in_flight", self.max_tokens_in_flight, lo=2)
        if self.max_prefill_tokens is not None:
            check_int("max_prefill_tokens", self.max_prefill_tokens, lo=1)
        check_int("max_speculative_rows", self.max_speculative_rows, lo=0)
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.chunked_prefill and self.max_prefill_tokens is None:
            raise InputError("chunked_prefill needs max_prefill_tokens: the prompt tokens each step may prefill")


def check_admissible(spec: SeqSpec, config: SchedulerConfig) -> None:
    """A request that could never be admitted is refused up front (it would block the queue forever)."""
    if spec.reserved_tokens > config.max_tokens_in_flight:
        raise InputError(f"prompt length {spec.prompt_length} + max_new_tokens {spec.max_new_tokens} = "
                         f"{spec.reserved_tokens} tokens is above max_tokens_in_flight {config.max_tokens_in_flight}")


@dataclass(frozen=True)
class Admit:
    """`request_id` starts in `slot` (taken for it at admission); its prompt is prefilled by `PrefillChunk`s."""

    request_id: int
    slot: int
    prompt_length: int


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, stop) of `request_id` into `slot`, at full depth: through the prefill graph when start
    is 0 (with the other first chunks of the step, in one call), else appended to the K/V of the earlier chunks
    (SlotBackend.feed). The chunk that reaches prompt_length produces the request's first token. A whole prompt is
    one chunk [0, prompt_length)."""

    request_id: int
    slot: int
    start: int
    stop: int
    prompt_length: int

    @property
    def last(self) -> bool:
        return self.stop == self.prompt_length


@dataclass(frozen=True)
class DecodeRow:
    """One row of a decode call: the pass over `column` of `slot`, running exactly the layers of `bucket`."""

    request_id: int
    slot: int
    column: int  # = tokens already in the slot = the new token's KV column and position
    bucket: int  # this row's own graph budget (its Step.bucket); the call's graph may be deeper
    step: int  # index k of the request's decode step


@dataclass(frozen=True)
class SpecRow:
    """One lossless row of a step: draft `drafts` tokens with `draft_bucket` from column `column` of `slot`, then
    check them (and the token fed at `column`) in one full-depth verify pass; 1..drafts + 1 tokens come out."""

    request_id: int
    slot: int
    column: int
    draft_bucket: int
    drafts: int
    step: int
    stop_below: float | None = None  # the round ends at a draft token its draft gives less (None: never early)
    quantized: bool = False  # drafts with the quantized draft graph of draft_bucket


@dataclass(frozen=True)
class DecodeCall:
    """One `decode_rows` call: the graph of `bucket` over slots 0..num_rows-1; `rows` are the rows it advances.

    Slots below num_rows that are not in `rows` must pass through untouched (all gates off)."""

    bucket: int
    num_rows: int
    rows: tuple[DecodeRow, ...]


@dataclass(frozen=True)
class StepPlan:
    """One scheduler step as plain data: `calls`, then the prompt work `prefills` (`admits`: the requests that took
    a slot in this step; their first chunks are among `prefills`). Either order is exact: a call points every slot
    it covers but does not advance at that slot's next free column, runtime/slot_backend.py, and a slot being
    prefilled is one of those."""

    calls: tuple[DecodeCall, ...]
    admits: tuple[Admit, ...]
    speculative: tuple[SpecRow, ...] = ()  # lossless rows: draft calls and one verify call, after `calls`
    prefills: tuple[PrefillChunk, ...] = ()

    @cached_property  # read several times per step: the plan is immutable, so computed once
    def rows(self) -> tuple[DecodeRow, ...]:
        return tuple(r for c in self.calls for r in c.rows)

    @property
    def empty(self) -> bool:
        return not self.calls and not self.admits and not self.speculative and not self.prefills

    @property
    def prefill_tokens(self) -> int:
        return sum(c.stop - c.start for c in self.prefills)


@dataclass
class _Running:
    spec: SeqSpec
    slot: int
    step: int = 0  # decode steps done
    fed: int = 0  # prompt tokens prefilled so far (chunked prefill: over several steps)
    misses: int = 0  # automatic lossless drafting: rounds in a row whose drafts were all rejected ...
    resume_at: int = 0  # ... and the step from which it drafts again (backoff)

    @property
    def prefilled(self) -> bool:
        return self.fed == self.spec.prompt_length


class Scheduler:
    """Plans steps for a set of requests. Single-threaded: the service's worker thread is its only caller."""

    def __init__(self, config: SchedulerConfig, slots: SlotTable) -> None:
        check_int("max_batch", config.max_batch, hi=slots.slots)
        self.config = config
        self._slots = slots  # the backend's one slot table, shared with other generations
        self._waiting: deque[SeqSpec] = deque()
        self._running: dict[int, _Running] = {}

    # -- requests in and out ------------------------------------------------------------------------------
    def submit(self, spec: SeqSpec) -> None:
        check_admissible(spec, self.config)
        if spec.request_id in self._running or any(w.request_id == spec.request_id for w in self._waiting):
            raise SchedulerError(f"request {spec.request_id} was submitted twice")
        self._waiting.append(spec)

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request (between steps); True if it was known."""
        for spec in self._waiting:
            if spec.request_id == request_id:
                self._waiting.remove(spec)
                return True
        run = self._running.pop(request_id, None)
        if run is None:
            return False
        self._slots.free([run.slot])
        return True

    def release_all(self) -> list[int]:
        """Forget every request (after a backend failure, or when a generation is closed); their slots go back to
        the table. -> the ids of the requests dropped."""
        dropped = [s.request_id for s in self._waiting] + list(self._running)
        self._waiting.clear()
        if self._running:
            self._slots.free([r.slot for r in self._running.values()])
        self._running.clear()
        return dropped

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def tokens_in_flight(self) -> int:
        return sum(r.spec.reserved_tokens for r in self._running.values())

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    # -- planning -----------------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        """Decode every prefilled running request one step, then give the step's prefill budget to prompts being
        prefilled and to waiting requests admitted (FIFO) into free slots."""
        rows, spec = [], []
        running = [r for r in sorted(self._running.values(), key=lambda r: r.slot) if r.prefilled]
        auto_ok = sum(r.spec.draft is not None for r in running) <= self.config.max_speculative_rows  # greedy only
        for r in running:
            column, draft = r.spec.prompt_length + r.step, r.spec.draft
            # a lossless row drafts at most the tokens it may still emit minus the verifier's own one; with none
            # left to draft (or, drafting automatically, in a step too full for it or while backing off) it is a
            # plain full-depth decode row
            drafting = draft is not None and (not draft.auto or ((auto_ok or not draft.shared)
                                                                 and r.step >= r.resume_at))
            drafts = min(draft.tokens, len(r.spec.buckets) - r.step - 1) if drafting else 0
            if drafts > 0:
                spec.append(SpecRow(r.spec.request_id, r.slot, column, draft.bucket, drafts, r.step,
                                    draft.stop_below if draft.auto else None, draft.quantized))
            else:
                rows.append(DecodeRow(r.spec.request_id, r.slot, column, r.spec.buckets[r.step], r.step))
        admits, prefills = self._prefill_work()
        return StepPlan(self._calls(tuple(rows)), admits, tuple(spec), prefills)

    def _calls(self, rows: tuple[DecodeRow, ...]) -> tuple[DecodeCall, ...]:
        if not rows:
            return ()
        if self.config.strategy == "gate":
            # one call of the deepest row's graph; shallower rows are gated to their own (nested) layer sets
            return (DecodeCall(max(r.bucket for r in rows), max(r.slot for r in rows) + 1, rows),)
        calls = []
        for bucket in sorted({r.bucket for r in rows}, reverse=True):
            group = tuple(r for r in rows if r.bucket == bucket)
            calls.append(DecodeCall(bucket, max(r.slot for r in group) + 1, group))
        return tuple(calls)

    def _prefill_work(self) -> tuple[tuple[Admit, ...], tuple[PrefillChunk, ...]]:
        """The step's prompt work within `max_prefill_tokens`: the next chunk of every prompt being prefilled (in
        admission order), then admissions (FIFO). -> (admits, chunks)."""
        cfg = self.config
        budget = cfg.max_prefill_tokens
        left = budget if budget is not None else float("inf")
        chunks: list[PrefillChunk] = []
        for run in self._running.values():  # insertion order = admission order
            todo = run.spec.prompt_length - run.fed
            if run.fed and todo and left > 0:  # started in an earlier step (its first chunk committed)
                n = int(min(todo, left))
                chunks.append(PrefillChunk(run.spec.request_id, run.slot, run.fed, run.fed + n, run.spec.prompt_length))
                left -= n
        admits: list[Admit] = []
        in_flight = self.tokens_in_flight
        while self._waiting and len(self._running) < cfg.max_batch and self._slots.num_free:
            head = self._waiting[0]
            p = head.prompt_length
            if in_flight + head.reserved_tokens > cfg.max_tokens_in_flight:
                break  # head-of-line blocking: nobody overtakes the head (no starvation)
            if p <= left:
                n = p
            elif cfg.chunked_prefill and p > budget and left > 0:
                n = int(left)  # a prompt that can never fit a step starts with what is left of this one
            elif not cfg.chunked_prefill and not chunks:
                n = p  # without chunking, a prompt above the budget is prefilled alone, in one call
            else:
                break  # it fits a step of its own: it waits for one rather than being split
            self._waiting.popleft()
            slot = self._slots.allocate(1)[0]
            self._running[head.request_id] = _Running(head, slot)
            admits.append(Admit(head.request_id, slot, p))
            chunks.append(PrefillChunk(head.request_id, slot, 0, n, p))
            in_flight += head.reserved_tokens
            left = max(left - n, 0)
        return tuple(admits), tuple(chunks)

    @staticmethod
    def _backoff(run: _Running, accepted: bool) -> None:
        """Automatic drafting pauses for a request whose drafts keep failing (a draft model that disagrees with
        the full one makes every round cost a draft and a verify pass for one token): after BACKOFF_AFTER rounds in
        a row with nothing accepted it decodes at full depth for 2, 4, ... up to BACKOFF_MAX steps, then tries
        again."""
        if accepted:
            run.misses = 0
            return
        run.misses += 1
        if run.misses >= BACKOFF_AFTER:
            run.resume_at = run.step + min(2 ** (run.misses - BACKOFF_AFTER + 1), BACKOFF_MAX)

    def commit(self, plan: StepPlan, finished: Iterable[int], emitted: dict[int, int] | None = None) -> None:
        """Record that `plan` ran; `finished` are the requests that produced their last token in it, `emitted` the
        tokens each lossless row produced (1..drafts + 1).

        Requests cancelled while the plan ran may be absent already; everything else must be consistent."""
        done = set(finished)
        emitted = emitted or {}
        advanced = [(row, 1) for row in plan.rows]
        for row in plan.speculative:
            n = emitted.get(row.request_id, 0)
            if row.request_id not in done and not 1 <= n <= row.drafts + 1:
                raise SchedulerError(f"lossless request {row.request_id} emitted {n} tokens in a round of "
                                     f"{row.drafts} drafts")
            advanced.append((row, n))
        for row, n in advanced:
            run = self._running.get(row.request_id)
            if run is None:
                continue
            if run.step != row.step:
                raise SchedulerError(f"request {row.request_id} is at step {run.step}, plan ran step {row.step}")
            run.step += n
            if isinstance(row, SpecRow) and run.spec.draft.auto:
                self._backoff(run, accepted=n > 1)
        for c in plan.prefills:
            run = self._running.get(c.request_id)
            if run is None:
                continue
            if run.fed != c.start:
                raise SchedulerError(f"request {c.request_id} has {run.fed} prompt tokens prefilled, plan fed "
                                     f"[{c.start}, {c.stop})")
            run.fed = c.stop
        for rid in done:
            run = self._running.pop(rid, None)
            if run is not None:
                self._slots.free([run.slot])
        for run in self._running.values():
            if run.prefilled and run.step >= len(run.spec.buckets):
                raise SchedulerError(f"request {run.spec.request_id} used all {run.spec.max_new_tokens} tokens "
                                     "but the runner did not report it finished")
