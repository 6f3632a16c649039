"""Lossless mode's acceptance rule, apart from any backend: which tokens one self-speculative round emits.

A round of one row: the draft bucket proposed `drafts` (sampled from the draft distributions `draft_probs`, or its
argmax when greedy); one full-depth verify pass gave `target_logits[i]`, the full model's prediction after the fed
token and the first i drafts. The round emits (docs/DESIGN.md, glossary):

* the *accepted* drafts: the longest prefix the full model agrees with. Greedy: each draft equals the full model's
  argmax. Sampling: draft d is kept with probability min(1, p(d) / q(d)) (standard speculative sampling);
* then exactly one more token: the *recovered* token at the first rejected draft (greedy: the full model's argmax;
  sampling: a draw from the residual max(p - q, 0), renormalised), or the *bonus* token when every draft was
  accepted (the full model's own next token after the last draft).

So greedy rounds emit exactly full-depth decoding's tokens, and sampled rounds tokens distributed exactly as
full-depth sampling. A non-finite target row ends the round at that position with its argmax; the caller reports it
as an error, never as a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import EngineError, InputError, check_int
from .sampling import Sampler

# What the manifest's `lossless` section holds for engines exported before the export measured it, and for backends
# without a manifest: 4 tokens from the 3x bucket, a round ending at a draft token below 0.6 probability (chosen on
# the embedded model, docs/DESIGN.md §9).
DEFAULT_DRAFT_SPEEDUP = 3.0
DEFAULT_DRAFT_TOKENS = 4
DEFAULT_STOP_BELOW = 0.6
MAX_POLICY_TOKENS = 15  # a round verifies the fed token and its drafts in one call of at most 16 columns


@dataclass(frozen=True)
class DraftPolicy:
    """How a lossless request drafts when it asks for nothing in particular (an engine property: the export times
    candidate policies on the model and records the fastest, export/lossless_tune.py).

    `tokens` drafts per round from the bucket of `draft_speedup`; a round ends early at a draft token its draft gives
    less than `stop_below` probability (None: never early). `tokens` 0: drafting did not pay on this engine when it
    was measured, so automatic requests decode at full depth (the same output; an explicit `draft_tokens` still
    drafts). Every choice here only picks between exact ways to full depth's output."""

    draft_speedup: float = DEFAULT_DRAFT_SPEEDUP
    tokens: int = DEFAULT_DRAFT_TOKENS
    stop_below: float | None = DEFAULT_STOP_BELOW

    def __post_init__(self) -> None:
        if isinstance(self.draft_speedup, bool) or not isinstance(self.draft_speedup, (int, float)) \
                or not 1.0 < self.draft_speedup <= 1000:
            raise EngineError(f"lossless draft_speedup={self.draft_speedup!r} must be a number in (1, 1000]")
        check_int("lossless draft_tokens", self.tokens, lo=0, hi=MAX_POLICY_TOKENS, error=EngineError)
        if self.stop_below is not None and (isinstance(self.stop_below, bool)
                                            or not isinstance(self.stop_below, (int, float))
                                            or not 0.0 < self.stop_below < 1.0):
            raise EngineError(f"lossless stop_below={self.stop_below!r} must be null or a probability in (0, 1)")

    def as_dict(self) -> dict:
        return {"draft_speedup": float(self.draft_speedup), "draft_tokens": self.tokens,
                "stop_below": self.stop_below}

    @classmethod
    def parse(cls, text: str) -> DraftPolicy:
        """`TOKENS:SPEEDUP[:STOP]` (`skipdecode export --lossless-policy 4:3`, `4:3:0.6`); InputError otherwise."""
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            return cls(float(parts[1]), int(parts[0]), float(parts[2]) if len(parts) == 3 else None)
        except (ValueError, EngineError) as exc:
            detail = f": {exc}" if isinstance(exc, EngineError) else ""
            raise InputError(f"lossless policy {text!r} is not TOKENS:SPEEDUP[:STOP] (e.g. 4:3 or 4:3:0.6){detail}"
                             ) from None


@dataclass(frozen=True)
class Acceptance:
    accepted: tuple[int, ...]  # the drafts kept, in order
    next_token: int  # the recovered token (a draft was rejected) or the bonus token (all accepted)
    bonus: bool  # every draft was accepted

    @property
    def tokens(self) -> tuple[int, ...]:
        """What the round emits, in order."""
        return (*self.accepted, self.next_token)


def speculative_accept(drafts: Sequence[int], draft_probs: Sequence[np.ndarray], target_logits: np.ndarray,
                       sampler: Sampler) -> Acceptance:
    """drafts: k drafted tokens; draft_probs: their k draft distributions (sampling only; ignored when greedy);
    target_logits: [>= k + 1, V] full-depth logits after the fed token and each draft. -> the round's tokens."""
    greedy = sampler.params.greedy
    for i, d in enumerate(drafts):
        p = target_logits[i]
        if not np.isfinite(p.max()):
            return Acceptance(tuple(drafts[:i]), int(np.argmax(p)), False)
        if greedy:
            best = int(np.argmax(p))
            if best != d:
                return Acceptance(tuple(drafts[:i]), best, False)
        else:
            target, q = sampler.probs(p), draft_probs[i]
            if sampler.uniform() * q[d] >= target[d]:  # rejected with probability 1 - min(1, p(d) / q(d))
                residual = np.maximum(target - q, 0.0)
                total = residual.sum()
                return Acceptance(tuple(drafts[:i]), sampler.draw(residual / total if total > 0 else target), False)
    last = target_logits[len(drafts)]
    if greedy or not np.isfinite(last.max()):
        return Acceptance(tuple(drafts), int(np.argmax(last)), True)
    return Acceptance(tuple(drafts), sampler.draw(sampler.probs(last)), True)
