"""onnxruntime sessions of one engine, behind one interface, and the process-wide onnxruntime setup.

Backends see `GraphSessions`: `run(name, feeds)` for unbound calls (the prefill), `bind(name, inputs, outputs)` for
a graph bound once to fixed buffers (`IO` entries: name, dtype, shape, address, on_device) and run every step.
Two implementations:

* `CapiSessions`: onnxruntime's C API (runtime/ort_capi.py) with one `PrepackedWeightsContainer`, so every graph
  computes from ONE pre-packed copy of each weight ("shared" pre-packing, the CPU default). The weights are read
  into this process's own memory; once the sessions are built, the bytes of the weights they pre-packed are given
  back (`release_packed`), after checking that no graph reads them.
* `PythonSessions`: onnxruntime's Python API, for "private" and "off" pre-packing on the CPU and for the CUDA
  provider (weights handed to it as device OrtValues, device buffers bound by address).

Process-wide setup (`configure_onnxruntime`): every session of a process shares one intra-op thread pool. With a
pool per session the workers of the graph that just ran keep spinning while the next bucket's graph runs, so the
first calls after a bucket switch took about twice as long on 2 cores (docs/export.md, "Threads"), and a
generation switches buckets every few steps. Turning spinning off removes that but made every step 15-20% slower.
The C API has its own environment with its own pool: both are sized once per process, here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from . import ort_capi
from .errors import BackendError, EngineError, check_int
from .manifest import GraphSpec, Manifest
from .slot_backend import IO
from .weights import read_weights

# -- process-wide setup --------------------------------------------------------------------------------------------

_process: dict = {}  # "threads": the shared pool's size once configured; "capi_threads": the C API environment's


def configure_onnxruntime(threads: int | None = None) -> int:
    """Every later onnxruntime session of this process (ours and any other Python-API session) shares one pool of
    `threads` intra-op threads (default: SKIPDECODE_THREADS, else every core); returns its size. Entry points that
    run engines (`skipdecode generate`/`serve`/`bench`, a Ray replica) call it once before loading one. onnxruntime
    then requires `use_per_session_threads = False` in every Python-API session of the process (`session_options`
    does that), which is why the library does not switch it on behind an embedding application's back. A later call
    asking for another size raises BackendError instead of silently keeping the first."""
    if threads is not None:
        check_int("threads", threads, lo=1, hi=1024)
    current = _process.get("threads")
    if current is not None:
        if threads is not None and threads != current:
            raise BackendError(f"threads={threads}: this process already runs onnxruntime with one shared pool of "
                               f"{current} threads")
        return current
    size = threads or int(os.environ.get("SKIPDECODE_THREADS", "0")) or os.cpu_count() or 1
    ort.set_global_thread_pool_sizes(size, 1)
    _process["threads"] = size
    return size


# The name entry points used before `configure_onnxruntime` existed.
use_global_thread_pool = configure_onnxruntime


def pool_threads() -> int | None:
    """The shared pool's size when the process configured one, else None."""
    return _process.get("threads")


def capi_threads(threads: int | None) -> int:
    """Size of the C API sessions' one thread pool: the shared pool's size when the process has one, else the first
    engine's `threads` (default every core). onnxruntime has one environment per process, so engines loaded later
    share that pool whatever `threads` they ask for (as with `configure_onnxruntime`)."""
    if "capi_threads" not in _process:
        _process["capi_threads"] = _process.get("threads") or threads or os.cpu_count() or 1
    return _process["capi_threads"]


def session_options(prepack: bool, threads: int | None = None) -> ort.SessionOptions:
    """Options for one graph's Python-API session: the shared pool when the process has one, else a pool of
    `threads`. `prepack=False` disables MLAS pre-packing (each session would pack a private copy)."""
    so = ort.SessionOptions()
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if "threads" in _process:
        # the process runs one shared pool: onnxruntime then requires every session to use it, so a per-engine
        # `threads` no longer applies (the sessions' `threads` reports the pool's size)
        so.use_per_session_threads = False
    else:
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


# -- graphs ---------------------------------------------------------------------------------------------------------

def load_weights(directory: Path, man: Manifest, device: str = "cpu", device_id: int = 0) -> dict[str, ort.OrtValue]:
    """The shared weights as OrtValues: views of the one host buffer read by runtime/weights.py (no copy), or one
    device copy each."""
    unread = set(man.unread_weights())  # another kernel form's weight set: no device copy of it
    weights = {k: v for k, v in read_weights(directory, man).items() if k not in unread}
    if device == "cpu":
        return {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in weights.items()}
    return {k: ort.OrtValue.ortvalue_from_numpy(v, device, device_id) for k, v in weights.items()}


