"""The one generation loop: executes the scheduler's `StepPlan`s on a slot backend.

Every generation runs here: a static `Engine.generate`/`stream` is a `Batcher` that admits all its prompts at once
(runtime/generator.py), the `Service` one that admits requests as they come (runtime/service.py).

Ownership:
* `Batcher` owns each running request's generation state: its `Sampler` (one per request, seeded from its own
  options), the tokens emitted so far and the token to feed next. It never writes KV memory.
* The `Scheduler` (runtime/scheduler.py) decides what runs and takes slots from the backend's `SlotTable`; the
  backend owns the KV buffers and its graphs write them (runtime/kv.py).

Each request runs as it would alone: the first token from a full-depth prefill, then its own plan's steps (its own
prompt length and max length) in order, its own sampler, eos/stop handling and finish_reason. Rows sharing a
decode call are gated to exactly their own bucket's layers. A prompt prefilled in chunks over several steps (the
scheduler's chunked prefill) ends with the same K/V in every layer of every prompt column, and its first token comes
from the same full-depth logits, as a one-call prefill (equal up to float rounding: the chunks run other graphs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .errors import InputError
from .logprobs import token_logprob
from .profiling import step_range
from .request import (
    FinishEvent,
    GenerateOptions,
    TokenEvent,
    check_prompts,
    draft_bucket,
    draft_quantized,
    resolve_max_length,
)
from .sampling import Sampler
from .schedule import layers_for_budget, make_plan
from .scheduler import (
    DecodeCall,
    Draft,
    PrefillChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerError,
    SeqSpec,
    SpecRow,
)
from .slot_backend import SlotBackend
from .speculative import speculative_accept


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
    """Check a request at the boundary and plan its own schedule (its prompt length, its max length)."""
    check_prompts([prompt], vocab_size, backend.max_batch)
    p = len(prompt)
    T = resolve_max_length(p, opts, backend.max_length)
    plan = make_plan(opts.schedule(backend.num_layers, backend.warmup_layers), p, T, backend.buckets)
    buckets = tuple(s.bucket for s in plan.steps[: opts.max_new_tokens - 1])
    draft = None
    if opts.lossless:  # the schedule above is full depth (GenerateOptions refuses a SkipDecode one)
        if backend.lossless_refusal:
            raise InputError(backend.lossless_refusal)
        auto, policy = opts.draft_tokens is None, backend.draft_policy
        bucket = draft_bucket(backend.num_layers, backend.buckets, opts.draft_speedup or policy.draft_speedup)
        draft = Draft(bucket, policy.tokens if auto else opts.draft_tokens, auto=auto,
                      shared=auto and opts.sampling.greedy,
                      quantized=draft_quantized(bucket, backend.draft_buckets, opts.draft_weights,
                                                opts.sampling.greedy),
                      stop_below=policy.stop_below if auto else None)
    return Request(request_id, tuple(int(t) for t in prompt), opts, SeqSpec(request_id, p, buckets, draft))


@dataclass(frozen=True)
class StepResult:
    """What one step did: events in order, plus counts for metrics."""

    events: tuple[TokenEvent | FinishEvent, ...]
    decoded_rows: int  # rows advanced by decode calls
    admitted: int  # requests admitted (given a slot; their prompts prefilled whole or in a first chunk)
    graph_row_layers: int  # sum over calls of graph budget x rows covered: the compute the graphs were given
    drafted: int = 0  # lossless rows: tokens drafted in this step, and how many the verify pass accepted
    accepted: int = 0
    prefill_tokens: int = 0  # prompt tokens prefilled in this step (chunks included)


class _Sequence:
    """Mutable generation state of one running request; only the Batcher touches it."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sampler = Sampler(request.options.sampling)
        self.stops = request.stops
        self.tokens: list[int] = []
        self.next_token = -1  # the last emitted token: fed at the next decode step
        self.drafted = 0
        self.accepted = 0


