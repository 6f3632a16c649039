"""onnxruntime CPU backend: one session per graph, one copy of the weights shared by all of them.

Weights: `weights.bin` is read (or memory-mapped) once (runtime/weights.py); each tensor is an OrtValue over a view
of it handed to every session that uses it as a shared initializer, so no session loads its own copy.

Pre-packing (`prepack`): MLAS packs MatMul/Gemm weights into its own layout at session creation, which makes batched
steps much faster, but by default each session packs a private copy. Modes:
* "shared" (default where the C API library is present): sessions are created through onnxruntime's C API
  (runtime/ort_capi.py) with one `PrepackedWeightsContainer`, so every bucket graph computes from ONE packed copy
  of each weight; the unpacked weights are memory-mapped and their pages dropped once the sessions are built.
  Measured on the opt-125m shape (11 graphs, 2 threads, 2026-11-30): resident 603 MiB vs 584 MiB without
  pre-packing (1.03x) and 4068 MiB with private copies; full-depth steps at batch 8 as fast as private pre-packing
  (1.4-1.8x faster than without), identical outputs.
* "private": the Python API with pre-packing on: the same speed, one packed copy per session (4 GiB above).
* "off": the Python API with pre-packing disabled (the smallest, slowest at batch > 1).
KV: a `KVCache` in host memory (runtime/kv.py, ragged slot layout); decode graphs are bound (IOBinding) to the
cache's slot rows by address, read the cache in place and (gqa flavour) write the new column in place too.
Session options and opening (`session_options`, `open_session`) are shared with the CUDA backend.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as C
from . import ort_capi
from .device import HostRuntime
from .errors import BackendError, EngineError, check_int
from .manifest import GraphSpec, Manifest
from .profiling import graph_range
from .slot_backend import GraphBackend
from .weights import read_weights


def load_weights(directory: Path, man: Manifest) -> dict[str, ort.OrtValue]:
    """The shared weights as host OrtValues (views of the one buffer read by runtime/weights.py, no copy)."""
    return {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in read_weights(directory, man).items()}


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


PREPACK_MODES = ("shared", "private", "off")


def resolve_prepack(prepack: str | None, providers: list, dtype: str = "float32") -> str:
    """The pre-packing mode to use: None picks "shared" for fp32 engines on the CPU provider when the C API library
    loads, else "off" (the mode is reported as `OrtBackend.prepack`). fp16 graphs cannot share: onnxruntime's fp16
    LayerNormalization pre-packs its scale into a form it cannot put in a shared container and refuses to load."""
    if prepack is None:
        ok = list(providers) == ["CPUExecutionProvider"] and dtype == "float32" and ort_capi.available()
        return "shared" if ok else "off"
    if prepack not in PREPACK_MODES:
        raise BackendError(f"prepack={prepack!r} is not one of {list(PREPACK_MODES)}")
    if prepack == "shared" and dtype != "float32":
        raise BackendError(f"prepack='shared' needs a float32 engine (this one is {dtype}): use 'private' or 'off'")
    if prepack == "shared":
        if list(providers) != ["CPUExecutionProvider"]:
            raise BackendError(f"prepack='shared' runs on the CPU provider only, not {providers}")
        if not ort_capi.available():
            raise BackendError("prepack='shared' needs onnxruntime's C API library (libonnxruntime.so in the "
                               "onnxruntime wheel), which did not load: use prepack='private' or 'off'")
    return prepack


def session_options(prepack: bool, threads: int | None = None) -> ort.SessionOptions:
    """Options for one graph's Python-API session: the shared pool when the process has one, else a pool of
    `threads`. `prepack=False` disables MLAS pre-packing (each session would pack a private copy)."""
    so = ort.SessionOptions()
    if not prepack:
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


def open_session(directory: Path, spec: GraphSpec, weights: dict[str, ort.OrtValue], providers: list,
                 so: ort.SessionOptions) -> ort.InferenceSession:
    """One graph's session with the shared weights as initializers; the requested providers must really load."""
    for name in spec.weights:
        so.add_initializer(name, weights[name])
    try:
        sess = ort.InferenceSession(str(directory / spec.file), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own non-ValueError types; report which graph failed
        raise EngineError(f"onnxruntime cannot load graph {spec.name} ({spec.file}): {exc}") from exc
    # A CUDA/TensorRT session silently falls back to CPU when its libraries are missing: refuse that.
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [p for p in names if p not in sess.get_providers()]
    if missing or sess.get_providers()[0] != names[0]:
        raise BackendError(f"execution provider {(missing or names)[0]} was requested but did not load for graph "
                           f"{spec.name} (session has {sess.get_providers()}); install its runtime or request another")
    check_session_io(sess, spec)
    return sess


def check_session_io(sess: ort.InferenceSession, spec: GraphSpec) -> None:
    check_io_names(spec, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])


