"""CUDA device memory for the GPU backends: allocations, copies, and the copy plans that move K/V between buffers.

Two halves:
* Copy plans (pure, no CUDA): `Copy2D` describes one strided copy exactly as cudaMemcpy2D takes it (byte offsets,
  pitches, row width, row count). `prefill_copies` moves each prompt's real columns from a left-padded prefill
  output [B, H, S, D] into columns [0, len) of its KV slot [slots, H, T, D]; `column_copies` moves a decode
  step's new K/V [n, H, 1, D] into column `past_length[i]` of row i (matmul flavour). `apply_copies` executes a
  plan on numpy buffers, so tests check the plans against the layout written out by hand.
* `CudaRuntime`: the cuda-python runtime API (`cuda.bindings.runtime`) behind a few methods; every status code
  is turned into a `BackendError` in one helper (`_check`). One stream per backend; everything a backend does on
  the device is ordered on it.

Alignment: TensorRT requires every tensor address to be 256-byte aligned; cudaMalloc returns 256-byte aligned
memory and `aligned_offsets` lays tensors out on that boundary inside one allocation.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BackendError

DEVICE_ALIGN = 256  # bytes: TensorRT's minimum for tensor addresses, and what cudaMalloc guarantees


@dataclass(frozen=True)
class Copy2D:
    """`height` rows of `width` bytes: row r goes from src + r*spitch to dst + r*dpitch (offsets in bytes)."""

    dst: int
    dpitch: int
    src: int
    spitch: int
    width: int
    height: int


def prefill_copies(lengths: Sequence[int], slots: Sequence[int], seq: int, heads: int, head_dim: int,
                   max_length: int, itemsize: int) -> list[Copy2D]:
    """Left-padded prefill K (or V) [B, H, S, D] -> slot buffer [slots, H, T, D]: row b's last `lengths[b]`
    columns land at columns [0, lengths[b]) of slot `slots[b]`; one copy per row (H rows of len*D elements)."""
    col = head_dim * itemsize
    out = []
    for b, (n, slot) in enumerate(zip(lengths, slots, strict=True)):
        n, slot = int(n), int(slot)
        if not 0 < n <= min(seq, max_length):
            raise ValueError(f"row {b} has length {n}; a prefill of {seq} columns into {max_length} needs 1..{seq}")
        out.append(Copy2D(dst=slot * heads * max_length * col, dpitch=max_length * col,
                          src=(b * heads * seq + seq - n) * col, spitch=seq * col, width=n * col, height=heads))
    return out


def column_copies(rows: Iterable[int], columns: Sequence[int], heads: int, head_dim: int, max_length: int,
                  itemsize: int) -> list[Copy2D]:
    """New K (or V) [n, H, 1, D] -> slot buffer [slots, H, T, D]: row r's vectors land at column columns[r] of slot r
    (rows bound to a call are slots 0..n-1); one copy per row (H rows of D elements)."""
    rows = list(rows)
    return span_copies(rows, columns, [1] * (max(rows) + 1 if rows else 0), 1, heads, head_dim, max_length, itemsize)


def span_copies(rows: Iterable[int], columns: Sequence[int], counts: Sequence[int], seq: int, heads: int,
                head_dim: int, max_length: int, itemsize: int) -> list[Copy2D]:
    """New K (or V) of `seq` tokens [n, H, seq, D] -> slot buffer [slots, H, T, D]: the first counts[r] tokens of row r
    land at columns columns[r] .. columns[r] + counts[r] - 1 of slot r; one copy per row (H rows of counts[r] x D
    elements)."""
    col = head_dim * itemsize
    out = []
    for r in map(int, rows):  # plain ints: cuda-python and ctypes take Python ints as addresses
        c, n = int(columns[r]), int(counts[r])
        if not (0 <= c and 1 <= n <= seq and c + n <= max_length):
            raise ValueError(f"row {r}: columns [{c}, {c + n}) ({n} of {seq} new tokens) are outside [0, {max_length})")
        out.append(Copy2D(dst=(r * heads * max_length + c) * col, dpitch=max_length * col,
                          src=r * heads * seq * col, spitch=seq * col, width=n * col, height=heads))
    return out


def apply_copies(dst: np.ndarray, src: np.ndarray, copies: Iterable[Copy2D]) -> None:
    """Execute a plan on host arrays (the reference semantics of cudaMemcpy2D, for tests)."""
    d = dst.reshape(-1).view(np.uint8)
    s = src.reshape(-1).view(np.uint8)
    for c in copies:
        for r in range(c.height):
            d[c.dst + r * c.dpitch: c.dst + r * c.dpitch + c.width] = s[c.src + r * c.spitch: c.src + r * c.spitch
                                                                         + c.width]


def aligned_offsets(sizes: dict[str, int], align: int = DEVICE_ALIGN) -> tuple[dict[str, int], int]:
    """Lay tensors out in one allocation, each starting on an `align` boundary -> ({name: offset}, total bytes)."""
    offsets, total = {}, 0
    for name, nbytes in sizes.items():
        total += (-total) % align
        offsets[name] = total
        total += nbytes
    return offsets, total


def import_cudart():
    """cuda-python's runtime module, or a BackendError that says what to install."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (cuda-bindings)
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as exc:
            raise BackendError("the GPU backends need cuda-python for device memory: pip install -e '.[gpu]' "
                               f"(see docs/GPU.md); import failed: {exc}") from exc
    return cudart


