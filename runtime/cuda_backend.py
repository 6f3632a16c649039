"""onnxruntime CUDA backend: device-resident weights and KV, graphs bound to device pointers with IOBinding.

An `OrtBackend` whose memory lives on the GPU: the same slot API, the same bound decode and verify calls
(`GraphBackend._decode_io` / `_verify_io`, on-device entries bound to device pointers). What differs:
* Weights: each tensor is copied to the GPU once as a CUDA `OrtValue` and handed to every session with
  `SessionOptions.add_initializer`; onnxruntime uses a user initializer in place when it already sits on the
  device the session planned for it, so all bucket sessions share one device copy.
* KV: a `KVCache` (runtime/kv.py) in device memory allocated with cudaMalloc, zeroed once. Decode graphs are
  IOBinding-bound to its device pointers; the gqa flavour writes the new column in place, the matmul flavour's new
  K/V land in device staging buffers and are moved into place with cudaMemcpy2DAsync. Prefill K/V come back on the
  device and each row's real columns are copied into its slot the same way.
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
from .device import CudaRuntime, HostRuntime
from .errors import BackendError
from .manifest import Manifest
from .ort_backend import OrtBackend
from .ort_sessions import PythonSessions, session_options
from .profiling import graph_range

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


class CudaBackend(OrtBackend):
    """The slot API over one engine directory on CUDA device `device`: OrtBackend's bound decode and verify calls,
    with the K/V buffers and weights in device memory."""

    def __init__(self, directory: str | Path, man: Manifest, device: int = 0, max_batch: int | None = None,
                 max_length: int | None = None, placement: Placement = CUDA) -> None:
        self.placement, self.device_type, self.device = placement, placement.device_type, device
        if placement == CUDA:
            check_cuda_provider()
        if placement == CUDA and man.attention == "gqa" and man.dtype != "float16":
            # onnxruntime registers GroupQueryAttention on CUDA for float16 and bfloat16 only
            raise BackendError(f"this engine is {man.dtype} with gqa attention; GroupQueryAttention runs on CUDA in "
                               "float16 only: export with --dtype fp16 (or use the matmul flavour)")
        directory = Path(directory)
        # quantized draft graphs (MatMulNBits) are not run on the GPU: lossless mode drafts with the float buckets
        man = man.without_drafts()
        self.prepack = "off"
        self.cuda = CudaRuntime(device) if placement == CUDA else HostRuntime()
        self._setup(man, max_batch, max_length, self.cuda)
        # weights.bin -> one device OrtValue per tensor (the only device copy; every session gets these)
        providers = ([(CUDA_EP, {"device_id": str(device), "user_compute_stream": str(self.cuda.stream_handle)})]
                     if placement == CUDA else [placement.provider])
        self._open(PythonSessions(directory, man, providers, lambda: session_options(prepack=False),
                                  device=self.device_type, device_id=device))
        self.released_bytes = 0

    def _run_prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray):
        # ids, pos, mask: [B, S] host, prompts right-aligned; K/V outputs are allocated by onnxruntime on the device
        B, S = ids.shape
        spec = self.manifest.prefill()
        session = self.sessions.sessions[spec.name]
        binding = session.io_binding()
        for name, arr in ((C.INPUT_IDS, ids), (C.POSITION_IDS, pos), (C.ATTENTION_MASK, mask)):
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        logits = self._logits[: B * self.vocab_size].reshape(B, self.vocab_size)
        binding.bind_output(C.LOGITS, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        for layer in range(self.num_layers):
            binding.bind_output(C.present_key(layer), self.device_type, self.device)
            binding.bind_output(C.present_value(layer), self.device_type, self.device)
        with graph_range(spec.name):
            session.run_with_iobinding(binding)
        outs = binding.get_outputs()  # kept alive (with the binding) until the slot copies are synchronized
        kv = [(outs[1 + 2 * layer].data_ptr(), outs[2 + 2 * layer].data_ptr()) for layer in range(self.num_layers)]
        return logits, kv, (binding, outs)
