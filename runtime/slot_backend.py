"""The backend base: the slot API every backend offers, and the part of a compiled backend that does not depend on
where graphs run.

`SlotBackend` (every backend: onnxruntime CPU and CUDA, TensorRT, the PyTorch reference, test fakes) owns the model
facts the generation loop needs, the `SlotTable` (runtime/kv.py: the one owner of KV slots and their lengths), input
checking at the slot API boundary and one lock, so graph calls from several threads never interleave. Its two calls:

* `prefill_rows(prompts, slots)`: full-depth prefill of each prompt into its slot (columns [0, len)).
* `decode_rows(slots, tokens, bucket, gates)`: one pass of `bucket`'s graph in which slot s feeds its next token at
  column lengths[s] and runs the graph's j-th layer where gates[i, j]. The call covers slots 0..max(slots); slots of
  the window that are not in the call are gated off and point at their own length, a column that holds nothing yet
  and that their owner's next step overwrites before anything reads it (so two generations, or the two calls of a
  "group" step, never clobber each other's K/V).
  With `draft=True` it runs the bucket's quantized draft graph instead (lossless mode, engines exported with
  drafts: `draft_buckets`): the same layers on an int8/int4 copy of their weights.

Lossless mode (self-speculative decoding, docs/DESIGN.md) adds two calls:

* `verify_rows(slots, tokens)`: one full-depth pass over S new tokens per slot at columns lengths[s] .. + S - 1
  (the verify graph); it writes their K/V in every layer (columns below max_length) and advances the lengths by S.
* `rewind(slots, lengths)`: forget the columns at and after `lengths` (drafted or rejected tokens). Nothing is
  erased: every reader attends only to columns below its slot's length, and a column is always written again before
  a later length covers it.

`feed(slot, tokens)` builds on them: it appends tokens to a slot at full depth (verify calls of up to
MAX_VERIFY_TOKENS columns, else one full-depth decode step per token). Prompt scoring feeds a prompt through it chunk by
chunk, and a service's chunked prefill feeds the rest of a long prompt after its first chunk went through the
prefill graph (`chunked_prefill` says where that is exact).

A subclass implements `_prefill(ids, pos, mask, slots)` (left-padded prompts), `_decode(ids, lengths, bucket,
gates)` and `_verify(ids, lengths, rows)` over rows 0..n-1 (= slots), and `_decode_draft` (same arguments) where it
has quantized drafts. `GraphBackend` does that for compiled engines
over a `KVCache` and leaves `_run_prefill`, `_run_decode` and `_run_verify` to the onnxruntime CPU/CUDA and TensorRT
backends (TensorRT has no verify plan: no lossless mode).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import contract as C
from .errors import EngineError, InputError, check_int
from .kv import KVCache, SlotTable
from .manifest import GraphSpec, Manifest
from .speculative import DraftPolicy


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids [B, p] int64 and attention_mask [B, p] int64, prompts right-aligned (left padding)."""
    p = max(len(x) for x in prompts)
    ids = np.full((len(prompts), p), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), p), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, p - len(prompt):] = prompt
        mask[row, p - len(prompt):] = 1
    return ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """OPT position ids from the mask: running count of real tokens minus one; padding gets -1 (as HF)."""
    return (np.cumsum(mask, axis=1) * mask - 1).astype(np.int64)


class IO(NamedTuple):
    """One input or output of a bound graph call: a tensor of `shape` at `address`, in device memory when
    `on_device` (the backend's device), else in host memory."""

    name: str
    dtype: np.dtype
    shape: list
    address: int
    on_device: bool = False


# Backends not closed yet. At interpreter exit another (daemon) thread may still be generating; onnxruntime's and
# CUDA's own teardown under a running graph call kills the process (SIGSEGV, SIGABRT). `_stop_at_exit` takes each
# backend's lock and keeps it: a call in flight finishes first, and any later call waits until the process is gone.
# It is registered when the first backend opens, after onnxruntime's import, so it runs before any exit hook of
# onnxruntime's (atexit runs last in, first out) and after those of the Services built on the backends.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _stop_at_exit() -> None:
    for backend in list(_OPEN):
        backend._lock.acquire()  # never released: the process is exiting
        backend._closed = True


