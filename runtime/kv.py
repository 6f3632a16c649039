"""KV memory: the one owner of every key/value buffer.

`KVArena` allocates, once per engine, K and V buffers per layer of shape [slots, heads, max_length, head_dim]
(runtime/contract.py). Row i is KV slot i; a sequence's tokens sit at columns [0, n) of its slot with no padding,
so rows of one call may have different lengths. Graphs are bound to the first `n` rows of each buffer
(`rows`: a contiguous view, no copy). Writers: the prefill copies each prompt's K/V into its slot once
(`write_prompt`); after that the gqa decode graphs write the new column themselves, in place, and for the
matmul flavour the runtime moves the graph's staged new K/V into place (`write_new`: B*H*D elements, not the
cache). Nothing is reallocated or concatenated per step.

Buffers start zeroed and afterwards only ever hold real K/V values, so any column a graph reads is finite (a NaN
there would poison a masked softmax even with zero weight).
"""

from __future__ import annotations

import numpy as np

from .errors import check_int


class KVArena:
    def __init__(self, num_layers: int, heads: int, head_dim: int, slots: int, max_length: int, dtype: str,
                 staging: bool) -> None:
        self.shape = (slots, heads, max_length, head_dim)
        self.keys = [np.zeros(self.shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [np.zeros(self.shape, dtype=dtype) for _ in range(num_layers)]
        staged = (slots, heads, 1, head_dim) if staging else (0, heads, 1, head_dim)
        self.new_keys = [np.zeros(staged, dtype=dtype) for _ in range(num_layers)]
        self.new_values = [np.zeros(staged, dtype=dtype) for _ in range(num_layers)]

    @property
    def slots(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for group in (self.keys, self.values, self.new_keys, self.new_values) for a in group)

    def rows(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K, V of slots [0, n) of `layer`: contiguous [n, H, max_length, D] views for binding."""
        check_int("rows", n, lo=1, hi=self.slots)
        return self.keys[layer][:n], self.values[layer][:n]

    def staged(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Staging views [n, H, 1, D] the matmul-flavour graphs write a new token's K/V into."""
        return self.new_keys[layer][:n], self.new_values[layer][:n]

    def write_prompt(self, layer: int, slot: int, key: np.ndarray, value: np.ndarray) -> None:
        # key, value: [H, S, D] of one prompt without padding -> columns [0, S) of the slot
        S = key.shape[1]
        self.keys[layer][slot, :, :S] = key
        self.values[layer][slot, :, :S] = value

    def write_new(self, layer: int, rows: np.ndarray, columns: np.ndarray) -> None:
        """Move staged K/V of `rows` into their `columns` (the matmul flavour; gqa graphs write in place)."""
        self.keys[layer][rows, :, columns] = self.new_keys[layer][rows, :, 0]
        self.values[layer][rows, :, columns] = self.new_values[layer][rows, :, 0]
