"""`speculative_accept`, the acceptance rule of lossless rounds, on hand-made logits (no backend)."""

from __future__ import annotations

import numpy as np
import pytest
from skipdecode.runtime.sampling import Sampler, SamplingParams
from skipdecode.runtime.speculative import speculative_accept

V = 5


def _logits(*argmaxes: int) -> np.ndarray:
    """[len, V] logits whose rows peak at the given tokens."""
    out = np.zeros((len(argmaxes), V), dtype=np.float32)
    out[np.arange(len(argmaxes)), argmaxes] = 5.0
    return out


def test_greedy_keeps_the_agreeing_prefix_then_the_full_models_token():
    greedy = Sampler(SamplingParams())
    # the full model would say 3, 1, 4, then 2 after the last draft
    target = _logits(3, 1, 4, 2)
    all_kept = speculative_accept([3, 1, 4], [], target, greedy)
    assert (all_kept.accepted, all_kept.next_token, all_kept.bonus) == ((3, 1, 4), 2, True)
    rejected = speculative_accept([3, 0, 4], [], target, greedy)
    assert (rejected.accepted, rejected.next_token, rejected.bonus) == ((3,), 1, False)
    assert rejected.tokens == (3, 1)
    first = speculative_accept([4, 1, 4], [], target, greedy)
    assert first.tokens == (3,)  # the first draft rejected: the round still emits the full model's token
    assert speculative_accept([], [], target, greedy).tokens == (3,)  # no drafts: one full-depth token


def test_a_non_finite_target_row_ends_the_round_there():
    target = _logits(3, 1, 4, 2)
    target[1, 0] = np.nan
    got = speculative_accept([3, 1, 4], [], target, Sampler(SamplingParams()))
    assert got.accepted == (3,) and not got.bonus  # the caller sees the NaN row at position 1 and reports it


def _draws(q, target, n=20000, seed=0):
    """Emitted first tokens over n independent rounds of one draft."""
    counts = np.zeros(V)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
    logits = np.log(np.vstack([target, target]))
    for _ in range(n):
        d = int(sampler.draw(q))
        counts[speculative_accept([d], [q], logits, sampler).tokens[0]] += 1
    return counts / n


@pytest.mark.parametrize("q", [np.array([0.6, 0.1, 0.1, 0.1, 0.1]), np.array([0.05, 0.05, 0.1, 0.2, 0.6])])
def test_sampled_rounds_emit_the_full_models_distribution(q):
    """The first emitted token is distributed as the target p whatever the draft q (4 standard errors)."""
    p = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    got = _draws(q, p)
    assert np.abs(got - p).max() < 4 * np.sqrt(0.25 / 20000)
    # negative control: the draft's own tokens are distributed as q, which this check tells apart from p
    assert np.abs(q - p).max() > 4 * np.sqrt(0.25 / 20000)


def test_a_draft_equal_to_the_target_is_always_accepted():
    p = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    logits = np.log(np.vstack([p, p]))
    assert all(speculative_accept([d], [p], logits, sampler).bonus for d in range(V))
