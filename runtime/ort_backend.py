"""onnxruntime backend: one session per graph, one copy of the weights shared by all of them.

Weights: `weights.bin` is read once into one numpy buffer; each tensor is an OrtValue over a view of it and is
handed to every session that uses it with `SessionOptions.add_initializer`, so no session loads its own copy.
KV: owned by `KVArena` (ragged slot layout, runtime/contract.py); decode graphs are bound (IOBinding) to the
arena's slot rows, read the cache in place and (gqa flavour) write the new column in place too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as C
from .errors import BackendError, EngineError, check_int
from .kv import KVArena
from .manifest import GraphSpec, Manifest
from .profiling import graph_range
from .slot_backend import SlotBackend


def load_weights(directory: Path, man: Manifest) -> dict[str, ort.OrtValue]:
    """Read the shared weights file once; return an OrtValue (a view, no copy) per tensor name."""
    buf = np.fromfile(directory / man.weights_file, dtype=np.uint8)
    values = {}
    for name, w in man.weights.items():
        arr = buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape)
        values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
    return values


# Threads: one intra-op pool shared by every session of the process, when configured. With a pool per session the
# workers of the graph that just ran keep spinning while the next bucket's graph runs; on 2 cores the first calls
# after a bucket switch took 30-40 ms instead of 18-21 ms (opt-125m shape, batch 1), and a generation switches
# buckets every few steps. Turning spinning off removes that but made every step 15-20% slower.
_global_pool: dict = {}


def use_global_thread_pool(threads: int | None = None) -> int:
    """Opt in: every later session of this process (ours and any other) shares one pool of `threads` intra-op
    threads (default: SKIPDECODE_THREADS, else every core); returns its size. `skipdecode generate`, the server
    and the benchmark call this before loading an engine. onnxruntime then requires `use_per_session_threads =
    False` in every session of the process (`session_options` does that), which is why the library does not switch
    it on behind an embedding application's back. A later call asking for another size raises BackendError instead
    of silently keeping the first."""
    if threads is not None:
        check_int("threads", threads, lo=1, hi=1024)
    current = _global_pool.get("threads")
    if current is not None:
        if threads is not None and threads != current:
            raise BackendError(f"threads={threads}: this process already runs onnxruntime with one shared pool of "
                               f"{current} threads")
        return current
    size = threads or int(os.environ.get("SKIPDECODE_THREADS", "0")) or os.cpu_count() or 1
    ort.set_global_thread_pool_sizes(size, 1)
    _global_pool["threads"] = size
    return size


def session_options(prepack: bool, threads: int | None = None) -> ort.SessionOptions:
    """Options for one graph's session: the shared pool when the process has one, else a pool of `threads`."""
    so = ort.SessionOptions()
    if not prepack:
        # MLAS pre-packs Gemm weights into a private per-session copy, and the Python API cannot share the
        # pre-packed buffers across sessions. Measured on the opt-125m shape (11 graphs, `skipdecode bench --quick`,
        # 2026-11-22): 4011 MiB resident with pre-packing vs 529 MiB without; full depth 1.44x faster with it at
        # batch 8, no faster at batch 1.
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _global_pool:
        # the process runs one shared pool (use_global_thread_pool): onnxruntime then requires every session to use
        # it, so a per-engine `threads` no longer applies (OrtBackend.threads reports the pool's size)
        so.use_per_session_threads = False
    else:
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def open_session(directory: Path, spec: GraphSpec, weights: dict[str, ort.OrtValue], providers: list[str],
                 prepack: bool, threads: int | None = None) -> ort.InferenceSession:
    so = session_options(prepack, threads)
    for name in spec.weights:
        so.add_initializer(name, weights[name])
    try:
        sess = ort.InferenceSession(str(directory / spec.file), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own non-ValueError types; report which graph failed
        raise EngineError(f"onnxruntime cannot load graph {spec.name} ({spec.file}): {exc}") from exc
    # A CUDA/TensorRT session silently falls back to CPU when its libraries are missing: refuse that.
    missing = [p for p in providers if p not in sess.get_providers()]
    if missing:
        raise BackendError(f"execution provider {missing[0]} was requested but did not load "
                           f"(session has {sess.get_providers()}); install its runtime or request another")
    check_session_io(sess, spec)
    return sess


def check_session_io(sess: ort.InferenceSession, spec: GraphSpec) -> None:
    """The loaded graph's input and output names, in order, must be the manifest's (runtime/contract.py)."""
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    want = ([s.name for s in spec.inputs], [s.name for s in spec.outputs])
    if names != want:
        raise EngineError(f"graph {spec.name} has I/O {names}; the manifest expects {want}")


class OrtBackend(SlotBackend):
    """`StepBackend` over the graphs of one engine directory, plus the slot API continuous batching uses.

    Static batches (`prefill`/`decode`) use slots 0..B-1. The slot API (`prefill_rows`/`decode_rows`) lets the
    caller place sequences in slots and run rows of different lengths and layer sets in one call.
    """

    def __init__(self, directory: str | Path, man: Manifest, providers: list[str], threads: int | None = None,
                 max_batch: int | None = None, max_length: int | None = None, prepack: bool = False) -> None:
        directory = Path(directory)
        available = ort.get_available_providers()
        for p in providers:
            if p not in available:
                raise BackendError(f"execution provider {p!r} is not available in this onnxruntime "
                                   f"(available: {available})")
        self._setup(man, max_batch, max_length)
        self.weights = load_weights(directory, man)
        threads = threads or int(os.environ.get("SKIPDECODE_THREADS", "0")) or None
        self.threads = _global_pool.get("threads", threads)  # what the sessions really use (None: every core)
        self.sessions = {g.name: open_session(directory, g, self.weights, providers, prepack, threads)
                         for g in man.graphs}
        self.prefill_spec = man.prefill()
        self.arena = KVArena(self.num_layers, self.heads, self.head_dim, self.max_batch, self.max_length, man.dtype,
                             staging=not self.in_place)
        # Inputs and logits live in buffers allocated once; bindings point into them and are cached per
        # (bucket, rows), so a step only refreshes their contents.
        self._logits = np.zeros(self.max_batch * self.vocab_size, dtype=np.float32)
        self._ids = np.zeros((self.max_batch, 1), dtype=np.int64)
        self._lengths = np.zeros(self.max_batch, dtype=np.int32)
        self._kv_length = np.zeros((), dtype=np.int32)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    # -- internals -------------------------------------------------------------------------------------------
    def _prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, slots) -> np.ndarray:
        # ids, pos, mask: [B, S], prompts right-aligned (left padding)
        B, S = ids.shape
        check_int("batch size", B, lo=1, hi=self.max_batch)
        with graph_range(self.prefill_spec.name):
            outs = self.sessions[self.prefill_spec.name].run(
                None, {C.INPUT_IDS: ids, C.POSITION_IDS: pos, C.ATTENTION_MASK: np.ascontiguousarray(mask)})
        lengths = mask.sum(axis=1)
        for row, slot in enumerate(slots):
            start = S - int(lengths[row])
            for layer in range(self.num_layers):
                k, v = outs[1 + 2 * layer], outs[2 + 2 * layer]
                self.arena.write_prompt(layer, slot, k[row, :, start:], v[row, :, start:])
        return outs[0]

    def _move_new_kv(self, layers, gates: np.ndarray | None, lengths: np.ndarray) -> None:
        every = np.arange(len(lengths))
        for j, layer in enumerate(layers):
            rows = every if gates is None else np.flatnonzero(gates[:, j])  # a gated-off row writes no K/V
            self.arena.write_new(layer, rows, lengths[rows])

    def _bind_decode(self, spec: GraphSpec, n: int) -> ort.IOBinding:
        """Bind a bucket graph over slots [0, n) once; later steps only refresh the buffers' contents."""
        binding = self.sessions[spec.name].io_binding()
        k = len(spec.layers)
        inputs = {C.INPUT_IDS: self._ids[:n], C.PAST_LENGTH: self._lengths[:n],
                  C.GATE: self._gate[: n * k].reshape(n, k)}
        if self.in_place:
            inputs[C.KV_LENGTH] = self._kv_length
        outputs = {C.LOGITS: self._logits[: n * self.vocab_size].reshape(n, self.vocab_size)}
        for layer in spec.layers:
            inputs[C.past_key(layer)], inputs[C.past_value(layer)] = self.arena.rows(layer, n)
            if self.in_place:  # present = past: the op writes the new column into the buffer itself
                outputs[C.present_key(layer)], outputs[C.present_value(layer)] = self.arena.rows(layer, n)
            else:
                outputs[C.new_key(layer)], outputs[C.new_value(layer)] = self.arena.staged(layer, n)
        for name, arr in inputs.items():
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        self._bindings[(spec.budget, n)] = binding
        return binding
