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

from .sampling import Sampler


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