@dataclass
class _RowDraft:
    """One lossless row's drafts in a round: tokens, their draft distributions (sampling only), and whether the
    draft logits were not finite."""

    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    broken: bool = False


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
        self.scheduler = Scheduler(config, backend.slots)
        self._warmup = backend.warmup_layers if backend.warmup_layers is not None else 1
        self._seqs: dict[int, _Sequence] = {}
        self._steps = 0

    def add(self, request: Request) -> None:
        self.scheduler.submit(request.spec)
        self._seqs[request.request_id] = _Sequence(request)

    def cancel(self, request_id: int) -> bool:
        """Drop a request between steps (its slot is freed at once); False if it is not here."""
        self._seqs.pop(request_id, None)
        return self.scheduler.cancel(request_id)

    def drafts(self, request_id: int) -> tuple[int, int]:
        """A running lossless request's (drafted, accepted) token counts so far; (0, 0) if it is not here."""
        seq = self._seqs.get(request_id)
        return (seq.drafted, seq.accepted) if seq is not None else (0, 0)

    def reset(self) -> list[int]:
        """Forget every request (after a backend failure, or when a generation is closed); their slots go back."""
        self._seqs.clear()
        return self.scheduler.release_all()

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def step(self) -> StepResult:
        plan = self.scheduler.plan()
        events: list[TokenEvent | FinishEvent] = []
        finished: set[int] = set()
        emitted: dict[int, int] = {}
        work = drafted = accepted = 0
        deepest = max((c.bucket for c in plan.calls), default=self.backend.num_layers)
        rows = len(plan.rows) + len(plan.speculative)
        with step_range(self._steps, deepest, rows + len(plan.prefills)):  # NVTX (runtime/profiling.py)
            for call in plan.calls:
                work += call.bucket * call.num_rows
                self._decode(call, events, finished)
            if plan.speculative:
                work, drafted, accepted = self._speculate(plan.speculative, events, finished, emitted, work)
            if plan.prefills:
                self._prefill(plan.prefills, events, finished)
        self._steps += 1
        self.scheduler.commit(plan, finished, emitted)
        for rid in finished:
            del self._seqs[rid]
        return StepResult(tuple(events), rows, len(plan.admits), work, drafted, accepted, plan.prefill_tokens)

    def _prefill(self, chunks: tuple[PrefillChunk, ...], events: list, finished: set[int]) -> None:
        """A step's prompt work: the first chunks (mostly whole prompts) in one prefill-graph call, later chunks of
        long prompts appended to their slots at full depth (`SlotBackend.feed`). A prompt's last chunk gives its
        first token, from full-depth logits of its last column either way."""
        be, last = self.backend, {}
        first = [c for c in chunks if c.start == 0]
        if first:
            logits = be.prefill_rows([self._seqs[c.request_id].request.prompt[: c.stop] for c in first],
                                     [c.slot for c in first])
            last.update({c.request_id: logits[i: i + 1] for i, c in enumerate(first)})
        for c in chunks:
            if c.start:
                last[c.request_id] = be.feed(c.slot, self._seqs[c.request_id].request.prompt[c.start: c.stop],
                                             last_only=True)
        for c in chunks:
            if c.last:
                self._emit(self._seqs[c.request_id], last[c.request_id], be.num_layers, events, finished)

    def _decode(self, call: DecodeCall, events: list, finished: set[int]) -> None:
        L = self.backend.num_layers
        ids = np.array([self._seqs[row.request_id].next_token for row in call.rows], dtype=np.int64)
        gates = np.array([gate_row(L, self._warmup, call.bucket, row.bucket) for row in call.rows], dtype=bool)
        logits = self.backend.decode_rows([row.slot for row in call.rows], ids, call.bucket, gates)
        for row in call.rows:
            self._emit(self._seqs[row.request_id], logits[row.slot: row.slot + 1], row.bucket, events, finished)

    def _speculate(self, rows: tuple[SpecRow, ...], events: list, finished: set[int], emitted: dict[int, int],
                   work: int) -> tuple[int, int, int]:
        """Lossless rows (docs/DESIGN.md, "Lossless mode"): draft with the shallow buckets, verify [fed token,
        drafts...] at full depth in one call, keep what `speculative_accept` accepts. -> (work, drafted, accepted)."""
        seqs = [self._seqs[r.request_id] for r in rows]
        drafts, work = self._draft(rows, seqs, work)
        verified, work = self._verify(rows, seqs, drafts, work)
        drafted = accepted = 0
        keep: dict[int, int] = {}  # slot -> its new length: the old next token and the accepted drafts, fed
        for r, seq, draft in zip(rows, seqs, drafts, strict=True):
            if draft.broken:
                self._fail(seq, f"the draft logits of token {len(seq.tokens)} are not finite (NaN or inf)", events,
                           finished)
                continue
            p = verified[r.slot]  # [S, V]
            out = speculative_accept(draft.tokens, draft.probs, p, seq.sampler).tokens
            seq.drafted += len(draft.tokens)
            seq.accepted += len(out) - 1
            drafted += len(draft.tokens)
            accepted += len(out) - 1
            for i, tok in enumerate(out):
                if not self._record(seq, tok, p[i: i + 1], self.backend.num_layers, events, finished):
                    break
            emitted[r.request_id] = len(out)
            if r.request_id not in finished:
                keep[r.slot] = r.column + len(out)
        if keep:
            self.backend.rewind(list(keep), list(keep.values()))
        return work, drafted, accepted

    def _draft(self, rows: tuple[SpecRow, ...], seqs: list[_Sequence], work: int) -> tuple[list[_RowDraft], int]:
        """row.drafts tokens per row from its draft bucket: calls of the deepest draft bucket among the rows still
        drafting, shallower rows gated (one call for the rows drafting with quantized weights, one for the others).
        A row drafting automatically stops early at a token its draft gives less than its policy's `stop_below`
        probability (such a token is often rejected, and every draft built on it is wasted)."""
        slots = [r.slot for r in rows]
        drafts = [_RowDraft() for _ in rows]
        feed = np.array([s.next_token for s in seqs], dtype=np.int64)
        limit = [r.drafts for r in rows]  # lowered when a row's draft is unsure of its token
        for i in range(max(limit)):
            drafting = [j for j in range(len(rows)) if limit[j] > i]
            if not drafting:
                break
            for quantized in (True, False):
                active = [j for j in drafting if rows[j].quantized == quantized]
                if active:
                    work = self._draft_call(rows, seqs, slots, active, feed, limit, drafts, i, quantized, work)
        return drafts, work

    def _draft_call(self, rows: tuple[SpecRow, ...], seqs: list[_Sequence], slots: list[int], active: list[int],
                    feed: np.ndarray, limit: list[int], drafts: list[_RowDraft], i: int, quantized: bool,
                    work: int) -> int:
        """Draft token i of the rows `active` in one call; -> work."""
        L, be = self.backend.num_layers, self.backend
        bucket = max(rows[j].draft_bucket for j in active)
        gates = np.array([gate_row(L, self._warmup, bucket, rows[j].draft_bucket) for j in active], dtype=bool)
        logits = be.decode_rows([slots[j] for j in active], feed[active], bucket, gates, draft=quantized)
        work += bucket * (max(slots[j] for j in active) + 1)
        for j in active:
            row, draft, sampler = logits[slots[j]], drafts[j], seqs[j].sampler
            if not np.isfinite(row.max()):
                draft.broken = True  # reported after the verify pass; its logits decide nothing for this row
            if draft.broken:
                d, confidence = 0, 0.0
            elif sampler.params.greedy:
                d = int(np.argmax(row))
                confidence = 1.0 / float(np.exp(row - row[d]).sum())
            else:
                draft.probs.append(sampler.probs(row))
                d = sampler.draw(draft.probs[-1])
                confidence = float(draft.probs[-1].max())
            draft.tokens.append(d)
            feed[j] = d
            if rows[j].stop_below is not None and confidence < rows[j].stop_below:  # later drafts: a likely miss
                limit[j] = i + 1
        return work

    def _verify(self, rows: tuple[SpecRow, ...], seqs: list[_Sequence], drafts: list[_RowDraft], work: int
                ) -> tuple[np.ndarray, int]:
        """Forget the drafted columns, then one full-depth pass over [fed token, drafts...] per row (padded to the
        longest). -> (logits [max(slots) + 1, S, V], work)."""
        be = self.backend
        slots = [r.slot for r in rows]
        be.rewind(slots, [r.column for r in rows])
        S = max(len(d.tokens) for d in drafts) + 1
        tokens = np.full((len(rows), S), be.pad_token_id, dtype=np.int64)
        for j, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            tokens[j, 0] = seq.next_token
            tokens[j, 1: 1 + len(draft.tokens)] = draft.tokens
        return be.verify_rows(slots, tokens), work + be.num_layers * (max(slots) + 1) * S

    def _fail(self, seq: _Sequence, what: str, events: list, finished: set[int]) -> None:
        rid = seq.request.request_id
        finished.add(rid)
        events.append(FinishEvent(rid, "error", f"request {rid}: {what}: the engine's weights are corrupt or its "
                                                "arithmetic overflowed", seq.drafted, seq.accepted))

    def _emit(self, seq: _Sequence, logits: np.ndarray, budget: int, events: list, finished: set[int]) -> None:
        # logits: [1, V]
        # NaN logits would make argmax pick token 0: an error, never a token. max() propagates NaN and +inf, so one
        # pass over the row finds any of them (and an all -inf row).
        if not np.isfinite(logits.max()):
            self._fail(seq, f"the logits of token {len(seq.tokens)} are not finite (NaN or inf)", events, finished)
            return
        self._record(seq, int(seq.sampler(logits)[0]), logits, budget, events, finished)

    def _record(self, seq: _Sequence, tok: int, logits: np.ndarray, budget: int, events: list,
                finished: set[int]) -> bool:
        """Emit `tok` (chosen from `logits` [1, V]); -> False when the request finished (with it, or before it)."""
        rid, opts = seq.request.request_id, seq.request.options
        if not np.isfinite(logits.max()):
            self._fail(seq, f"the logits of token {len(seq.tokens)} are not finite (NaN or inf)", events, finished)
            return False
        seq.tokens.append(tok)
        # from the logits the sampler used (nothing extra when not asked)
        lp = token_logprob(logits, tok, opts.logprobs) if opts.logprobs is not None else None
        events.append(TokenEvent(rid, len(seq.tokens) - 1, tok, budget, lp))
        if tok in seq.stops:
            reason = "eos" if tok == opts.eos_token_id else "stop"
        elif len(seq.tokens) == seq.request.spec.max_new_tokens:
            reason = "length"
        else:
            seq.next_token = tok
            return True
        finished.add(rid)
        events.append(FinishEvent(rid, reason, None, seq.drafted, seq.accepted))
        return False
