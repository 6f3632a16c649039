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


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` ([V] or [1, V]) and the top `k` alternatives."""
    ls = log_softmax(logits)
    top = np.argsort(-ls, kind="stable")[:k] if k else ()
    return TokenLogprob(int(token), float(ls[token]), tuple((int(t), float(ls[t])) for t in top))


def score_prompt(backend, prompt: Sequence[int], k: int) -> list[TokenLogprob]:
    """Teacher-forced log-probabilities of prompt[1:] at full depth: prefill prompt[0] into a free slot, then feed
    prompt[1], prompt[2], ... one decode step each through the full-depth bucket. Costs one decode step per prompt
    token (a prompt of p tokens: 1 prefill + p - 2 decode calls). The slot is freed before returning.

    -> one entry per token of prompt[1:] (the first token has no log-probability)."""
    p, L = len(prompt), backend.num_layers
    if p < 2:
        return []
    if L not in backend.buckets:
        raise InputError(f"this backend has no full-depth bucket ({L} layers) to score a prompt with")
    slot = backend.slots.allocate(1)
    try:
        out = [token_logprob(backend.prefill_rows([list(prompt[:1])], slot)[0], prompt[1], k)]
        gates = np.ones((1, L), dtype=bool)
        for i in range(1, p - 1):
            logits = backend.decode_rows(slot, np.array([prompt[i]], dtype=np.int64), L, gates)
            out.append(token_logprob(logits[slot[0]], prompt[i + 1], k))
        return out
    finally:
        backend.slots.free(slot)
