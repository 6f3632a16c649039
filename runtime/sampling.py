"""Token selection from logits, in numpy, shared by every backend.

Both the PyTorch reference and the compiled runtime call `Sampler`, so for equal logits and seed they pick
equal tokens. Sampling uses one `numpy.random.Generator` per batch, seeded once; each step draws one uniform
number per row and inverts the CDF, so the draw sequence does not depend on which tokens were kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"top_k={k!r} must be an integer >= 0 (0 = disabled)")
        if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise InputError(f"top_p={p!r} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise InputError(f"seed={self.seed!r} must be a non-negative integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks one token per row. Owns the random generator of one generation call."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        # logits: [B, V] -> token ids: [B] int64
        assert logits.ndim == 2, logits.shape
        if self.params.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row, self._rng.random()) for row in logits], dtype=np.int64)

    def _sample_row(self, row: np.ndarray, u: float) -> int:
        p = self.params
        scores = row.astype(np.float64) / p.temperature
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
        idx = min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(order) - 1)
        return int(order[idx])
