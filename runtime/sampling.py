"""Token selection from logits, in numpy, shared by every backend.

Both the PyTorch reference and the compiled runtime call `Sampler`, so for equal logits and seed they pick
equal tokens. Every sequence owns one `Sampler` (one `numpy.random.Generator`, seeded once from its own
`SamplingParams.seed`); each step draws one uniform number and inverts the CDF, so the draw sequence does not depend
on which tokens were kept, nor on the other sequences of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

# Temperatures below this are greedy. softmax(logits / t) already puts all mass on the argmax unless two logits are
# within ~t of each other, and below ~1e-306 the division overflows float64 (inf - inf = NaN picked token 0).
GREEDY_BELOW = 1e-6


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below GREEDY_BELOW) means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not _number(t) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"top_k={k!r} must be an integer >= 0 (0 = disabled)")
        if not _number(p) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise InputError(f"top_p={p!r} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise InputError(f"seed={self.seed!r} must be a non-negative integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Picks one token per row. Owns the random generator of one sequence (or of the rows it is called with)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        # logits: [B, V] -> token ids: [B] int64
        assert logits.ndim == 2, logits.shape
        if self.params.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row, self._rng.random()) for row in logits], dtype=np.int64)

    # -- speculative sampling (lossless mode): distributions as dense vectors --------------------------------------
    def probs(self, row: np.ndarray) -> np.ndarray:
        """The distribution this sampler draws from for logits `row` [V], after temperature, top-k and top-p, as a
        dense float64 vector (zeros outside the kept tokens). Not for greedy samplers."""
        p = self.params
        if p.top_k or p.top_p < 1.0:
            out = np.zeros(len(row), dtype=np.float64)
            order, probs = self._kept(row)
            out[order] = probs
            return out
        out = np.exp((row.astype(np.float64) - float(row.max())) / p.temperature)  # no sort without filters
        return out / out.sum()

    def uniform(self) -> float:
        return float(self._rng.random())

    def draw(self, probs: np.ndarray) -> int:
        """One token from a dense distribution (inverse CDF of one uniform number in [0, 1): the first index whose
        cumulative mass exceeds it, which has mass of its own)."""
        cdf = np.cumsum(probs)
        return min(int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right")), len(probs) - 1)

    def _kept(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens top-k and top-p keep, most likely first, and their renormalised probabilities."""
        p = self.params
        scores = (row.astype(np.float64) - float(row.max())) / p.temperature  # <= 0: exp cannot overflow
        order = np.argsort(-scores, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        return order, probs

    def _sample_row(self, row: np.ndarray, u: float) -> int:
        order, probs = self._kept(row)
        idx = min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(order) - 1)
        return int(order[idx])
