"""onnxruntime backend: one session per graph, one copy of the weights shared by all of them.

Weights: `weights.bin` is read once into one numpy buffer; each tensor is an OrtValue over a view of it and is
handed to every session that uses it with `SessionOptions.add_initializer`, so no session loads its own copy.
KV: owned by `KVArena`; decode graphs are bound (IOBinding) to the arena's views, so they read the cache in
place and write only the new column's K/V into staging buffers.
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
from .schedule import Step


def load_weights(directory: Path, man: Manifest) -> dict[str, ort.OrtValue]:
    """Read the shared weights file once; return an OrtValue (a view, no copy) per tensor name."""
    buf = np.fromfile(directory / man.weights_file, dtype=np.uint8)
    values = {}
    for name, w in man.weights.items():
        arr = buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape)
        values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
    return values


def session_options(threads: int | None, prepack: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if not prepack:
        # MLAS pre-packs Gemm weights into a private per-session copy, and the Python API cannot share the
        # pre-packed buffers across sessions. Measured on the opt-125m shape (11 graphs): 4.2 GB resident with
        # pre-packing vs 0.53 GB without; decode steps were ~25% slower without (36 vs 45 ms at B=1).
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def open_session(directory: Path, spec: GraphSpec, weights: dict[str, ort.OrtValue], providers: list[str],
                 threads: int | None, prepack: bool) -> ort.InferenceSession:
    so = session_options(threads, prepack)
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
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    want = ([s.name for s in spec.inputs], [s.name for s in spec.outputs])
    if names != want:
        raise EngineError(f"graph {spec.name} has I/O {names}; the manifest expects {want}")
    return sess


class OrtBackend:
    """`StepBackend` over the graphs of one engine directory."""

    def __init__(self, directory: str | Path, man: Manifest, providers: list[str], threads: int | None = None,
                 max_batch: int | None = None, max_length: int | None = None, prepack: bool = False) -> None:
        directory = Path(directory)
        available = ort.get_available_providers()
        for p in providers:
            if p not in available:
                raise BackendError(f"execution provider {p!r} is not available in this onnxruntime "
                                   f"(available: {available})")
        self.manifest = man
        self.num_layers = man.num_layers
        self.warmup_layers = man.warmup_layers
        self.buckets = man.buckets
        self.max_batch = check_int("max_batch", max_batch or man.max_batch, lo=1, hi=man.max_batch)
        self.max_length = check_int("max_length", max_length or man.max_length, lo=2, hi=man.max_length)
        self.weights = load_weights(directory, man)
        threads = threads or int(os.environ.get("SKIPDECODE_THREADS", "0")) or None
        self.sessions = {g.name: open_session(directory, g, self.weights, providers, threads, prepack)
                         for g in man.graphs}
        self.prefill_spec = man.prefill()
        m = man.model
        self.heads, self.head_dim = m["num_heads"], m["hidden_size"] // m["num_heads"]
        self.arena = KVArena(self.num_layers, self.heads, self.head_dim, self.max_batch, self.max_length,
                             man.dtype)
        self._logits = np.zeros(self.max_batch * m["vocab_size"], dtype=np.float32)
        self._ids = np.zeros(self.max_batch, dtype=np.int64)
        self._pos = np.zeros(self.max_batch, dtype=np.int64)
        self._mask = np.zeros(self.max_batch * self.max_length, dtype=np.int64)
        self._bindings: dict[int, ort.IOBinding] = {}
        self._batch = self._length = 0

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        B, S = input_ids.shape
        T = attention_mask.shape[1]
        self._begin(B, T)
        spec = self.prefill_spec
        outs = self.sessions[spec.name].run(None, {C.INPUT_IDS: input_ids, C.POSITION_IDS: position_ids,
                                                   C.ATTENTION_MASK: np.ascontiguousarray(attention_mask[:, :S])})
        for layer in range(self.num_layers):
            self.arena.write_prefix(layer, outs[1 + 2 * layer], outs[2 + 2 * layer])
        return outs[0]

    def decode(self, token_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
               step: Step) -> np.ndarray:
        """Run the bucket graph over column `step.column`. The returned logits view is valid until the next call."""
        B, c = self._batch, step.column
        ids, pos, mask = self._views()
        ids[:, 0] = token_ids
        pos[:, 0] = position_ids
        mask[:, :c] = attention_mask[:, :c]  # past = written columns only; the graph adds the current token
        binding = self._bindings.get(step.bucket) or self._bind_decode(step.bucket)
        self.sessions[self.manifest.decode(step.bucket).name].run_with_iobinding(binding)
        for layer in step.layers:
            self.arena.write_column(layer, c)
        return self._logits[: B * self.manifest.model["vocab_size"]].reshape(B, -1)

    def _begin(self, batch: int, length: int) -> None:
        self.arena.begin(batch, length)
        self._batch, self._length = batch, length
        self._bindings.clear()
        self._views()[2][:] = 0

    def _views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B, T = self._batch, self._length
        return self._ids[:B].reshape(B, 1), self._pos[:B].reshape(B, 1), self._mask[: B * T].reshape(B, T)

    def _bind_decode(self, bucket: int) -> ort.IOBinding:
        """Bind a bucket graph to this call's buffers once; later steps only refresh the buffers' contents."""
        spec = self.manifest.decode(bucket)
        binding = self.sessions[spec.name].io_binding()
        ids, pos, mask = self._views()
        B, V = self._batch, self.manifest.model["vocab_size"]
        inputs = {C.INPUT_IDS: ids, C.POSITION_IDS: pos, C.ATTENTION_MASK: mask}
        outputs = {C.LOGITS: self._logits[: B * V].reshape(B, V)}
        for layer in spec.layers:
            inputs[C.past_key(layer)], inputs[C.past_value(layer)] = self.arena.keys[layer], self.arena.values[layer]
            outputs[C.new_key(layer)] = self.arena.new_keys[layer]
            outputs[C.new_value(layer)] = self.arena.new_values[layer]
        for name, arr in inputs.items():
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        self._bindings[bucket] = binding
        return binding