def open_session(directory: Path, spec: GraphSpec, weights: dict[str, ort.OrtValue], providers: list,
                 so: ort.SessionOptions) -> ort.InferenceSession:
    """One graph's Python-API session with the shared weights as initializers; the requested providers must load."""
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


class GraphSessions:
    """One session per graph of an engine. `threads`: the intra-op threads they really use (None: every core)."""

    threads: int | None

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run graph `name` on host feeds; -> every output, in the graph's order, in host memory."""
        raise NotImplementedError

    def bind(self, name: str, inputs: list[IO], outputs: list[IO]):
        """Graph `name` bound to fixed buffers; -> an object whose `run()` runs it on their current contents."""
        raise NotImplementedError

    def release_packed(self, names: tuple[str, ...], probe: Callable[[], list[np.ndarray]],
                       before: list[np.ndarray]) -> int:
        """Give back the unpacked bytes of the weights `names` once every session has pre-packed them; `probe`
        runs the graphs, `before` is what it gave with every byte in place. -> bytes given back (0 where the
        weights are not the sessions' own)."""
        return 0

    def close(self) -> None:
        raise NotImplementedError


class CapiSessions(GraphSessions):
    """C API sessions over one pre-packed weights container (see the module docstring)."""

    def __init__(self, directory: Path, man: Manifest, threads: int | None) -> None:
        self.threads = capi_threads(threads)
        self.env = ort_capi.Env(self.threads)
        self._path = directory / man.weights_file
        self._man = man
        try:
            self._buf = ort_capi.read_private(self._path)  # the engine's own copy: the file may change after load
            weights = {k: self.env.value(v) for k, v in read_weights(directory, man, self._buf).items()}
            self._sessions = {}
            for g in man.graphs:
                try:
                    sess = self.env.session(directory / g.file, {n: weights[n] for n in g.weights})
                except ort_capi.OrtCapiError as exc:
                    raise EngineError(f"onnxruntime cannot load graph {g.name} ({g.file}): {exc}") from exc
                check_io_names(g, sess.input_names, sess.output_names)
                self._sessions[g.name] = sess
        except BaseException:
            self.env.close()
            raise

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sessions[name].run(feeds)

    def bind(self, name: str, inputs: list[IO], outputs: list[IO]):
        binding = self._sessions[name].binding()
        for x in inputs:
            binding.bind_input(x.name, ort_capi.Value(x.address, x.shape, x.dtype))
        for x in outputs:
            binding.bind_output(x.name, ort_capi.Value(x.address, x.shape, x.dtype))
        return binding

    def release_packed(self, names: tuple[str, ...], probe: Callable[[], list[np.ndarray]],
                       before: list[np.ndarray]) -> int:
        """Every graph must give the same outputs after the release as `before` (a released page reads as zeros);
        if not, the bytes are read back from the file and stay resident."""
        ranges = [(self._man.weights[n].offset, self._man.weights[n].offset + self._man.weights[n].nbytes)
                  for n in names]
        if not ranges:
            return 0
        released = ort_capi.release_pages(self._buf, ranges)
        if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, probe(), strict=True)):
            return released
        ort_capi.restore_pages(self._buf, self._path, ranges)
        warnings.warn(f"onnxruntime {ort.__version__} still reads weights it was expected to have pre-packed; the "
                      "engine keeps their unpacked copy resident", RuntimeWarning, stacklevel=4)
        return 0

    def close(self) -> None:
        self._sessions = {}
        self.env.close()  # sessions, bindings, the packed weights, the OrtValues


class PythonSessions(GraphSessions):
    """Python-API sessions: host weights shared by every CPU session, or one device copy each for CUDA
    (`device` = onnxruntime's device name for the memory of `on_device` buffers and of the weights)."""

    def __init__(self, directory: Path, man: Manifest, providers: list, so: Callable[[], ort.SessionOptions],
                 device: str = "cpu", device_id: int = 0, threads: int | None = None) -> None:
        self.device, self.device_id = device, device_id
        self.threads = pool_threads() or threads
        self.weights = load_weights(directory, man, device, device_id)
        self.sessions = {g.name: open_session(directory, g, self.weights, providers, so()) for g in man.graphs}

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)

    def bind(self, name: str, inputs: list[IO], outputs: list[IO]):
        sess = self.sessions[name]
        binding = sess.io_binding()
        for bind, items in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
            for x in items:
                where, dev = (self.device, self.device_id) if x.on_device else ("cpu", 0)
                bind(x.name, where, dev, x.dtype, list(x.shape), x.address)
        return _PythonBinding(sess, binding)

    def close(self) -> None:
        self.sessions.clear()
        self.weights.clear()


class _PythonBinding(NamedTuple):
    session: ort.InferenceSession
    binding: ort.IOBinding

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