def check_io_names(spec: GraphSpec, inputs: list[str], outputs: list[str]) -> None:
    """The loaded graph's input and output names, in order, must be the manifest's (runtime/contract.py)."""
    want = ([s.name for s in spec.inputs], [s.name for s in spec.outputs])
    if (list(inputs), list(outputs)) != want:
        raise EngineError(f"graph {spec.name} has I/O {(list(inputs), list(outputs))}; the manifest expects {want}")


class OrtBackend(GraphBackend):
    """The slot API over the graphs of one engine directory, on onnxruntime's CPU (or another host) provider."""

    def __init__(self, directory: str | Path, man: Manifest, providers: list[str], threads: int | None = None,
                 max_batch: int | None = None, max_length: int | None = None, prepack: str | None = None) -> None:
        directory = Path(directory)
        available = ort.get_available_providers()
        for p in providers:
            if p not in available:
                raise BackendError(f"execution provider {p!r} is not available in this onnxruntime "
                                   f"(available: {available})")
        self.prepack = resolve_prepack(prepack, providers, man.dtype)
        self._setup(man, max_batch, max_length, HostRuntime())
        threads = threads or int(os.environ.get("SKIPDECODE_THREADS", "0")) or None
        self.prefill_spec = man.prefill()
        self._bindings: dict[tuple, object] = {}
        if self.prepack == "shared":
            self._open_shared(directory, threads)
        else:
            self.env = None
            self.weights = load_weights(directory, man)
            self.threads = _global_pool.get("threads", threads)  # what the sessions really use (None: every core)
            self.sessions = {g.name: open_session(directory, g, self.weights, providers,
                                                  session_options(self.prepack == "private", threads))
                             for g in man.graphs}

    def _open_shared(self, directory: Path, threads: int | None) -> None:
        """C API sessions over one pre-packed weights container (see the module docstring)."""
        self.threads = _capi_threads(threads)
        self.env = ort_capi.Env(self.threads)
        # an engine dropped without close() still gives its sessions and packed weights back; not at interpreter
        # exit, where the process's memory goes back anyway and another thread may still be inside a graph call
        self._finalizer = weakref.finalize(self, self.env.close)
        self._finalizer.atexit = False
        try:
            path = directory / self.manifest.weights_file
            buf = ort_capi.read_private(path)  # the engine's own copy: the file may change after load
            weights = {k: self.env.value(v) for k, v in read_weights(directory, self.manifest, buf).items()}
            self.sessions = {}
            for g in self.manifest.graphs:
                self.sessions[g.name] = self._capi_session(directory, g, weights)
            self._release_packed(buf, path)
        except BaseException:
            self._finalizer()  # the one Env.close, and the finalizer is done with
            raise

    def _release_packed(self, buf: np.ndarray, path: Path) -> None:
        """Give back the unpacked bytes of the weights the sessions have pre-packed (`manifest.prepacked`), then
        prove nothing reads them: every graph runs once before and once after, and must give the same outputs
        (a released page reads as zeros). If not, the bytes are read back from the file and stay resident."""
        man = self.manifest
        ranges = [(man.weights[n].offset, man.weights[n].offset + man.weights[n].nbytes) for n in man.prepacked]
        self.released_bytes = 0
        if not ranges:
            return
        before = self._probe()
        self.released_bytes = ort_capi.release_pages(buf, ranges)
        after = self._probe()
        if not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
            ort_capi.restore_pages(buf, path, ranges)
            self.released_bytes = 0
            warnings.warn(f"onnxruntime {ort.__version__} still reads weights it was expected to have pre-packed; "
                          "the engine keeps their unpacked copy resident", RuntimeWarning, stacklevel=3)

    def _probe(self) -> list[np.ndarray]:
        """Outputs of one call of the prefill graph and of every decode graph on fixed inputs, in slot 0 (no
        generation holds a slot yet). The verify graphs are not run (their buffers are allocated on first use): they
        read the same weights through the same operators as the prefill graph."""
        prompt = [self.pad_token_id + 1] * 2
        ids, mask = np.array([prompt], dtype=np.int64), np.ones((1, 2), dtype=np.int64)
        out = [self._prefill(ids, np.arange(2, dtype=np.int64)[None], mask, [0]).copy()]
        lengths = np.array([2], dtype=np.int32)
        for bucket in self.buckets:
            gates = np.ones((1, bucket), dtype=bool)
            out.append(self._decode(np.array([prompt[0]]), lengths, bucket, gates).copy())
        return out

    def _capi_session(self, directory: Path, spec: GraphSpec, weights: dict) -> ort_capi.Session:
        try:
            sess = self.env.session(directory / spec.file, {n: weights[n] for n in spec.weights})
        except ort_capi.OrtCapiError as exc:
            raise EngineError(f"onnxruntime cannot load graph {spec.name} ({spec.file}): {exc}") from exc
        check_io_names(spec, sess.input_names, sess.output_names)
        return sess

    def _run_prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray):
        # ids, pos, mask: [B, S], prompts right-aligned (left padding); K/V outputs [B, H, S, D] in host memory
        feeds = {C.INPUT_IDS: ids, C.POSITION_IDS: pos, C.ATTENTION_MASK: mask}
        with graph_range(self.prefill_spec.name):
            sess = self.sessions[self.prefill_spec.name]
            outs = sess.run(feeds) if self.env is not None else sess.run(None, feeds)
        kv = [(np.ascontiguousarray(outs[1 + 2 * layer]), np.ascontiguousarray(outs[2 + 2 * layer]))
              for layer in range(self.num_layers)]
        return outs[0], [(k.ctypes.data, v.ctypes.data) for k, v in kv], kv

    def _run_decode(self, spec: GraphSpec, n: int) -> None:
        self._run_bound(spec, self._bindings.get((spec.budget, n)) or self._bind_decode(spec, n))

    def _run_verify(self, spec: GraphSpec, n: int, S: int) -> None:
        key = (spec.kind, n, S)
        binding = self._bindings.get(key)
        if binding is None:
            ins, outs = self._verify_io(spec, n, S)  # all in host memory here
            binding = self._bindings[key] = self._binding(self.sessions[spec.name], [x[:4] for x in ins],
                                                          [x[:4] for x in outs])
        self._run_bound(spec, binding)

    def _run_bound(self, spec: GraphSpec, binding) -> None:
        """Run a graph on its binding with whichever API created the session."""
        with graph_range(spec.name):
            if self.env is not None:
                binding.run()
            else:
                self.sessions[spec.name].run_with_iobinding(binding)

    def _bind_decode(self, spec: GraphSpec, n: int):
        """Bind a bucket graph over slots [0, n) once; later steps only refresh the buffers' contents. Rows [0, n) of
        a [slots, ...] buffer start at its base address, so the addresses never change."""
        k, kv_shape, dtype = len(spec.layers), [n, self.heads, self.max_length, self.head_dim], self.kv.dtype
        inputs = [(C.INPUT_IDS, self._ids[:n]), (C.PAST_LENGTH, self._lengths[:n]),
                  (C.GATE, self._gate[: n * k].reshape(n, k))]
        if self.in_place:
            inputs.append((C.KV_LENGTH, self._kv_length))
        ins = [(name, a.dtype, list(a.shape), a.ctypes.data) for name, a in inputs]
        outs = [(C.LOGITS, np.dtype(np.float32), [n, self.vocab_size], self._logits.ctypes.data)]
        for layer in spec.layers:
            k_ptr, v_ptr = self.kv.keys[layer], self.kv.values[layer]
            ins += [(C.past_key(layer), dtype, kv_shape, k_ptr), (C.past_value(layer), dtype, kv_shape, v_ptr)]
            if self.in_place:  # present = past: the op writes the new column into the buffer itself
                outs += [(C.present_key(layer), dtype, kv_shape, k_ptr), (C.present_value(layer), dtype, kv_shape,
                                                                          v_ptr)]
            else:
                new = [n, self.heads, 1, self.head_dim]
                outs += [(C.new_key(layer), dtype, new, self.kv.new_keys[layer]),
                         (C.new_value(layer), dtype, new, self.kv.new_values[layer])]
        binding = self._binding(self.sessions[spec.name], ins, outs)
        self._bindings[(spec.budget, n)] = binding
        return binding

    def _binding(self, sess, inputs: list, outputs: list):
        """Bind (name, dtype, shape, host address) inputs and outputs with whichever API runs the session."""
        if self.env is not None:
            binding = sess.binding()
            for name, dtype, shape, ptr in inputs:
                binding.bind_input(name, ort_capi.Value(ptr, shape, dtype))
            for name, dtype, shape, ptr in outputs:
                binding.bind_output(name, ort_capi.Value(ptr, shape, dtype))
            return binding
        binding = sess.io_binding()
        for name, dtype, shape, ptr in inputs:
            binding.bind_input(name, "cpu", 0, dtype, shape, ptr)
        for name, dtype, shape, ptr in outputs:
            binding.bind_output(name, "cpu", 0, dtype, shape, ptr)
        return binding

    def _release(self) -> None:
        self._bindings.clear()
        self.sessions.clear()
        if self.env is not None:
            self._finalizer()  # Env.close, once: sessions, bindings, the packed weights, the OrtValues
        else:
            self.weights.clear()


_capi_pool: dict = {}


def _capi_threads(threads: int | None) -> int:
    """Size of the C API sessions' one thread pool: the Python-side shared pool's size when the process has one,
    else the first engine's `threads` (default every core). onnxruntime has one environment per process, so engines
    loaded later share that pool whatever `threads` they ask for (as with `use_global_thread_pool`)."""
    if "threads" not in _capi_pool:
        _capi_pool["threads"] = _global_pool.get("threads") or threads or os.cpu_count() or 1
    return _capi_pool["threads"]
