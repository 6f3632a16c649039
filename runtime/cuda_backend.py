"""onnxruntime CUDA backend: device-resident weights and KV, graphs bound to device pointers with IOBinding.

Same `StepBackend` interface (and slot API) as `OrtBackend`; what differs is where memory lives:
* Weights: each tensor is copied to the GPU once as a CUDA `OrtValue` and handed to every session with
  `SessionOptions.add_initializer`; onnxruntime uses a user initializer in place when it already sits on the
  device the session planned for it, so all bucket sessions share one device copy.
* KV: per layer K and V device buffers [slots, heads, max_length, head_dim] (runtime/contract.py), zeroed once.
  Decode graphs are IOBinding-bound to their device pointers; the gqa flavour writes the new column in place,
  the matmul flavour's new K/V land in device staging buffers and are moved into place with cudaMemcpy2DAsync.
  Prefill K/V come back on the device and each row's real columns are copied into its slot the same way.
* Small inputs (ids, lengths, gates, kv_length) and the logits stay in host buffers bound by pointer:
  onnxruntime copies them per run (a few KiB), and GroupQueryAttention reads kv_length on the host anyway.
* One CUDA stream (cuda-python) is given to onnxruntime as `user_compute_stream`, so its kernels and our K/V
  copies are ordered on the same stream.

Requires onnxruntime-gpu (which replaces onnxruntime; see docs/GPU.md) and cuda-python. Nothing here falls back
to CPU: a missing provider or a session that did not get CUDA is a `BackendError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as C
from .device import CudaRuntime, HostRuntime, column_copies, prefill_copies
from .errors import BackendError, EngineError, check_int
from .manifest import GraphSpec, Manifest
from .ort_backend import check_session_io, session_options
from .profiling import graph_range
from .slot_backend import SlotBackend

CUDA_EP = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Placement:
    """Where the backend's memory lives: CUDA (the product), or host memory under the CPU provider, which runs the
    same bindings and slot copies on CPU so tests can check them against OrtBackend without a GPU."""

    device_type: str  # onnxruntime's OrtValue/IOBinding device name
    provider: str


CUDA = Placement("cuda", CUDA_EP)
HOST_EMULATION = Placement("cpu", "CPUExecutionProvider")


def check_cuda_provider() -> None:
    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise BackendError(f"{CUDA_EP} is not available in this onnxruntime ({ort.__version__}, providers "
                           f"{available}): install onnxruntime-gpu in place of onnxruntime (docs/GPU.md)")


class CudaBackend(SlotBackend):
    """`StepBackend` over one engine directory on CUDA device `device`. Static batches use slots 0..B-1."""

    def __init__(self, directory: str | Path, man: Manifest, device: int = 0, max_batch: int | None = None,
                 max_length: int | None = None, placement: Placement = CUDA) -> None:
        self.placement, self.device_type = placement, placement.device_type
        if placement == CUDA:
            check_cuda_provider()
        if placement == CUDA and man.attention == "gqa" and man.dtype != "float16":
            # onnxruntime registers GroupQueryAttention on CUDA for float16 and bfloat16 only
            raise BackendError(f"this engine is {man.dtype} with gqa attention; GroupQueryAttention runs on CUDA in "
                               "float16 only: export with --dtype fp16 (or use the matmul flavour)")
        directory = Path(directory)
        self.manifest, self.device = man, device
        self._setup(man, max_batch, max_length)
        self.itemsize = np.dtype(man.dtype).itemsize
        self.cuda = CudaRuntime(device) if placement == CUDA else HostRuntime()
        self.weights = self._load_weights(directory)
        providers = ([(CUDA_EP, {"device_id": str(device), "user_compute_stream": str(self.cuda.stream_handle)})]
                     if placement == CUDA else [placement.provider])
        self.sessions = {g.name: self._open(directory, g, providers) for g in man.graphs}
        self._allocate_kv()
        self._logits = np.zeros(self.max_batch * self.vocab_size, dtype=np.float32)
        self._ids = np.zeros((self.max_batch, 1), dtype=np.int64)
        self._lengths = np.zeros(self.max_batch, dtype=np.int32)
        self._kv_length = np.zeros((), dtype=np.int32)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    # -- loading ---------------------------------------------------------------------------------------------
    def _load_weights(self, directory: Path) -> dict[str, ort.OrtValue]:
        """weights.bin -> one CUDA OrtValue per tensor (the only device copy; every session gets these)."""
        buf = np.fromfile(directory / self.manifest.weights_file, dtype=np.uint8)
        out = {}
        for name, w in self.manifest.weights.items():
            arr = buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape)
            out[name] = ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, self.device)
        return out

    def _open(self, directory: Path, spec: GraphSpec, providers) -> ort.InferenceSession:
        so = session_options(prepack=False)
        for name in spec.weights:
            so.add_initializer(name, self.weights[name])
        try:
            sess = ort.InferenceSession(str(directory / spec.file), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types; name the graph that failed
            raise EngineError(f"onnxruntime (CUDA) cannot load graph {spec.name} ({spec.file}): {exc}") from exc
        if sess.get_providers()[0] != self.placement.provider:  # CUDA silently drops to CPU without its libraries
            raise BackendError(f"graph {spec.name} did not get {self.placement.provider} (session providers "
                               f"{sess.get_providers()}): check the CUDA/cuDNN libraries onnxruntime-gpu needs")
        check_session_io(sess, spec)
        return sess

    def _allocate_kv(self) -> None:
        shape = (self.max_batch, self.heads, self.max_length, self.head_dim)
        dtype = np.dtype(self.manifest.dtype)

        def buffer(s):
            ov = ort.OrtValue.ortvalue_from_shape_and_type(list(s), dtype, self.device_type, self.device)
            self.cuda.zero(ov.data_ptr(), int(np.prod(s)) * dtype.itemsize)  # finite from the start (kv.py)
            return ov

        self.keys = [buffer(shape) for _ in range(self.num_layers)]
        self.values = [buffer(shape) for _ in range(self.num_layers)]
        staged = (self.max_batch, self.heads, 1, self.head_dim)
        self.new_keys = [] if self.in_place else [buffer(staged) for _ in range(self.num_layers)]
        self.new_values = [] if self.in_place else [buffer(staged) for _ in range(self.num_layers)]
        self.cuda.synchronize()

    # -- internals -------------------------------------------------------------------------------------------
    def _prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, slots: list[int]) -> np.ndarray:
        # ids, pos, mask: [B, S], prompts right-aligned; K/V outputs are allocated by onnxruntime on the device
        B, S = ids.shape
        check_int("batch size", B, lo=1, hi=self.max_batch)
        spec = self.manifest.prefill()
        binding = self.sessions[spec.name].io_binding()
        mask = np.ascontiguousarray(mask)
        for name, arr in ((C.INPUT_IDS, ids), (C.POSITION_IDS, pos), (C.ATTENTION_MASK, mask)):
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        logits = self._logits[: B * self.vocab_size].reshape(B, self.vocab_size)
        binding.bind_output(C.LOGITS, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        for layer in range(self.num_layers):
            binding.bind_output(C.present_key(layer), self.device_type, self.device)
            binding.bind_output(C.present_value(layer), self.device_type, self.device)
        with graph_range(spec.name):
            self.sessions[spec.name].run_with_iobinding(binding)
        outs = binding.get_outputs()
        plan = prefill_copies(mask.sum(axis=1), slots, S, self.heads, self.head_dim, self.max_length, self.itemsize)
        for layer in range(self.num_layers):
            self.cuda.copy2d(self.keys[layer].data_ptr(), outs[1 + 2 * layer].data_ptr(), plan)
            self.cuda.copy2d(self.values[layer].data_ptr(), outs[2 + 2 * layer].data_ptr(), plan)
        self.cuda.synchronize()  # the prefill outputs are released with the binding below
        binding.clear_binding_outputs()
        return logits

    def _move_new_kv(self, layers, gates: np.ndarray | None, lengths: np.ndarray) -> None:
        every = range(len(lengths))
        for j, layer in enumerate(layers):
            rows = every if gates is None else np.flatnonzero(gates[:, j])  # a gated-off row writes no K/V
            plan = column_copies(rows, lengths, self.heads, self.head_dim, self.max_length, self.itemsize)
            self.cuda.copy2d(self.keys[layer].data_ptr(), self.new_keys[layer].data_ptr(), plan)
            self.cuda.copy2d(self.values[layer].data_ptr(), self.new_values[layer].data_ptr(), plan)
        self.cuda.synchronize()

    def _bind_decode(self, spec: GraphSpec, n: int) -> ort.IOBinding:
        """Bind a bucket graph over slots [0, n) once: rows [0, n) of a [slots, ...] buffer start at its base
        pointer, so the device addresses never change; later steps only refresh the host inputs."""
        binding = self.sessions[spec.name].io_binding()
        k = len(spec.layers)
        host = {C.INPUT_IDS: self._ids[:n], C.PAST_LENGTH: self._lengths[:n], C.GATE: self._gate[: n * k].reshape(n, k)}
        if self.in_place:
            host[C.KV_LENGTH] = self._kv_length
        for name, arr in host.items():
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        logits = self._logits[: n * self.vocab_size].reshape(n, self.vocab_size)
        binding.bind_output(C.LOGITS, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        dtype = np.dtype(self.manifest.dtype)
        kv = [n, self.heads, self.max_length, self.head_dim]
        for layer in spec.layers:
            k_ptr, v_ptr = self.keys[layer].data_ptr(), self.values[layer].data_ptr()
            binding.bind_input(C.past_key(layer), self.device_type, self.device, dtype, kv, k_ptr)
            binding.bind_input(C.past_value(layer), self.device_type, self.device, dtype, kv, v_ptr)
            if self.in_place:  # present = past: GroupQueryAttention writes the new column into the buffer itself
                binding.bind_output(C.present_key(layer), self.device_type, self.device, dtype, kv, k_ptr)
                binding.bind_output(C.present_value(layer), self.device_type, self.device, dtype, kv, v_ptr)
            else:
                new = [n, self.heads, 1, self.head_dim]
                staged = ((C.new_key(layer), self.new_keys[layer]), (C.new_value(layer), self.new_values[layer]))
                for name, buf in staged:
                    binding.bind_output(name, self.device_type, self.device, dtype, new, buf.data_ptr())
        self._bindings[(spec.budget, n)] = binding
        return binding

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's K and V buffers (tests and parity checks; not on the generation path)."""
        return self.keys[layer].numpy(), self.values[layer].numpy()
