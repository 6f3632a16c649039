"""`SlotBackend`: the part of a compiled backend that does not depend on where graphs run.

It owns the model facts a backend exposes, the host-side gate buffer, input checking at the slot API boundary and
the mapping of static batches onto slots 0..B-1. A subclass (onnxruntime CPU, onnxruntime CUDA) implements two
primitives: `_prefill(ids, pos, mask, slots)` (full-depth prompt pass, each row's real K/V into its slot),
`_bind_decode(spec, n)` (an IOBinding of a bucket graph over slots 0..n-1, cached in `self._bindings`) and, for the
matmul flavour, `_move_new_kv(layers, gates, lengths)`; and the host buffers `_ids`, `_lengths`, `_kv_length`,
`_logits` and the `sessions` dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError, check_int
from .generation import left_pad, position_ids
from .manifest import Manifest
from .profiling import graph_range
from .schedule import Step


class SlotBackend:
    def _setup(self, man: Manifest, max_batch: int | None, max_length: int | None) -> None:
        self.manifest = man
        self.num_layers, self.warmup_layers, self.buckets = man.num_layers, man.warmup_layers, man.buckets
        self.in_place = man.attention == "gqa"
        self.max_batch = check_int("max_batch", max_batch or man.max_batch, lo=1, hi=man.max_batch)
        self.max_length = check_int("max_length", max_length or man.max_length, lo=2, hi=man.max_length)
        m = man.model
        self.vocab_size, self.heads = m["vocab_size"], m["num_heads"]
        self.head_dim = m["hidden_size"] // self.heads
        self._gate = np.zeros(self.max_batch * self.num_layers, dtype=bool)  # row-major [n, bucket] per call

    # -- static batch (StepBackend) ------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Left-padded batch -> slots 0..B-1; each row's real K/V lands at columns [0, its length)."""
        S = input_ids.shape[1]
        return self._prefill(input_ids, position_ids, attention_mask[:, :S], list(range(input_ids.shape[0])))

    def decode(self, token_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
               step: Step) -> np.ndarray:
        """Run `step.bucket` over slots 0..B-1. In the ragged layout a row's position is its token count, i.e.
        its past length; `attention_mask` is not needed. The logits view is valid until the next call."""
        n, b = len(token_ids), step.bucket
        self._gate[: n * b] = True
        return self._run(token_ids, position_ids.reshape(-1), b, None)

    # -- slot API --------------------------------------------------------------------------------------------
    def prefill_rows(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray:
        """Full-depth prefill of `prompts` into `slots` (columns [0, len)); -> last-token logits [n, V] (a copy)."""
        if len(prompts) != len(slots) or len(set(slots)) != len(slots):
            raise InputError(f"{len(prompts)} prompts need as many distinct slots, got {list(slots)}")
        for s in slots:
            check_int("slot", s, lo=0, hi=self.max_batch - 1)
        for p in prompts:
            check_int("prompt length", len(p), lo=1, hi=self.max_length - 1)
        ids, mask = left_pad(prompts, self.manifest.model["pad_token_id"])
        return self._prefill(ids, position_ids(mask), mask, list(slots)).copy()

    def decode_rows(self, token_ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        """One pass of `bucket`'s graph over slots 0..n-1: row i's token sits at column/position lengths[i] and
        runs the graph's j-th layer where gates[i, j]. -> logits [n, V], a view valid until the next call."""
        n = len(token_ids)
        check_int("rows", n, lo=1, hi=self.max_batch)
        if bucket not in self.buckets:
            raise InputError(f"bucket {bucket} is not exported (buckets: {list(self.buckets)})")
        if gates.shape != (n, bucket):
            raise InputError(f"gates have shape {gates.shape}; bucket {bucket} over {n} rows needs {(n, bucket)}")
        if int(lengths.max()) >= self.max_length or int(lengths.min()) < 0:
            raise InputError(f"a row has {int(lengths.max())} tokens; a new one needs a column below max_length "
                             f"{self.max_length}")
        self._gate[: n * bucket] = gates.reshape(-1)
        return self._run(token_ids, lengths, bucket, gates)

    def _run(self, token_ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray | None) -> np.ndarray:
        # the gate buffer is already filled; gates=None means every row runs every layer of the bucket
        n = len(token_ids)
        self._ids[:n, 0] = token_ids
        self._lengths[:n] = lengths
        self._kv_length[()] = int(lengths.max()) + 1
        spec = self.manifest.decode(bucket)
        binding = self._bindings.get((bucket, n)) or self._bind_decode(spec, n)
        with graph_range(spec.name):
            self.sessions[spec.name].run_with_iobinding(binding)
        if not self.in_place:
            self._move_new_kv(spec.layers, gates, self._lengths[:n].copy())
        return self._logits[: n * self.vocab_size].reshape(n, self.vocab_size)

    # -- primitives ------------------------------------------------------------------------------------------
    def _prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, slots: list[int]) -> np.ndarray:
        raise NotImplementedError

    def _bind_decode(self, spec, n: int):
        raise NotImplementedError

    def _move_new_kv(self, layers, gates: np.ndarray | None, lengths: np.ndarray) -> None:
        raise NotImplementedError
