"""KV memory: the one owner of every key/value buffer.

`KVArena` allocates, once per engine, a flat K and V buffer per layer for max_batch x max_length, plus the small
staging buffers the decode graphs write a new token's K/V into. A generation call carves contiguous
[B, H, T, D] views from the front of each flat buffer (`begin`); graphs read those views in place, and the
arena writes prefill K/V and each step's new column into them (`write_prefix`, `write_column`). Nothing is
reallocated or concatenated per step.

Buffers start zeroed and afterwards only ever hold real K/V values, so the masked (unwritten) columns a graph
reads are always finite: a NaN there would poison the softmax even with a zero weight.
"""

from __future__ import annotations

import numpy as np

from .errors import check_int


class KVArena:
    def __init__(self, num_layers: int, heads: int, head_dim: int, max_batch: int, max_length: int,
                 dtype: str) -> None:
        self.shape_max = (max_batch, heads, max_length, head_dim)
        n = max_batch * heads * max_length * head_dim
        self._k = [np.zeros(n, dtype=dtype) for _ in range(num_layers)]
        self._v = [np.zeros(n, dtype=dtype) for _ in range(num_layers)]
        self._new_k = [np.zeros(max_batch * heads * head_dim, dtype=dtype) for _ in range(num_layers)]
        self._new_v = [np.zeros(max_batch * heads * head_dim, dtype=dtype) for _ in range(num_layers)]
        self.keys: list[np.ndarray] = []  # per layer [B, H, T, D] views of the current call
        self.values: list[np.ndarray] = []
        self.new_keys: list[np.ndarray] = []  # per layer [B, H, 1, D] staging views
        self.new_values: list[np.ndarray] = []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for group in (self._k, self._v, self._new_k, self._new_v) for a in group)

    def begin(self, batch: int, length: int) -> None:
        """Carve this call's views. Valid until the next `begin`; the runtime is the only writer."""
        B_max, H, T_max, D = self.shape_max
        check_int("batch size", batch, lo=1, hi=B_max)
        check_int("max_length", length, lo=1, hi=T_max)
        n, m = batch * H * length * D, batch * H * D
        self.keys = [k[:n].reshape(batch, H, length, D) for k in self._k]
        self.values = [v[:n].reshape(batch, H, length, D) for v in self._v]
        self.new_keys = [k[:m].reshape(batch, H, 1, D) for k in self._new_k]
        self.new_values = [v[:m].reshape(batch, H, 1, D) for v in self._new_v]

    def write_prefix(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        # key, value: [B, H, S, D] from the prefill -> columns [0, S)
        S = key.shape[2]
        self.keys[layer][:, :, :S] = key
        self.values[layer][:, :, :S] = value

    def write_column(self, layer: int, column: int) -> None:
        """Move the staged new K/V of `layer` into `column` (B*H*D elements, not the cache)."""
        self.keys[layer][:, :, column] = self.new_keys[layer][:, :, 0]
        self.values[layer][:, :, column] = self.new_values[layer][:, :, 0]
