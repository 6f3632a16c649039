"""The request model: what to generate (`GenerateOptions`), what comes back while it runs (`TokenEvent` per token,
then one `FinishEvent`) and at the end (`Generation`), and the checks every request passes at the boundary. Shared by
the static path (runtime/generator.py), continuous batching (runtime/batcher.py, runtime/service.py) and the PyTorch
reference. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError, check_int
from .logprobs import MAX_LOGPROBS, TokenLogprob
from .sampling import SamplingParams
from .schedule import Schedule, schedule_for
from .slot_backend import MAX_VERIFY_TOKENS
from .speculative import DEFAULT_DRAFT_SPEEDUP

DRAFT_WEIGHTS = ("quantized", "float")


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
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k most likely alternatives
    # Lossless mode (self-speculative decoding): the output is full-depth decoding's (greedy: the same tokens;
    # sampling: the same distribution); a shallow bucket drafts `draft_tokens` tokens per round and one full-depth
    # pass checks them. None picks the engine's automatic policy (`DraftPolicy`: measured on the model at export).
    lossless: bool = False
    draft_speedup: float | None = None  # the draft bucket: the smallest exported one with >= num_layers / this
    draft_tokens: int | None = None
    # Which weights draft: "quantized" (the engine's int8/int4 draft graph of the draft bucket), "float" (the bucket
    # itself). Either way the verify pass runs the float weights, so greedy tokens are full depth's and sampled ones
    # have its distribution. None: greedy requests draft quantized where the engine has a draft graph for the bucket
    # (a draft step reads fewer bytes of weights); sampled requests draft float, because the int8 rounding of the
    # activations magnifies the float noise that batching adds, and a seeded request would then not always give
    # the same tokens alone and batched (`draft_quantized`).
    draft_weights: str | None = None

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, lo=1)
        if not isinstance(self.lossless, bool):
            raise InputError(f"lossless={self.lossless!r} must be true or false")
        if self.lossless and (self.speedup not in (None, 1, 1.0) or self.max_layers is not None
                              or self.min_layers is not None):
            raise InputError(f"lossless decoding runs at full depth: speedup={self.speedup}, max_layers="
                             f"{self.max_layers}, min_layers={self.min_layers} pick a SkipDecode schedule; use "
                             "draft_speedup to choose the draft depth")
        if not self.lossless and (self.draft_speedup is not None or self.draft_tokens is not None
                                  or self.draft_weights is not None):
            raise InputError("draft_speedup, draft_tokens and draft_weights apply to lossless decoding only "
                             "(lossless=true)")
        if self.draft_weights is not None and self.draft_weights not in DRAFT_WEIGHTS:
            raise InputError(f"draft_weights={self.draft_weights!r} is not one of {list(DRAFT_WEIGHTS)}")
        if self.draft_tokens is not None:
            check_int("draft_tokens", self.draft_tokens, lo=1, hi=MAX_VERIFY_TOKENS - 1)
        d = self.draft_speedup
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d)
                              or d <= 1):
            raise InputError(f"draft_speedup={d!r} must be a number > 1 (the draft runs num_layers / draft_speedup "
                             "layers)")
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.max_length is not None:
            check_int("max_length", self.max_length, lo=2)

    def for_row(self, row: int) -> GenerateOptions:
        """Options of row `row` of a static batch: a given seed becomes seed + row, so rows sample independently
        and row i of a batch gives the same tokens as the same prompt run alone (or served) with seed + i."""
        if self.sampling.seed is None or row == 0:
            return self
        return replace(self, sampling=replace(self.sampling, seed=self.sampling.seed + row))

    def schedule(self, num_layers: int, backend_warmup: int | None = None) -> Schedule:
        """The schedule for a backend; an engine's graphs exist for one warm-up only."""
        w = self.warmup_layers
        if backend_warmup is not None and w is not None and w != backend_warmup:
            raise InputError(f"warmup_layers={w} differs from the {backend_warmup} this engine was exported with")
        w = w if w is not None else (backend_warmup if backend_warmup is not None else 1)
        return schedule_for(num_layers, self.speedup, self.max_layers, self.min_layers, w)


