"""`Generator`: the static face of a backend. `generate`/`stream` run a batch of prompts through the one generation
loop (runtime/batcher.py) as a batcher that admits all of them at once.

Every row is a request of its own: its schedule from its own prompt length and max length, its own sampler (seed +
row, `GenerateOptions.for_row`), its own stop rules and its own KV slot from the backend's slot table. So a prompt
gives the same tokens alone, in a batch, or served by a `Service`. Generations on one backend may overlap (two live
streams, a stream and a `Service`): each holds its own slots, graph calls are serialized by the backend, and a
generation that finds no free slot fails with `SlotsExhaustedError` instead of waiting forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .batcher import Batcher, Request, prepare_request
from .errors import BackendError, InputError
from .kv import SlotsExhaustedError
from .request import FinishEvent, GenerateOptions, Generation, TokenEvent, check_prompts
from .scheduler import SchedulerConfig
from .slot_backend import SlotBackend


class NonFiniteLogitsError(BackendError):
    """A graph produced NaN or inf logits: corrupt weights or an overflow, never a token."""


class Generator:
    """A backend plus the model facts the loop needs; the public face of both the reference and the runtime."""

    def __init__(self, backend: SlotBackend, codec, pad_token_id: int, eos_token_id: int | None,
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

    def stream(self, prompts: Sequence[Sequence[int]], opts: GenerateOptions) -> Iterator[TokenEvent | FinishEvent]:
        """Yield a `TokenEvent` for every token as it is produced (`request_id` is the prompt's row) and one
        `FinishEvent` per row when it ends. Prompts and options are checked here, before anything runs; KV slots are
        taken at the first step and given back when the stream ends or is closed."""
        check_prompts(prompts, self.vocab_size, self.backend.max_batch)
        requests = [prepare_request(row, prompt, opts.for_row(row), self.backend, self.vocab_size)
                    for row, prompt in enumerate(prompts)]
        return self._run(requests)

    def generate(self, prompts: Sequence[Sequence[int]], opts: GenerateOptions) -> list[Generation]:
        out = [Generation(request_id=row, prompt=tuple(int(t) for t in p)) for row, p in enumerate(prompts)]
        for ev in self.stream(prompts, opts):
            out[ev.request_id].add(ev)
        if self.codec is not None:
            for r in out:
                r.text = self.codec.decode(r.tokens)
        return out

    def _run(self, requests: list[Request]) -> Iterator[TokenEvent | FinishEvent]:
        B = len(requests)
        config = SchedulerConfig(max_batch=B, max_tokens_in_flight=sum(r.spec.reserved_tokens for r in requests))
        batcher = Batcher(self.backend, config)
        for r in requests:
            batcher.add(r)
        try:
            while not batcher.idle:
                result = batcher.step()
                if not result.events and not result.prefill_tokens:  # nothing ran: other generations hold every slot
                    raise SlotsExhaustedError(f"no KV slot of {self.backend.max_batch} is free for this batch of "
                                              f"{B}: other generations on this engine hold them")
                for ev in result.events:
                    if isinstance(ev, FinishEvent) and ev.reason == "error":
                        raise NonFiniteLogitsError(f"row {ev.request_id}: {ev.error}")
                    yield ev
        finally:
            batcher.reset()


@dataclass(frozen=True)
class TimedGeneration:
    """A static generation with its timing: `prefill_s` from the call to the first token (prefill and its
    sampling), `decode_s` from the first token to the last, `total_s` the whole call."""

    results: list[Generation]
    prefill_s: float
    decode_s: float
    total_s: float


def timed_generate(generator: Generator, prompts: Sequence[Sequence[int]], opts: GenerateOptions) -> TimedGeneration:
    """`generator.generate` timed from its events as they arrive (what the benchmarks and the demo measure)."""
    t0 = time.perf_counter()
    out = [Generation(request_id=row, prompt=tuple(int(t) for t in p)) for row, p in enumerate(prompts)]
    first, last = None, t0
    for ev in generator.stream(prompts, opts):
        out[ev.request_id].add(ev)
        if isinstance(ev, TokenEvent):
            last = time.perf_counter()
            first = first if first is not None else last
    end = time.perf_counter()
    first = first if first is not None else last
    return TimedGeneration(out, first - t0, last - first, end - t0)
