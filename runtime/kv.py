"""KV memory: the one owner of KV slots (`SlotTable`) and of every key/value buffer (`KVCache`).

Layout (ragged, runtime/contract.py): per layer one K and one V buffer [slots, heads, max_length, head_dim]. Slot i
is row i of every buffer; a sequence's tokens sit at columns [0, n) of its slot with no padding, so rows of one
graph call may have different lengths.

`SlotTable` says which slots are taken and how many tokens each holds. Every generation on a backend (a static
`Engine.stream`, each request of a `Service`) takes its slots from the backend's one table and gives them back when
it ends, so concurrent generations never share a slot. Lengths are written only by the backend's slot API
(prefill_rows sets them, decode_rows advances the rows it runs), so they are always what the buffers hold.

`KVCache` owns the buffers of a compiled backend, in host or device memory (a `memory` with the `HostRuntime`
/`CudaRuntime` interface of runtime/device.py). Writers: the prefill's K/V are copied into each prompt's slot once
(`write_prompts`); after that the gqa decode graphs write the new column themselves, in place, and for the matmul
flavour the backend moves the graph's staged new K/V into place (`write_new`: B*H*D elements, not the cache).
Nothing is reallocated or concatenated per step. Buffers start zeroed and afterwards only ever hold real K/V
values, so any column a graph reads is finite (a NaN there would poison a masked softmax even with zero weight).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from .device import column_copies, prefill_copies, span_copies
from .errors import EngineError, InputError, check_int


def check_memory(nbytes: int, available: int | None, slots: int, max_length: int) -> None:
    """Refuse a KV cache larger than the memory available now (None: unknown, not checked)."""
    if available is not None and nbytes > available:
        raise EngineError(f"the KV cache of {slots} slots x {max_length} columns needs {nbytes} bytes "
                          f"({nbytes / 2**30:.1f} GiB) but only {available} bytes ({available / 2**30:.1f} GiB) are "
                          "available: load the engine with a smaller max_batch or max_length")


class SlotsExhaustedError(InputError):
    """Fewer KV slots are free than a generation needs (others hold them: a live stream or a Service)."""


class SlotTable:
    """Owner of KV slots 0..slots-1 and of their token counts. Thread-safe.

    Hands out the lowest free slots so used rows stay packed at the front: a decode call covers slots 0..k-1 where
    k - 1 is its highest slot, so a compact prefix keeps the rows a call pays for small."""

    def __init__(self, slots: int) -> None:
        self.slots = check_int("slots", slots, lo=1)
        self.lengths = np.zeros(slots, dtype=np.int64)  # tokens held per slot; 0 for free slots
        self._free = set(range(slots))
        self._lock = threading.Lock()

    def allocate(self, n: int = 1) -> list[int]:
        """Take the `n` lowest free slots, all or none."""
        with self._lock:
            if n > len(self._free):
                raise SlotsExhaustedError(
                    f"{n} KV slot(s) needed but {len(self._free)} of {self.slots} are free: the others are held by "
                    "other generations on this engine (a live stream or a Service); finish or close them, or load "
                    "the engine with a larger max_batch")
            taken = sorted(self._free)[:n]
            self._free.difference_update(taken)
            self.lengths[taken] = 0
            return taken

    def free(self, slots: Sequence[int]) -> None:
        with self._lock:
            bad = [s for s in slots if s in self._free or not 0 <= s < self.slots]
            if bad:
                raise InputError(f"slot {bad[0]} is not allocated (slots 0..{self.slots - 1})")
            self._free.update(slots)
            self.lengths[list(slots)] = 0

    def check_taken(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < self.slots:
                    raise InputError(f"slot {s!r} is outside 0..{self.slots - 1}")
                if s in self._free:
                    raise InputError(f"slot {s} is not allocated: take slots with SlotTable.allocate first")

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)


class KVCache:
    """Per-layer K/V buffers (and, for the matmul flavour, staging for one new column per row) in `memory`."""

    def __init__(self, memory, num_layers: int, heads: int, head_dim: int, slots: int, max_length: int, dtype: str,
                 staging: bool) -> None:
        self.memory = memory
        self.shape = (slots, heads, max_length, head_dim)
        self.dtype = np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.layer_bytes = int(np.prod(self.shape)) * self.itemsize
        staged = slots * heads * head_dim * self.itemsize if staging else 0
        self.nbytes = num_layers * 2 * (self.layer_bytes + staged)
        check_memory(self.nbytes, memory.available_bytes(), slots, max_length)
        # zeroed: see the module docstring
        self.keys = [memory.malloc(self.layer_bytes) for _ in range(num_layers)]
        self.values = [memory.malloc(self.layer_bytes) for _ in range(num_layers)]
        self.new_keys = [memory.malloc(staged) for _ in range(num_layers)] if staging else []
        self.new_values = [memory.malloc(staged) for _ in range(num_layers)] if staging else []
        self.span_keys: list[int] = []  # verify staging (reserve_span)
        self.span_values: list[int] = []
        self.span_tokens = 0
        self._views: dict = {}  # host-memory views for write_spans, per new-token count
        memory.synchronize()

    def write_prompts(self, layer: int, key_src: int, value_src: int, lengths: Sequence[int], slots: Sequence[int],
                      seq: int) -> None:
        """Left-padded prefill K/V [B, H, seq, D] at `key_src`/`value_src` -> columns [0, len_b) of slot slots[b]."""
        _, H, T, D = self.shape
        plan = prefill_copies(lengths, slots, seq, H, D, T, self.itemsize)
        self.memory.copy2d(self.keys[layer], key_src, plan)
        self.memory.copy2d(self.values[layer], value_src, plan)

    def write_new(self, layer: int, rows: Sequence[int], columns: Sequence[int]) -> None:
        """Move staged K/V of `rows` (row r = slot r) into column columns[r] (matmul flavour only)."""
        _, H, T, D = self.shape
        plan = column_copies(rows, columns, H, D, T, self.itemsize)
        self.memory.copy2d(self.keys[layer], self.new_keys[layer], plan)
        self.memory.copy2d(self.values[layer], self.new_values[layer], plan)

    def reserve_span(self, tokens: int) -> None:
        """Staging for the verify graph's new K/V of up to `tokens` columns per slot [slots, H, tokens, D] (lossless
        mode only: allocated on its first use, kept until close)."""
        if tokens <= self.span_tokens:
            return
        for ptr in (*self.span_keys, *self.span_values):
            self.memory.free(ptr)
        slots, H, _, D = self.shape
        nbytes = slots * H * tokens * D * self.itemsize
        self._views = {}
        self.span_keys = [self.memory.malloc(nbytes) for _ in self.keys]
        self.span_values = [self.memory.malloc(nbytes) for _ in self.keys]
        self.span_tokens = tokens
        self.memory.synchronize()

    def write_spans(self, rows: Sequence[int], columns: Sequence[int], counts: Sequence[int], seq: int) -> None:
        """Every layer: move the first counts[r] of `seq` staged verify columns of `rows` (row r = slot r) to columns
        columns[r] .. of slot r (one copy plan for all layers)."""
        _, H, T, D = self.shape
        plan = span_copies(rows, columns, counts, seq, H, D, T, self.itemsize)  # validates, whatever the memory
        if hasattr(self.memory, "as_array"):  # host memory: one numpy slice assignment per row and buffer
            self._write_spans_host(rows, columns, counts, seq)
            return
        for layer in range(len(self.keys)):
            self.memory.copy2d(self.keys[layer], self.span_keys[layer], plan)
            self.memory.copy2d(self.values[layer], self.span_values[layer], plan)

    def _write_spans_host(self, rows, columns, counts, seq: int) -> None:
        slots, H, T, D = self.shape
        pairs = self._views.get(seq)
        if pairs is None:  # staged K/V of a call with `seq` new tokens: [n, H, seq, D] from the buffer's start
            as_array = self.memory.as_array
            pairs = self._views[seq] = [
                (as_array(dst, self.shape, self.dtype), as_array(src, (slots, H, seq, D), self.dtype))
                for dst, src in (*zip(self.keys, self.span_keys, strict=True),
                                 *zip(self.values, self.span_values, strict=True))]
        for r in map(int, rows):
            c, n = int(columns[r]), int(counts[r])
            for dst, src in pairs:
                dst[r, :, c: c + n] = src[r, :, :n]

    def read(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's K and V [slots, H, T, D] (tests and parity checks; not on the decode path)."""
        out = tuple(np.empty(self.shape, dtype=self.dtype) for _ in range(2))
        self.memory.d2h(out[0], self.keys[layer])
        self.memory.d2h(out[1], self.values[layer])
        self.memory.synchronize()
        return out

    def close(self) -> None:
        for ptr in (*self.keys, *self.values, *self.new_keys, *self.new_values, *self.span_keys, *self.span_values):
            self.memory.free(ptr)
        self.keys, self.values, self.new_keys, self.new_values = [], [], [], []
        self.span_keys, self.span_values, self.span_tokens, self._views = [], [], 0, {}
