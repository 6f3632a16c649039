"""Log-probabilities of tokens: of each generated token (the batcher, from the logits its sampler used) and of a
prompt's tokens (teacher-forced scoring at full depth through the slot API). Nothing here imports torch.

A `TokenLogprob` is the log-softmax, in float64, of the model's raw logits (before temperature, top-k or top-p:
those shape only the sampling), at the token and at the `k` most likely tokens of that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely tokens, most likely first (ties: lower id first)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[V] float32 -> [V] float64 log-softmax."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def top_k(ls: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of `ls`, largest first, ties by lower id, without sorting the vocabulary
    (a partition, then a sort of k entries)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, ls.size)
    threshold = ls[np.argpartition(-ls, k - 1)[:k]].min()
    above = np.flatnonzero(ls > threshold)
    ties = np.flatnonzero(ls == threshold)[: k - len(above)]
    ids = np.concatenate([above, ties])
    return ids[np.lexsort((ids, -ls[ids]))]


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` ([V] or [1, V]) and the top `k` alternatives."""
    ls = log_softmax(logits)
    return TokenLogprob(int(token), float(ls[token]), tuple((int(t), float(ls[t])) for t in top_k(ls, k)))


# Prompt tokens one scoring chunk feeds: one verify call at full depth (runtime/slot_backend.py MAX_VERIFY_TOKENS).
SCORE_CHUNK = 16


class PromptScore:
    """Teacher-forced log-probabilities of prompt[1:] at full depth, computed a chunk at a time in a KV slot of its
    own, so a long prompt is work the service interleaves with decode steps instead of one long stall.

    `advance(backend)`: the first call takes a free slot (False while none is free) and prefills prompt[0]; each
    later call feeds the next SCORE_CHUNK tokens in one full-depth verify pass, which returns every position's
    logits (`SlotBackend.feed`, which chunked prefill uses too; backends without a verify graph: one decode step per
    token). `done` once every token is scored;
    `release(backend)` gives the slot back (call it however the job ends)."""

    def __init__(self, prompt: Sequence[int], k: int) -> None:
        self.prompt, self.k = tuple(int(t) for t in prompt), k
        self.result: list[TokenLogprob] = []
        self.slot: int | None = None
        self.fed = 0  # tokens of the prompt in the slot

    @property
    def done(self) -> bool:
        return len(self.result) == max(0, len(self.prompt) - 1)

    def advance(self, backend) -> bool:
        """One chunk of work; -> False when it could not start (no free slot)."""
        p, L = self.prompt, backend.num_layers
        if self.done:
            return True
        if self.slot is None:
            if L not in backend.buckets:
                raise InputError(f"this backend has no full-depth bucket ({L} layers) to score a prompt with")
            if backend.slots.num_free == 0:
                return False
            self.slot = backend.slots.allocate(1)[0]
            logits = backend.prefill_rows([list(p[:1])], [self.slot])
            self.fed = 1
            self.result.append(token_logprob(logits[0], p[1], self.k))
            return True
        n = min(SCORE_CHUNK, len(p) - 1 - self.fed)
        logits = backend.feed(self.slot, p[self.fed: self.fed + n])  # the slot API's full-depth append
        for j in range(n):
            self.result.append(token_logprob(logits[j], p[self.fed + j + 1], self.k))
        self.fed += n
        return True

    def release(self, backend) -> None:
        if self.slot is not None:
            backend.slots.free([self.slot])
            self.slot = None


def score_prompt(backend, prompt: Sequence[int], k: int) -> list[TokenLogprob]:
    """Score the whole prompt at once (outside a service): -> one entry per token of prompt[1:]."""
    job = PromptScore(prompt, k)
    try:
        while not job.done:
            if not job.advance(backend):
                raise InputError("no free KV slot to score the prompt in: every slot is held by other generations")
        return job.result
    finally:
        job.release(backend)