@dataclass(frozen=True)
class TokenEvent:
    """Token number `index` of request `request_id` (a static batch's row number), produced by `budget` layers."""

    request_id: int
    index: int
    token: int
    budget: int
    logprob: TokenLogprob | None = None  # only when the request asked for logprobs


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request: why it ended, and lossless mode's draft counts."""

    request_id: int
    reason: str  # "eos" | "stop" | "length" | "error" (the batcher's); "cancelled" | "timeout" (a Service's)
    error: str | None = None  # what went wrong, for reason "error"
    drafted: int = 0  # lossless mode: tokens the request's drafts proposed, and how many the full model accepted
    accepted: int = 0


@dataclass
class Generation:
    """One request's result, whichever way it ran (`Engine.generate`, a `Service`): generated ids, the layers
    executed for each (its own bucket; the prefill's token: all layers), why it stopped, its text when the model has
    a tokenizer, per-token logprobs when asked, and lossless mode's draft counts."""

    tokens: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length" | "cancelled" | "timeout"
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None  # per token, when the options asked for logprobs
    drafted: int = 0  # lossless mode: tokens drafted by the shallow graph, and how many the full model accepted
    accepted: int = 0
    request_id: int | None = None  # a Service's request id (a static batch: the row)
    prompt: tuple[int, ...] = ()

    def add(self, event: TokenEvent | FinishEvent) -> None:
        """Fold one event of this request into the result."""
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token)
            self.budgets.append(event.budget)
            if event.logprob is not None:
                if self.logprobs is None:
                    self.logprobs = []
                self.logprobs.append(event.logprob)
        else:
            self.finish_reason, self.drafted, self.accepted = event.reason, event.drafted, event.accepted


def draft_bucket(num_layers: int, buckets: Sequence[int], draft_speedup: float | None) -> int:
    """The draft graph of lossless mode: the smallest exported bucket with at least num_layers / draft_speedup layers
    (never the full depth: that would be a draft as slow as its check)."""
    s = draft_speedup if draft_speedup is not None else DEFAULT_DRAFT_SPEEDUP
    shallow = sorted(b for b in buckets if b < num_layers)
    if not shallow:
        raise InputError(f"lossless decoding drafts with a bucket below full depth; this engine exports only "
                         f"{list(buckets)}: export it with --speedups")
    want = math.ceil(num_layers / s - 1e-9)
    return next((b for b in shallow if b >= want), shallow[-1])


def draft_quantized(bucket: int, draft_buckets: Sequence[int], draft_weights: str | None, greedy: bool) -> bool:
    """Whether a lossless request drafts with the quantized draft graph of `bucket` (`GenerateOptions.draft_weights`;
    None: greedy requests where the engine has one). Asking for quantized drafts the engine lacks is an input error.

    Why sampled requests draft float by default: a sampled row's drafts decide which tokens it emits (the
    acceptance test compares their probabilities), so its tokens follow every bit of its draft logits. Batching
    changes the float K/V of a row by ~1e-6 (a left-padded prefill, the several-row verify graph); float drafts pass
    that on unchanged, but an activation near an int8 rounding boundary turns it into a whole rounding step. On the
    embedded model, seeded rows sampled alone and in a batch of 4 (30 tokens, 80 rows) differed in 3 rows with
    quantized drafts and in none with float ones. Greedy tokens are the verifier's argmax whatever the drafts."""
    if draft_weights == "float":
        return False
    if bucket in draft_buckets:
        return draft_weights == "quantized" or greedy
    if draft_weights == "quantized":
        have = f"buckets {list(draft_buckets)}" if draft_buckets else "none"
        raise InputError(f"draft_weights='quantized': this engine has no quantized draft graph for the draft bucket "
                         f"{bucket} (it has {have}); export it with --drafts int8, or pick another draft_speedup")
    return False


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
        what = f"max_length {T}" if opts.max_length is not None else \
            f"prompt length {prompt_length} + max_new_tokens {opts.max_new_tokens} = {needed}"
        raise InputError(f"{what} is above the model's limit of {limit} positions")
    return T