# Most new tokens one verify call takes per row (lossless mode: drafted tokens + 1). Verify staging is sized for it.
MAX_VERIFY_TOKENS = 16


class SlotBackend:
    num_layers: int
    buckets: tuple[int, ...]  # decode budgets this backend can run (the full depth is always one)
    warmup_layers: int | None  # warm-up the graphs were built for; None = any
    max_batch: int  # KV slots
    max_length: int  # KV columns per slot
    vocab_size: int
    pad_token_id: int
    # Why lossless decoding would not reproduce this backend's own full-depth tokens (None: it does). A quantized
    # engine's int8 kernels round the activations of a several-token verify call differently from a one-token step.
    lossless_refusal: str | None = None
    # Buckets with a quantized draft graph (`decode_rows(..., draft=True)`): lossless mode drafts with them by default,
    # since a draft step reads fewer weight bytes; the verify pass stays on the float weights, so the output is still
    # full depth's.
    draft_buckets: tuple[int, ...] = ()
    # How lossless requests draft when they ask for nothing in particular (an engine's comes from its manifest)
    draft_policy: DraftPolicy = DraftPolicy()

    @property
    def has_verify(self) -> bool:
        """Whether `verify_rows` runs here (lossless mode, chunked prompt scoring)."""
        return type(self)._verify is not SlotBackend._verify

    @property
    def chunked_prefill(self) -> bool:
        """Whether a prompt may be prefilled in chunks (its first through the prefill graph, the rest appended by
        `feed`) with the tokens of a one-call prefill: it needs the verify pass (one decode step per prompt token
        would cost far more than the prefill it replaces), and an engine whose int8 kernels round activations
        differently with a call's row count (`lossless_refusal`: quantized) prefills in one call."""
        return self.has_verify and self.lossless_refusal is None

    def _init_slots(self) -> None:
        """Call once the attributes above are set."""
        self.slots = SlotTable(self.max_batch)
        self._lock = threading.RLock()
        self._closed = False
        if not _OPEN:
            atexit.unregister(_stop_at_exit)
            atexit.register(_stop_at_exit)
        _OPEN.add(self)

    # -- slot API --------------------------------------------------------------------------------------------
    def prefill_rows(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray:
        """Full-depth prefill of `prompts` into `slots` (taken from `self.slots`); -> last-token logits [n, V]."""
        if len(prompts) != len(slots) or len(set(slots)) != len(slots) or not slots:
            raise InputError(f"{len(prompts)} prompts need as many distinct slots, got {list(slots)}")
        for p in prompts:
            check_int("prompt length", len(p), lo=1, hi=self.max_length - 1)
        with self._lock:
            self._check_open()
            self.slots.check_taken(slots)
            ids, mask = left_pad(prompts, self.pad_token_id)
            logits = self._prefill(ids, position_ids(mask), mask, list(slots)).copy()
            self.slots.lengths[list(slots)] = [len(p) for p in prompts]
            return logits

    def decode_rows(self, slots: Sequence[int], token_ids: np.ndarray, bucket: int, gates: np.ndarray,
                    draft: bool = False) -> np.ndarray:
        """One pass of `bucket`'s graph advancing `slots` by one token each (`draft`: its quantized draft graph).
        -> logits [max(slots) + 1, V]: row s is slot s (rows of slots not in the call hold no meaning). The array is
        the caller's own: it is copied out of the backend's output buffer before the lock is released, so another
        thread's next call cannot change it."""
        k = len(slots)
        if k == 0 or len(set(slots)) != k or len(token_ids) != k:
            raise InputError(f"{len(token_ids)} tokens need as many distinct slots, got {list(slots)}")
        if bucket not in self.buckets:
            raise InputError(f"bucket {bucket} is not exported (buckets: {list(self.buckets)})")
        if draft and bucket not in self.draft_buckets:
            raise InputError(f"bucket {bucket} has no quantized draft graph (draft buckets: "
                             f"{list(self.draft_buckets)})")
        if gates.shape != (k, bucket):
            raise InputError(f"gates have shape {gates.shape}; bucket {bucket} over {k} rows needs {(k, bucket)}")
        with self._lock:
            rows, lengths = self._window(slots)
            n = len(lengths)
            ids = np.zeros(n, dtype=np.int64)
            ids[rows] = token_ids
            window = np.zeros((n, bucket), dtype=bool)
            window[rows] = gates
            logits = (self._decode_draft if draft else self._decode)(ids, lengths, bucket, window).copy()
            self.slots.lengths[rows] += 1
            return logits

    def verify_rows(self, slots: Sequence[int], token_ids: np.ndarray) -> np.ndarray:
        """Full-depth pass over token_ids[i] (S tokens) fed at columns lengths[slots[i]] .. + S - 1. -> logits
        [max(slots) + 1, S, V]: row s is slot s, column j the prediction after its j-th new token; the caller's own
        copy, as in `decode_rows`. Columns at or past max_length are computed but neither written nor counted
        (their logits have no meaning); the lengths advance by S (capped there): `rewind` keeps the accepted ones."""
        token_ids = np.asarray(token_ids)
        k = len(slots)
        if k == 0 or len(set(slots)) != k or token_ids.ndim != 2 or len(token_ids) != k:
            raise InputError(f"token ids of shape {token_ids.shape} need one row per distinct slot, got {list(slots)}")
        S = token_ids.shape[1]
        check_int("verify tokens per row", S, lo=1, hi=MAX_VERIFY_TOKENS)
        with self._lock:
            rows, lengths = self._window(slots)  # slots outside the call: read only, never written
            n = len(lengths)
            ids = np.full((n, S), self.pad_token_id, dtype=np.int64)
            ids[rows] = token_ids
            raw = self._verify(ids, lengths, rows)
            logits = np.zeros(raw.shape, dtype=raw.dtype)  # only the call's rows are copied (zero pages are free)
            logits[rows] = raw[rows]
            self.slots.lengths[rows] = np.minimum(lengths[rows] + S, self.max_length)
            return logits

    def feed(self, slot: int, token_ids: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Append `token_ids` to `slot` after the tokens it holds, at full depth, writing every layer's K/V: one
        verify call per MAX_VERIFY_TOKENS tokens (backends without a verify pass: one full-depth decode step per
        token). -> logits [n, V], row j the prediction after token j (`last_only`: [1, V], the last row). The slot
        must hold a full-depth prefix (a prefill, earlier feeds) for the result to be the model's own."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        check_int("tokens to feed", len(ids), lo=1, hi=self.max_length - 1)
        L, out = self.num_layers, []
        if not self.has_verify and L not in self.buckets:
            raise InputError(f"this backend has no full-depth bucket ({L} layers) and no verify pass to feed tokens "
                             "with")
        for start in range(0, len(ids), MAX_VERIFY_TOKENS):
            chunk = ids[start: start + MAX_VERIFY_TOKENS]
            if self.has_verify:
                out.append(self.verify_rows([slot], chunk[None])[slot])
            else:
                gates = np.ones((1, L), dtype=bool)
                out += [self.decode_rows([slot], chunk[j: j + 1], L, gates)[slot: slot + 1] for j in range(len(chunk))]
            if last_only:
                out = [out[-1][-1:]]
        return np.concatenate(out)

    def rewind(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Shorten `slots` to `lengths` tokens (1 <= new length <= current): the later columns are forgotten."""
        if len(slots) != len(lengths):
            raise InputError(f"{len(lengths)} lengths for {len(slots)} slots")
        with self._lock:
            self._check_open()
            self.slots.check_taken(slots)
            for s, n in zip(slots, lengths, strict=True):
                check_int(f"length of slot {s}", int(n), lo=1, hi=int(self.slots.lengths[s]))
            self.slots.lengths[list(slots)] = lengths
            self._rewind(list(slots), [int(n) for n in lengths])

    def _window(self, slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The call window of `slots` (held under the lock): -> (their rows, the lengths of slots 0..max(slots)),
        after checking the slots are taken and each has a free column below max_length. Slots of the window outside
        the call point at their own length (see the module docstring)."""
        self._check_open()
        self.slots.check_taken(slots)
        rows = np.asarray(slots, dtype=np.int64)
        lengths = self.slots.lengths[: int(rows.max()) + 1].copy()
        if int(lengths[rows].max()) >= self.max_length:
            raise InputError(f"slot {int(rows[np.argmax(lengths[rows])])} holds {int(lengths[rows].max())} "
                             f"tokens; a new one needs a column below max_length {self.max_length}")
        return rows, lengths

    def close(self) -> None:
        """Release what the backend holds (sessions, buffers); later calls raise EngineError. Idempotent."""
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("this engine is closed")

    # -- primitives ------------------------------------------------------------------------------------------
    def _prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, slots: list[int]) -> np.ndarray:
        """ids, pos, mask: [B, S] left-padded; write row b's real K/V into slots[b]; -> logits [B, V]."""
        raise NotImplementedError

    def _decode(self, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        """Rows 0..n-1 are slots 0..n-1; row i's token sits at column/position lengths[i]. -> logits [n, V]."""
        raise NotImplementedError

    def _decode_draft(self, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        """`_decode` on the bucket's quantized draft weights (only called for a bucket in `draft_buckets`)."""
        raise NotImplementedError

    def _verify(self, ids: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """ids [n, S]: row i's tokens at columns lengths[i] ..; write the K/V of `rows` only. -> logits [n, S, V]."""
        raise EngineError(f"{type(self).__name__} has no lossless mode (no verify pass)")

    def _rewind(self, slots: list[int], lengths: list[int]) -> None:
        """Hook for backends that keep per-slot state besides the lengths (the PyTorch reference)."""


class GraphBackend(SlotBackend):
    """A compiled engine: the manifest's graphs over one `KVCache`, host buffers for the small inputs and logits.

    Subclasses implement `_run_prefill(ids, pos, mask) -> (logits [B, V], [(key_ptr, value_ptr)] per layer of the
    left-padded [B, H, S, D] prefill K/V in the cache's memory, keep-alive)` and `_run_decode(spec, n)`, which runs a
    decode graph over rows 0..n-1 of the host buffers `_ids`, `_lengths`, `_kv_length`, `_gate` into `_logits`.
    """

    def _setup(self, man: Manifest, max_batch: int | None, max_length: int | None, memory) -> None:
        self.manifest = man
        self.num_layers, self.warmup_layers, self.buckets = man.num_layers, man.warmup_layers, man.buckets
        self.in_place = man.attention == "gqa"
        self.max_batch = check_int("max_batch", max_batch or man.max_batch, lo=1, hi=man.max_batch)
        self.max_length = check_int("max_length", max_length or man.max_length, lo=2, hi=man.max_length)
        m = man.model
        self.vocab_size, self.pad_token_id, self.heads, self.head_dim = m.vocab_size, m.pad_token_id, m.num_heads, \
            m.head_dim
        self._specs = {b: man.decode(b) for b in self.buckets}  # looked up every step
        self._draft_specs = {b: man.draft(b) for b in man.draft_buckets}
        self.draft_buckets = man.draft_buckets
        self.draft_policy = man.draft_policy
        if man.quantization:
            self.lossless_refusal = (f"lossless decoding is not exact on this {man.quantization.get('scheme')} "
                                     "engine (its verify pass rounds activations differently from one-token "
                                     "steps): use a float engine")
        self._init_slots()
        self.kv = KVCache(memory, self.num_layers, self.heads, self.head_dim, self.max_batch, self.max_length,
                          man.dtype, staging=not self.in_place)
        # Inputs and logits live in host buffers allocated once; bindings point into them and are cached per
        # (bucket, rows), so a step only refreshes their contents.
        self._logits = np.zeros(self.max_batch * self.vocab_size, dtype=np.float32)
        self._ids = np.zeros((self.max_batch, 1), dtype=np.int64)
        self._lengths = np.zeros(self.max_batch, dtype=np.int32)
        self._kv_length = np.zeros((), dtype=np.int32)
        self._gate = np.zeros(self.max_batch * self.num_layers, dtype=bool)  # row-major [n, bucket] per call
        self._vlogits: np.ndarray | None = None  # verify inputs/logits [n, S, V]: allocated by the first verify
        self._vids: np.ndarray | None = None

    def _prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, slots: list[int]) -> np.ndarray:
        S = ids.shape[1]
        logits, kv, _keep = self._run_prefill(ids, pos, np.ascontiguousarray(mask))
        lengths = mask.sum(axis=1)
        for layer, (k_ptr, v_ptr) in enumerate(kv):
            self.kv.write_prompts(layer, k_ptr, v_ptr, lengths, slots, S)
        self.kv.memory.synchronize()  # the prefill outputs go with `_keep`
        return logits

    def _decode(self, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        return self._step(self._specs[bucket], ids, lengths, gates)

    def _decode_draft(self, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        # the draft graph writes K/V of its layers at the drafted columns like any bucket; the verify pass rewrites
        # every layer's K/V of those columns from the float weights before anything else reads them (DESIGN §9)
        return self._step(self._draft_specs[bucket], ids, lengths, gates)

    def _step(self, spec: GraphSpec, ids: np.ndarray, lengths: np.ndarray, gates: np.ndarray) -> np.ndarray:
        n, bucket = len(ids), spec.budget
        self._ids[:n, 0] = ids
        self._lengths[:n] = lengths
        self._kv_length[()] = int(lengths.max()) + 1
        self._gate[: n * bucket] = gates.reshape(-1)
        self._run_decode(spec, n)
        if not self.in_place:
            for j, layer in enumerate(spec.layers):  # a gated-off row writes no K/V
                self.kv.write_new(layer, np.flatnonzero(gates[:, j]), lengths)
            self.kv.memory.synchronize()
        return self._logits[: n * self.vocab_size].reshape(n, self.vocab_size)

    def _verify(self, ids: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
        spec = self.manifest.verify()
        if spec is None:
            raise EngineError("this engine has no verify graph, which lossless mode needs: export it again with this "
                              "version of skipdecode")
        n, S = ids.shape
        if self._vlogits is None:  # lossless mode's buffers, on its first use
            self._vlogits = np.zeros(self.max_batch * MAX_VERIFY_TOKENS * self.vocab_size, dtype=np.float32)
            self._vids = np.zeros(self.max_batch * MAX_VERIFY_TOKENS, dtype=np.int64)
            self.kv.reserve_span(MAX_VERIFY_TOKENS)
        row_spec = self.manifest.verify("verify_row")
        if row_spec is not None and len(rows) == 1 and lengths[rows[0]] + S <= self.max_length:
            # one row, in place: its slot's K/V are written by the graph itself (no staging, no copies)
            r = int(rows[0])
            self._vids[r * S: (r + 1) * S] = ids[r]
            self._lengths[r] = lengths[r]
            self._kv_length[()] = int(lengths[r]) + S
            self._run_verify(row_spec, r, S)
        else:
            self._vids[: n * S] = ids.reshape(-1)
            self._lengths[:n] = lengths
            self._run_verify(spec, n, S)
            self.kv.write_spans(rows, lengths, np.minimum(S, self.max_length - lengths), S)
            self.kv.memory.synchronize()
        return self._vlogits[: n * S * self.vocab_size].reshape(n, S, self.vocab_size)

    @property
    def has_verify(self) -> bool:
        return self.manifest.verify() is not None and type(self)._run_verify is not GraphBackend._run_verify

    @property
    def chunked_prefill(self) -> bool:
        # a chunk runs the one-row verify graph in place; the any-batch one (matmul engines) would compute every
        # slot of the call window 0..slot, several times the chunk's own work
        return super().chunked_prefill and self.manifest.verify("verify_row") is not None

    def _decode_io(self, spec: GraphSpec, n: int) -> tuple[list[IO], list[IO]]:
        """Inputs and outputs of a bucket graph over slots [0, n): the host inputs and logits, the cache's K/V
        buffers, and (matmul flavour) the staging for the new column; the gqa flavour writes it in place (present =
        past). Rows [0, n) of a [slots, ...] buffer start at its base address, so a binding made once stays valid."""
        k, kv, dtype = len(spec.layers), [n, self.heads, self.max_length, self.head_dim], self.kv.dtype
        host = [(C.INPUT_IDS, self._ids[:n]), (C.PAST_LENGTH, self._lengths[:n]),
                (C.GATE, self._gate[: n * k].reshape(n, k))]
        if self.in_place:
            host.append((C.KV_LENGTH, self._kv_length))
        ins = [IO(name, a.dtype, list(a.shape), a.ctypes.data) for name, a in host]
        outs = [IO(C.LOGITS, np.dtype(np.float32), [n, self.vocab_size], self._logits.ctypes.data)]
        new = [n, self.heads, 1, self.head_dim]
        for layer in spec.layers:
            k_ptr, v_ptr = self.kv.keys[layer], self.kv.values[layer]
            ins += [IO(C.past_key(layer), dtype, kv, k_ptr, True), IO(C.past_value(layer), dtype, kv, v_ptr, True)]
            if self.in_place:
                outs += [IO(C.present_key(layer), dtype, kv, k_ptr, True),
                         IO(C.present_value(layer), dtype, kv, v_ptr, True)]
            else:
                outs += [IO(C.new_key(layer), dtype, new, self.kv.new_keys[layer], True),
                         IO(C.new_value(layer), dtype, new, self.kv.new_values[layer], True)]
        return ins, outs

    def _verify_io(self, spec: GraphSpec, n: int, S: int) -> tuple[list[IO], list[IO]]:
        """Inputs and outputs of a verify graph: "verify" over slots [0, n) (host inputs and logits, the cache's K/V
        buffers, the span staging for the new K/V), or "verify_row" over the one slot `n` (its rows of the same
        buffers, K/V written in place)."""
        kv_dtype, V, H, T, D = self.kv.dtype, self.vocab_size, self.heads, self.max_length, self.head_dim
        i64, i32, f32 = np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.float32)
        if spec.kind == "verify_row":
            r, layer_row = n, H * T * D * kv_dtype.itemsize
            ins = [IO(C.INPUT_IDS, i64, [1, S], self._vids.ctypes.data + r * S * 8, False),
                   IO(C.PAST_LENGTH, i32, [1], self._lengths.ctypes.data + r * 4, False),
                   IO(C.KV_LENGTH, i32, [], self._kv_length.ctypes.data, False)]
            outs = [IO(C.LOGITS, f32, [1, S, V], self._vlogits.ctypes.data + r * S * V * 4, False)]
            for layer in spec.layers:
                k_ptr, v_ptr = self.kv.keys[layer] + r * layer_row, self.kv.values[layer] + r * layer_row
                ins += [IO(C.past_key(layer), kv_dtype, [1, H, T, D], k_ptr, True),
                        IO(C.past_value(layer), kv_dtype, [1, H, T, D], v_ptr, True)]
                outs += [IO(C.present_key(layer), kv_dtype, [1, H, T, D], k_ptr, True),
                         IO(C.present_value(layer), kv_dtype, [1, H, T, D], v_ptr, True)]
            return ins, outs
        ins = [IO(C.INPUT_IDS, i64, [n, S], self._vids.ctypes.data, False),
               IO(C.PAST_LENGTH, i32, [n], self._lengths.ctypes.data, False)]
        outs = [IO(C.LOGITS, f32, [n, S, V], self._vlogits.ctypes.data, False)]
        kv, new = [n, H, T, D], [n, H, S, D]
        for layer in spec.layers:
            ins += [IO(C.past_key(layer), kv_dtype, kv, self.kv.keys[layer], True),
                    IO(C.past_value(layer), kv_dtype, kv, self.kv.values[layer], True)]
            outs += [IO(C.new_key(layer), kv_dtype, new, self.kv.span_keys[layer], True),
                     IO(C.new_value(layer), kv_dtype, new, self.kv.span_values[layer], True)]
        return ins, outs

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._release()
                self.kv.close()
                self.kv.memory.close()  # host buffers, or the device allocations and stream of a GPU backend
            super().close()

    # -- primitives ------------------------------------------------------------------------------------------
    def _run_prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray):
        raise NotImplementedError

    def _run_decode(self, spec: GraphSpec, n: int) -> None:
        raise NotImplementedError

    def _run_verify(self, spec: GraphSpec, n: int, S: int) -> None:
        """Run a verify graph with S tokens per row: "verify" over rows 0..n-1, "verify_row" over row n alone
        (`_verify_io` says what binds where)."""
        raise EngineError(f"{type(self).__name__} has no lossless mode (no verify graph runner)")

    def _release(self) -> None:
        """Drop sessions/contexts and bindings (the KV cache is freed by `close`)."""
        raise NotImplementedError
