"""onnxruntime backend: one session per graph, one copy of the weights shared by all of them.

Sessions come from runtime/ort_sessions.py, behind one interface whichever onnxruntime API runs them. Pre-packing
(`prepack`): MLAS packs MatMul/Gemm weights into its own layout at session creation, which makes batched steps much
faster, but by default each session packs a private copy. Modes:
* "shared" (default where the C API library is present): C API sessions over one `PrepackedWeightsContainer`, so
  every graph computes from ONE packed copy of each weight. The weights are read into the engine's own memory (the
  file may change after load) and the bytes of those every graph reads only in packed form (`manifest.prepacked`)
  are given back after a check that no graph reads them (memory and speed: docs/bench/, "prepack" rows).
* "private": the Python API with pre-packing on: the same speed, one packed copy per session.
* "off": the Python API with pre-packing disabled (the smallest, slowest at batch > 1).
KV: a `KVCache` in host memory (runtime/kv.py, ragged slot layout); decode and verify graphs are bound once to the
cache's slot rows by address (`GraphBackend._decode_io` / `_verify_io`), read the cache in place and (gqa flavour)
write the new column in place too. The CUDA backend (runtime/cuda_backend.py) runs the same bindings on the device.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as C
from . import ort_capi
from .device import HostRuntime
from .errors import BackendError, EngineError
from .manifest import GraphSpec, Manifest
from .ort_sessions import (  # noqa: F401 - re-exported: the names callers used before ort_sessions existed
    CapiSessions,
    GraphSessions,
    PythonSessions,
    check_io_names,
    check_session_io,
    configure_onnxruntime,
    load_weights,
    open_session,
    session_options,
    use_global_thread_pool,
)
from .profiling import graph_range
from .slot_backend import GraphBackend

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
        if self.prepack == "shared":
            sessions: GraphSessions = CapiSessions(directory, man, threads)
        else:
            sessions = PythonSessions(directory, man, providers,
                                      lambda: session_options(self.prepack == "private", threads), threads=threads)
        self._open(sessions)
        try:
            # every graph runs once before the engine is handed out: an engine that loads but cannot compute (an
            # edited weight shape that keeps the byte count) fails here, not at its first request
            # the bytes nothing reads again: weights every graph has pre-packed, and those no loaded graph reads
            self.released_bytes = sessions.release_packed(man.prepacked + man.unread_weights(), self._probe,
                                                          self._probe())
        except Exception as exc:
            self._finalizer()
            raise EngineError(f"engine {directory.name} loads but its graphs fail on a test input: "
                              f"{str(exc).splitlines()[0][:400]}") from exc

    def _open(self, sessions: GraphSessions) -> None:
        self.sessions, self.threads = sessions, sessions.threads
        self._bindings: dict[tuple, object] = {}
        # an engine dropped without close() still gives its sessions back; not at interpreter exit, where the
        # process's memory goes back anyway and another thread may still be inside a graph call
        self._finalizer = weakref.finalize(self, sessions.close)
        self._finalizer.atexit = False

    def _probe(self) -> list[np.ndarray]:
        """Outputs of one call of the prefill graph and of every decode and draft graph on fixed inputs, in slot 0 (no
        generation holds a slot yet). The verify graphs are not run (their buffers are allocated on first use): they
        read the same weights through the same operators as the prefill graph."""
        token = self.pad_token_id + 1  # one prompt token, one decoded: fits any max_length (>= 2)
        ids, mask = np.array([[token]], dtype=np.int64), np.ones((1, 1), dtype=np.int64)
        out = [self._prefill(ids, np.zeros((1, 1), dtype=np.int64), mask, [0]).copy()]
        for bucket in self.buckets:
            gates = np.ones((1, bucket), dtype=bool)
            out.append(self._decode(np.array([token]), np.array([1], dtype=np.int32), bucket, gates).copy())
        for bucket in self.draft_buckets:  # they read quantized weights no other graph reads
            gates = np.ones((1, bucket), dtype=bool)
            out.append(self._decode_draft(np.array([token]), np.array([1], dtype=np.int32), bucket, gates).copy())
        return out

    def _run_prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray):
        # ids, pos, mask: [B, S], prompts right-aligned (left padding); K/V outputs [B, H, S, D] in host memory
        spec = self.manifest.prefill()
        with graph_range(spec.name):
            outs = self.sessions.run(spec.name, {C.INPUT_IDS: ids, C.POSITION_IDS: pos, C.ATTENTION_MASK: mask})
        kv = [(np.ascontiguousarray(outs[1 + 2 * layer]), np.ascontiguousarray(outs[2 + 2 * layer]))
              for layer in range(self.num_layers)]
        return outs[0], [(k.ctypes.data, v.ctypes.data) for k, v in kv], kv

    def _run_decode(self, spec: GraphSpec, n: int) -> None:
        self._run_bound(spec, (spec.name, n), lambda: self._decode_io(spec, n))

    def _run_verify(self, spec: GraphSpec, n: int, S: int) -> None:
        self._run_bound(spec, (spec.kind, n, S), lambda: self._verify_io(spec, n, S))

    def _run_bound(self, spec: GraphSpec, key: tuple, io) -> None:
        """Run `spec` on its binding for `key`, made from `io()` on first use; later calls only refresh the bound
        buffers' contents."""
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = self.sessions.bind(spec.name, *io())
        with graph_range(spec.name):
            binding.run()

    def _release(self) -> None:
        self._bindings.clear()
        self._finalizer()  # sessions.close, once: sessions, bindings, the (packed) weights