class CudaRuntime:
    """Device `device`'s memory and one stream. Owns every pointer it allocates; `close()` frees them."""

    def __init__(self, device: int = 0) -> None:
        self.rt = import_cudart()
        self.device = device
        self._check(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        self.stream = self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._owned: list[int] = []

    @property
    def stream_handle(self) -> int:
        """The stream as an integer handle (what TensorRT's execute_async_v3 and ORT's user_compute_stream take)."""
        return int(self.stream)

    def _check(self, result, what: str):
        # cuda-python returns (cudaError_t, *values); anything but cudaSuccess becomes a BackendError
        err, *values = result
        if err != self.rt.cudaError_t.cudaSuccess:
            _, name = self.rt.cudaGetErrorName(err)
            raise BackendError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else (tuple(values) if values else None)

    def malloc(self, nbytes: int, zero: bool = True) -> int:
        ptr = int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))
        self._owned.append(ptr)
        if zero:
            self.zero(ptr, nbytes)
        return ptr

    def zero(self, ptr: int, nbytes: int) -> None:
        # K/V buffers must never hold NaN garbage: a masked column still enters the softmax's sum with weight 0
        self._check(self.rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "cudaMemsetAsync")

    def available_bytes(self) -> int:
        """Free memory on the device now (what the KV cache may take; runtime/kv.py checks before allocating)."""
        free, _total = self._check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)

    def free(self, ptr: int) -> None:
        self._owned.remove(ptr)
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def h2d(self, dst: int, host: np.ndarray) -> None:
        # From pageable memory the call returns once the data is staged, so `host` may be a temporary.
        host = np.ascontiguousarray(host)
        self._check(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                    "cudaMemcpyAsync(host to device)")

    def d2h(self, host: np.ndarray, src: int) -> None:
        """Copy into `host` (contiguous); the data is there after `synchronize()`."""
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                    "cudaMemcpyAsync(device to host)")

    def copy2d(self, dst_base: int, src_base: int, copies: Iterable[Copy2D]) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for c in copies:
            self._check(self.rt.cudaMemcpy2DAsync(dst_base + c.dst, c.dpitch, src_base + c.src, c.spitch, c.width,
                                                  c.height, kind, self.stream), "cudaMemcpy2DAsync")

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        self.synchronize()
        for ptr in list(self._owned):
            self.free(ptr)
        self._check(self.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")


class HostRuntime:
    """`CudaRuntime`'s interface on host memory: the onnxruntime CPU backend's KV memory (runtime/kv.py), and what
    lets the GPU backends' plumbing (bindings, slot copies, staging) run under onnxruntime's CPU provider, so tests
    check it against the CPU backend without a GPU."""

    stream_handle = 0

    def __init__(self) -> None:
        self._owned: dict[int, np.ndarray] = {}

    def malloc(self, nbytes: int, zero: bool = True) -> int:
        buf = np.zeros(max(int(nbytes), 1) + DEVICE_ALIGN, dtype=np.uint8)
        ptr = buf.ctypes.data + (-buf.ctypes.data) % DEVICE_ALIGN  # the same alignment cudaMalloc gives
        self._owned[ptr] = buf
        return ptr

    def zero(self, ptr: int, nbytes: int) -> None:
        ctypes.memset(ptr, 0, nbytes)

    @staticmethod
    def available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
        """MemAvailable: what can be allocated without swapping or the OOM killer (None where there is no
        /proc/meminfo). Zeroed numpy buffers are lazily backed, so without this check a 179 TiB KV arena
        "allocates" and the process dies later."""
        try:
            with open(meminfo) as f:
                line = next((x for x in f if x.startswith("MemAvailable:")), None)
        except OSError:
            return None
        return int(line.split()[1]) * 1024 if line else None

    def free(self, ptr: int) -> None:
        del self._owned[ptr]

    def h2d(self, dst: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        ctypes.memmove(dst, host.ctypes.data, host.nbytes)

    def d2h(self, host: np.ndarray, src: int) -> None:
        ctypes.memmove(host.ctypes.data, src, host.nbytes)

    def as_array(self, ptr: int, shape: Sequence[int], dtype) -> np.ndarray:
        """An ndarray view of host memory at `ptr` (no copy): host-only fast paths index it directly."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape))
        return np.frombuffer((ctypes.c_uint8 * (n * dtype.itemsize)).from_address(ptr), dtype=dtype).reshape(shape)

    def copy2d(self, dst_base: int, src_base: int, copies: Iterable[Copy2D]) -> None:
        for c in copies:  # one strided numpy copy per Copy2D (what cudaMemcpy2D does in one call)
            _strided(dst_base + c.dst, c.dpitch, c.width, c.height)[...] = _strided(src_base + c.src, c.spitch,
                                                                                     c.width, c.height)

    def synchronize(self) -> None:
        return None

    def close(self) -> None:
        self._owned.clear()


def _strided(ptr: int, pitch: int, width: int, height: int) -> np.ndarray:
    """[height, width] uint8 view of host memory at `ptr` whose rows are `pitch` bytes apart (no copy)."""
    flat = np.frombuffer((ctypes.c_uint8 * (pitch * (height - 1) + width)).from_address(ptr), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(flat, shape=(height, width), strides=(pitch, 1))
