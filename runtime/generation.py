"""The static-batch generation loop, shared by the PyTorch reference and the compiled runtime.

The loop plans (schedule -> `Plan`), samples and tracks stopping; a `StepBackend` executes one forward pass at
a time and owns the KV cache. Nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import InputError, check_int
from .profiling import step_range
from .sampling import Sampler, SamplingParams
from .schedule import Schedule, Step, make_plan, schedule_for


class StepBackend(Protocol):
    """Executes forward passes for one static batch at a time.

    `prefill` starts a new batch (any previous KV state is dropped) and returns logits of the last prompt column;
    `decode` runs the pass over `step.column` with exactly `step.layers` and returns its logits.
    `attention_mask` is always [B, T] (T = the call's max length); only columns <= the current one are meaningful.
    `position_ids` of a decode step are each row's count of real tokens so far, which is also the row's KV length
    in the ragged slot layout (runtime/kv.py), so the compiled backend needs nothing else.
    Returned logits [B, V] may be a view of a buffer the backend reuses: valid until its next call.
    """

    num_layers: int
    buckets: tuple[int, ...]  # decode budgets this backend can run (the full depth is always one)
    warmup_layers: int | None  # warm-up the graphs were built for; None = any
    max_batch: int
    max_length: int

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ...

    def decode(self, token_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
               step: Step) -> np.ndarray:
        ...


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate and how. Exactly one of `speedup` or (`max_layers`, `min_layers`) picks the schedule."""

    max_new_tokens: int
    speedup: float | None = None
    max_layers: int | None = None
    min_layers: int | None = None
    warmup_layers: int | None = None  # None: the backend's (an engine's export setting, else 1)
    max_length: int | None = None  # T of the schedule; default prompt length + max_new_tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, lo=1)
        if self.max_length is not None:
            check_int("max_length", self.max_length, lo=2)

    def schedule(self, num_layers: int, backend_warmup: int | None = None) -> Schedule:
        """The schedule for a backend; an engine's graphs exist for one warm-up only."""
        w = self.warmup_layers
        if backend_warmup is not None and w is not None and w != backend_warmup:
            raise InputError(f"warmup_layers={w} differs from the {backend_warmup} this engine was exported with")
        w = w if w is not None else (backend_warmup if backend_warmup is not None else 1)
        return schedule_for(num_layers, self.speedup, self.max_layers, self.min_layers, w)


@dataclass
class Generation:
    """One sequence's result: generated ids, the layers executed for each, why it stopped, and its text."""

    tokens: list[int]
    budgets: list[int]
    finish_reason: str = "length"  # "eos" | "stop" | "length"
    text: str | None = None


@dataclass(frozen=True)
class StepEvent:
    """Emitted once per produced column: the new token of every row (None for rows already finished)."""

    column: int
    budget: int
    tokens: tuple[int | None, ...]
    elapsed_s: float


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids [B, p] int64 and attention_mask [B, p] int64, prompts right-aligned (left padding)."""
    p = max(len(x) for x in prompts)
    ids = np.full((len(prompts), p), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), p), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, p - len(prompt):] = prompt
        mask[row, p - len(prompt):] = 1
    return ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """OPT position ids from the mask: running count of real tokens minus one; padding gets -1 (as HF)."""
    return (np.cumsum(mask, axis=1) * mask - 1).astype(np.int64)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_batch: int) -> None:
    if not prompts:
        raise InputError("no prompts given: a batch needs at least 1 sequence")
    check_int("batch size", len(prompts), lo=1, hi=max_batch)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InputError(f"prompt {i} is empty: every prompt needs at least 1 token")
        bad = [t for t in prompt
               if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")


def resolve_max_length(prompt_length: int, opts: GenerateOptions, limit: int) -> int:
    """T of the schedule: the prompt plus max_new_tokens must fit in T, and T in the model's `limit`."""
    needed = prompt_length + opts.max_new_tokens
    T = opts.max_length if opts.max_length is not None else needed
    if needed > T:
        raise InputError(f"prompt length {prompt_length} + max_new_tokens {opts.max_new_tokens} = {needed} "
                         f"is above max_length {T}")
    if T > limit:
        raise InputError(f"prompt length {prompt_length} + max_new_tokens {opts.max_new_tokens} = {needed} "
                         f"(max_length {T}) is above the model's limit of {limit} positions")
    return T


def stream_generation(backend: StepBackend, prompts: Sequence[Sequence[int]], opts: GenerateOptions,
                      pad_id: int, vocab_size: int) -> Iterator[StepEvent]:
    """Run prefill then the planned decode steps; yield one `StepEvent` per produced column."""
    check_prompts(prompts, vocab_size, backend.max_batch)
    ids, prompt_mask = left_pad(prompts, pad_id)
    B, p = ids.shape
    T = resolve_max_length(p, opts, backend.max_length)
    plan = make_plan(opts.schedule(backend.num_layers, backend.warmup_layers), p, T, backend.buckets)
    sampler = Sampler(opts.sampling)
    stops = set(opts.stop_token_ids) | ({opts.eos_token_id} if opts.eos_token_id is not None else set())
    mask = np.zeros((B, T), dtype=np.int64)
    mask[:, :p] = prompt_mask
    alive = np.ones(B, dtype=bool)
    prompt_lengths = prompt_mask.sum(axis=1).astype(np.int64)

    start = time.perf_counter()
    with step_range(p, backend.num_layers, B):
        logits = backend.prefill(ids, position_ids(prompt_mask), mask)
    budget, column = backend.num_layers, p
    for step in plan.steps[: opts.max_new_tokens - 1] + (None,):
        tokens = sampler(logits)
        # finished rows keep running (static batch) on the pad token; their outputs are dropped
        emitted = tuple(int(t) if a else None for t, a in zip(tokens, alive, strict=True))
        yield StepEvent(column=column, budget=budget, tokens=emitted, elapsed_s=time.perf_counter() - start)
        alive &= ~np.isin(tokens, list(stops))
        if step is None or not alive.any():
            return
        tokens = np.where(alive, tokens, pad_id).astype(np.int64)
        c = step.column
        mask[:, c] = 1
        pos = prompt_lengths + (c - p)  # real tokens before column c: O(B), not a pass over the mask
        with step_range(c + 1, step.bucket, B):  # the column this pass produces, as in StepEvent
            logits = backend.decode(tokens, pos, mask, step)
        budget, column = step.bucket, c + 1


def collect(events: Iterator[StepEvent], batch: int, opts: GenerateOptions) -> list[Generation]:
    """Fold a stream of step events into one `Generation` per row."""
    out = [Generation(tokens=[], budgets=[]) for _ in range(batch)]
    for ev in events:
        for gen, tok in zip(out, ev.tokens, strict=True):
            if tok is None:
                continue
            gen.tokens.append(tok)
            gen.budgets.append(ev.budget)
            if tok == opts.eos_token_id:
                gen.finish_reason = "eos"
            elif tok in opts.stop_token_ids:
                gen.finish_reason = "stop"
    return out


class Generator:
    """A backend plus the model facts the loop needs; the public face of both the reference and the runtime."""

    def __init__(self, backend: StepBackend, codec, pad_token_id: int, eos_token_id: int | None,
                 vocab_size: int) -> None:
        self.backend = backend
        self.codec = codec  # TextCodec or None (models without a tokenizer take token ids only)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise InputError("this model has no tokenizer: pass prompt token ids instead of text")
        return self.codec.encode(text)

    def stream(self, prompts: Sequence[Sequence[int]], opts: GenerateOptions) -> Iterator[StepEvent]:
        """Yield one `StepEvent` per produced column (tokens of all rows, None for finished rows)."""
        return stream_generation(self.backend, prompts, opts, self.pad_token_id, self.vocab_size)

    def generate(self, prompts: Sequence[Sequence[int]], opts: GenerateOptions) -> list[Generation]:
        results = collect(self.stream(prompts, opts), len(prompts), opts)
        if self.codec is not None:
            for r in results:
                r.text = self.codec.decode(r.tokens)
        return results
