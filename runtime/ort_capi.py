"""A small ctypes wrapper over onnxruntime's C API: what the CPU decode path needs and the Python API lacks.

Why: the Python API cannot create sessions with `CreateSessionWithPrepackedWeightsContainer`. With one shared
`OrtPrepackedWeightsContainer`, every bucket graph's session re-uses ONE pre-packed (MLAS) copy of each weight
that was handed to it with `AddInitializer`, instead of one private packed copy per session. The caller's
unpacked weights stay resident too unless `release_pages` gives back those the sessions have packed once every
session is created.

Library: `libonnxruntime.so.*` shipped inside the installed `onnxruntime` wheel, located without importing the
Python package. That library and the Python module (`onnxruntime_pybind11_state*.so`) are two separate, statically
linked copies of onnxruntime (each exports only its entry point), so they do not interfere at the symbol level, but
they have separate `OrtEnv`s and thread pools: a process that runs both has two sets of intra-op threads.

Ownership (everything is released by `close()`, or on leaving a `with` block, in reverse order of creation):
    Env ── owns ─┬─ Value      OrtValues over caller memory (weights); the caller keeps the numpy buffer alive
                 ├─ the PrepackedWeightsContainer (must outlive every session that packed into it)
                 └─ Session ── owns ── Binding ── owns ── the OrtValues it bound
Closing an owner closes what it owns first. Python references (`keep`) pin the numpy buffers the C side points to.

Errors: every `OrtStatus*` goes through `_check_status`, which raises `OrtCapiError` with ORT's message and code.
`OrtCapiUnavailable` (also an ImportError) means the library is missing or does not offer the needed API version;
importing this module never raises it, the first use does (`api()` / `available()`).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import mmap
import os
from ctypes import POINTER, c_char_p, c_int, c_int64, c_size_t, c_void_p
from pathlib import Path

import numpy as np

ORT_API_VERSION = 31  # onnxruntime 1.31; every function used here exists since API version 8 (ORT 1.8)

# OrtLoggingLevel, GraphOptimizationLevel, OrtAllocatorType/OrtMemType values of onnxruntime_c_api.h
LOG_WARNING, LOG_ERROR = 2, 3
ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_EXTENDED, ORT_ENABLE_ALL = 0, 1, 2, 99
_ORT_ARENA_ALLOCATOR, _ORT_MEM_TYPE_DEFAULT = 1, 0

# ONNXTensorElementDataType <-> numpy
_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.uint16): 4,
               np.dtype(np.int16): 5, np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.bool_): 9,
               np.dtype(np.float16): 10, np.dtype(np.float64): 11, np.dtype(np.uint32): 12,
               np.dtype(np.uint64): 13}
_NUMPY_TYPES = {v: k for k, v in _ONNX_TYPES.items()}

_P, _PP = c_void_p, POINTER(c_void_p)
_STATUS = "status"  # restype marker: the function returns an OrtStatus* (NULL = success)

# name: (index of the function pointer in struct OrtApi, restype, argtypes). The indices follow the order of the
# OrtApi initializer list in onnxruntime/core/session/onnxruntime_c_api.cc, which is append-only; checked against
# its static_asserts (ReleaseCustomOpDomain 101, ReleaseModelMetadata 118, AddFreeDimensionOverrideByName 124,
# SetGlobalSpinControl 149, ReleaseArenaCfg 157, CreateSessionFromArrayWithPrepackedWeightsContainer 169).
_FUNCS: dict[str, tuple[int, object, list]] = {
    "CreateStatus": (0, _P, [c_int, c_char_p]),
    "GetErrorCode": (1, c_int, [_P]),
    "GetErrorMessage": (2, c_char_p, [_P]),
    "CreateEnv": (3, _STATUS, [c_int, c_char_p, _PP]),
    "CreateSession": (7, _STATUS, [_P, c_char_p, _P, _PP]),
    "Run": (9, _STATUS, [_P, _P, POINTER(c_char_p), _PP, c_size_t, POINTER(c_char_p), c_size_t, _PP]),
    "CreateSessionOptions": (10, _STATUS, [_PP]),
    "SetSessionGraphOptimizationLevel": (23, _STATUS, [_P, c_int]),
    "SetIntraOpNumThreads": (24, _STATUS, [_P, c_int]),
    "SetInterOpNumThreads": (25, _STATUS, [_P, c_int]),
    "SessionGetInputCount": (30, _STATUS, [_P, POINTER(c_size_t)]),
    "SessionGetOutputCount": (31, _STATUS, [_P, POINTER(c_size_t)]),
    "SessionGetInputName": (36, _STATUS, [_P, c_size_t, _P, _PP]),
    "SessionGetOutputName": (37, _STATUS, [_P, c_size_t, _P, _PP]),
    "CreateTensorWithDataAsOrtValue": (49, _STATUS, [_P, _P, c_size_t, POINTER(c_int64), c_size_t, c_int, _PP]),
    "GetTensorMutableData": (51, _STATUS, [_P, _PP]),
    "GetTensorElementType": (60, _STATUS, [_P, POINTER(c_int)]),
    "GetDimensionsCount": (61, _STATUS, [_P, POINTER(c_size_t)]),
    "GetDimensions": (62, _STATUS, [_P, POINTER(c_int64), c_size_t]),
    "GetTensorTypeAndShape": (65, _STATUS, [_P, _PP]),
    "CreateCpuMemoryInfo": (69, _STATUS, [c_int, c_int, _PP]),
    "AllocatorFree": (76, _STATUS, [_P, _P]),
    "GetAllocatorWithDefaultOptions": (78, _STATUS, [_PP]),
    "ReleaseEnv": (92, None, [_P]),
    "ReleaseStatus": (93, None, [_P]),
    "ReleaseMemoryInfo": (94, None, [_P]),
    "ReleaseSession": (95, None, [_P]),
    "ReleaseValue": (96, None, [_P]),
    "ReleaseTensorTypeAndShapeInfo": (99, None, [_P]),
    "ReleaseSessionOptions": (100, None, [_P]),
    "CreateEnvWithGlobalThreadPools": (119, _STATUS, [c_int, c_char_p, _P, _PP]),
    "DisablePerSessionThreads": (120, _STATUS, [_P]),
    "CreateThreadingOptions": (121, _STATUS, [_PP]),
    "ReleaseThreadingOptions": (122, None, [_P]),
    "AddSessionConfigEntry": (130, _STATUS, [_P, c_char_p, c_char_p]),
    "RunWithBinding": (133, _STATUS, [_P, _P, _P]),
    "CreateIoBinding": (134, _STATUS, [_P, _PP]),
    "ReleaseIoBinding": (135, None, [_P]),
    "BindInput": (136, _STATUS, [_P, c_char_p, _P]),
    "BindOutput": (137, _STATUS, [_P, c_char_p, _P]),
    "ClearBoundInputs": (141, None, [_P]),
    "ClearBoundOutputs": (142, None, [_P]),
    "SetGlobalIntraOpNumThreads": (147, _STATUS, [_P, c_int]),
    "SetGlobalInterOpNumThreads": (148, _STATUS, [_P, c_int]),
    "SetGlobalSpinControl": (149, _STATUS, [_P, c_int]),
    "AddInitializer": (150, _STATUS, [_P, c_char_p, _P]),
    "CreatePrepackedWeightsContainer": (166, _STATUS, [_PP]),
    "ReleasePrepackedWeightsContainer": (167, None, [_P]),
    "CreateSessionWithPrepackedWeightsContainer": (168, _STATUS, [_P, c_char_p, _P, _P, _PP]),
}


class OrtCapiError(RuntimeError):
    """An onnxruntime C API call failed; `code` is its OrtErrorCode (0 when the error is this wrapper's own)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class OrtCapiUnavailable(OrtCapiError, ImportError):
    """The onnxruntime shared library is missing, or does not offer OrtApi version ORT_API_VERSION."""


class _ApiBase(ctypes.Structure):
    _fields_ = [("GetApi", ctypes.CFUNCTYPE(c_void_p, ctypes.c_uint32)),
                ("GetVersionString", ctypes.CFUNCTYPE(c_char_p))]


def find_library() -> Path:
    """Path of libonnxruntime.so inside the installed onnxruntime package (SKIPDECODE_ORT_LIB overrides it)."""
    override = os.environ.get("SKIPDECODE_ORT_LIB")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("onnxruntime")  # locates the package without importing (loading) it
    if spec is None or not spec.submodule_search_locations:
        raise OrtCapiUnavailable("the onnxruntime package is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "capi", "libonnxruntime.so*")))
        if found:
            return Path(found[-1])
    raise OrtCapiUnavailable(f"no libonnxruntime.so* in {list(spec.submodule_search_locations)}/capi "
                             "(this onnxruntime wheel does not ship the C library)")


class Api:
    """The loaded library and typed callables for the OrtApi functions in `_FUNCS` (attributes by name).

    Functions returning an OrtStatus* raise OrtCapiError instead (ctypes `errcheck` = `_check_status`)."""

    def __init__(self, path: str | Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise OrtCapiUnavailable(f"cannot load {path}: {exc}") from exc
        self.lib.OrtGetApiBase.restype = POINTER(_ApiBase)
        base = self.lib.OrtGetApiBase().contents
        self.version = base.GetVersionString().decode()
        table = base.GetApi(ORT_API_VERSION)
        if not table:
            raise OrtCapiUnavailable(f"{path} (onnxruntime {self.version}) does not offer OrtApi version "
                                     f"{ORT_API_VERSION}; onnxruntime >= 1.{ORT_API_VERSION} is needed")
        pointers = (c_void_p * (max(i for i, _, _ in _FUNCS.values()) + 1)).from_address(table)
        for name, (index, restype, argtypes) in _FUNCS.items():
            proto = ctypes.CFUNCTYPE(_P if restype == _STATUS else restype, *argtypes)
            fn = proto(pointers[index])
            if restype == _STATUS:
                fn.errcheck = self._check_status
            setattr(self, name, fn)
        self._self_test()
        self.cpu = c_void_p()  # one CPU OrtMemoryInfo for every Value, alive as long as the process
        self.CreateCpuMemoryInfo(_ORT_ARENA_ALLOCATOR, _ORT_MEM_TYPE_DEFAULT, ctypes.byref(self.cpu))
        self.allocator = c_void_p()  # ORT's default CPU allocator (not owned: never released)
        self.GetAllocatorWithDefaultOptions(ctypes.byref(self.allocator))

    def _check_status(self, status, func, args):
        """The ONE place an OrtStatus* becomes an exception: read code and message, release it, raise."""
        if status:
            code, message = self.GetErrorCode(status), self.GetErrorMessage(status)
            self.ReleaseStatus(status)
            raise OrtCapiError((message or b"").decode(errors="replace"), code)
        return args

    def _self_test(self) -> None:
        """Round-trip a status through CreateStatus/GetErrorCode/GetErrorMessage/ReleaseStatus: a wrong table
        index would show here (or crash) instead of later in a session call."""
        status = self.CreateStatus(5, b"ort_capi probe")
        try:
            if self.GetErrorCode(status) != 5 or self.GetErrorMessage(status) != b"ort_capi probe":
                raise OrtCapiUnavailable(f"OrtApi table of onnxruntime {self.version} does not match this wrapper")
        finally:
            self.ReleaseStatus(status)

    def read_name(self, getter, handle, index: int) -> str:
        """A name the C API allocated with the default allocator: copied to str, then freed."""
        raw = c_void_p()
        getter(handle, index, self.allocator, ctypes.byref(raw))
        try:
            return ctypes.string_at(raw).decode()
        finally:
            self.AllocatorFree(self.allocator, raw)


_API: list[Api] = []


def api() -> Api:
    """The process-wide Api, loaded on first use; raises OrtCapiUnavailable when it cannot be."""
    if not _API:
        _API.append(Api(find_library()))
    return _API[0]


def available() -> bool:
    try:
        api()
    except OrtCapiUnavailable:
        return False
    return True


def read_private(path: str | Path) -> np.ndarray:
    """The file's bytes in anonymous memory of this process (a page-aligned uint8 array). Unlike a mapping of the
    file, nothing done to the file afterwards (rewritten in place, truncated, replaced) can change what the array
    holds or fault the process with SIGBUS when it is read."""
    size = os.path.getsize(path)
    mem = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view, done = memoryview(mem), 0
    with open(path, "rb", buffering=0) as f:
        while done < size:  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(view[done: min(size, done + (1 << 30))])
            if not n:
                raise OrtCapiError(f"{path} ended at byte {done} of {size} while it was being read")
            done += n
    view.release()
    return np.frombuffer(mem, dtype=np.uint8, count=size)


def _page_interior(buf: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The whole pages of buf[start:stop] as (address, length); (addr, 0) when none."""
    page = mmap.PAGESIZE
    base = buf.ctypes.data
    lo = -(-(base + start) // page) * page
    hi = (base + stop) // page * page
    return lo, max(0, hi - lo)


def release_pages(buf: np.ndarray, ranges: list[tuple[int, int]]) -> int:
    """Give the whole pages inside each [start, stop) byte range of `buf` (from `read_private`) back to the system
    with madvise(MADV_DONTNEED): later reads of them return zeros. For bytes nothing will read again (weights the
    sessions have pre-packed); `restore_pages` brings them back. -> bytes released."""
    owner = buf.base.obj if isinstance(buf.base, memoryview) else buf.base
    if not isinstance(owner, mmap.mmap) or not buf.flags.writeable:
        raise OrtCapiError("release_pages needs the private buffer returned by read_private")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [c_void_p, c_size_t, c_int]
    released = 0
    for start, stop in ranges:
        addr, length = _page_interior(buf, start, stop)
        if length and libc.madvise(c_void_p(addr), length, 4) != 0:  # 4 = MADV_DONTNEED (Linux)
            raise OrtCapiError(f"madvise failed: {os.strerror(ctypes.get_errno())}")
        released += length
    return released


def restore_pages(buf: np.ndarray, path: str | Path, ranges: list[tuple[int, int]]) -> None:
    """Read each [start, stop) byte range of the file at `path` back into `buf` (undoes `release_pages`)."""
    with open(path, "rb", buffering=0) as f:
        for start, stop in ranges:
            f.seek(start)
            view = memoryview(buf)[start:stop]
            if f.readinto(view) != stop - start:
                raise OrtCapiError(f"{path} is shorter than byte {stop}: it changed since it was read")
            view.release()


class Value:
    """An OrtValue (tensor) over host memory it does not own: a numpy array (kept referenced) or a raw pointer
    whose owner the caller keeps alive (`keep` pins a Python owner). Released by close()."""

    def __init__(self, ptr: int, shape, dtype, keep=None) -> None:
        self.api, self.shape, self.dtype, self.keep = api(), tuple(int(d) for d in shape), np.dtype(dtype), keep
        if self.dtype not in _ONNX_TYPES:
            raise OrtCapiError(f"dtype {self.dtype} is not supported")
        dims = (c_int64 * max(1, len(self.shape)))(*self.shape)
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.handle = c_void_p()
        self.api.CreateTensorWithDataAsOrtValue(self.api.cpu, c_void_p(ptr), nbytes, dims, len(self.shape),
                                                _ONNX_TYPES[self.dtype], ctypes.byref(self.handle))

    @classmethod
    def over(cls, arr: np.ndarray) -> Value:
        """No copy: the OrtValue points into `arr`, which must be C-contiguous (and writable for outputs)."""
        if not arr.flags.c_contiguous:
            raise OrtCapiError(f"array of shape {arr.shape} is not C-contiguous; ORT needs a dense buffer")
        return cls(arr.ctypes.data, arr.shape, arr.dtype, keep=arr)

    def close(self) -> None:
        if self.handle:
            self.api.ReleaseValue(self.handle)
            self.handle = c_void_p()
        self.keep = None


def _to_numpy(a: Api, value: c_void_p) -> np.ndarray:
    """Copy an ORT-allocated output tensor into a new numpy array (the OrtValue stays the caller's to release)."""
    info, count, etype, data = c_void_p(), c_size_t(), c_int(), c_void_p()
    a.GetTensorTypeAndShape(value, ctypes.byref(info))
    try:
        a.GetTensorElementType(info, ctypes.byref(etype))
        a.GetDimensionsCount(info, ctypes.byref(count))
        dims = (c_int64 * max(1, count.value))()
        a.GetDimensions(info, dims, count.value)
    finally:
        a.ReleaseTensorTypeAndShapeInfo(info)
    shape, dtype = tuple(dims[: count.value]), _NUMPY_TYPES.get(etype.value)
    if dtype is None:
        raise OrtCapiError(f"output element type {etype.value} is not supported")
    out = np.empty(shape, dtype=dtype)
    if out.nbytes:
        a.GetTensorMutableData(value, ctypes.byref(data))
        ctypes.memmove(out.ctypes.data, data, out.nbytes)
    return out


class Binding:
    """An OrtIoBinding of one session over caller buffers: bind once, then `run()` any number of times with only
    the buffers' contents changed. Owns the OrtValues it creates; the buffers stay the caller's."""

    def __init__(self, session: Session) -> None:
        self.session, self.api = session, session.api
        self.handle = c_void_p()
        self.api.CreateIoBinding(session.handle, ctypes.byref(self.handle))
        self._values: list[Value] = []

    def _value(self, buf: np.ndarray | Value) -> Value:
        if isinstance(buf, Value):  # a caller-owned Value (e.g. over a raw pointer): not released here
            return buf
        value = Value.over(buf)
        self._values.append(value)
        return value

    def bind_input(self, name: str, buf: np.ndarray | Value) -> None:
        self.api.BindInput(self.handle, name.encode(), self._value(buf).handle)

    def bind_output(self, name: str, buf: np.ndarray | Value) -> None:
        """ORT writes this output into `buf` in place; its shape must be what the graph produces."""
        self.api.BindOutput(self.handle, name.encode(), self._value(buf).handle)

    def run(self) -> None:
        self.api.RunWithBinding(self.session.handle, None, self.handle)

    def clear(self) -> None:
        """Unbind everything and release the OrtValues this binding created."""
        self.api.ClearBoundInputs(self.handle)
        self.api.ClearBoundOutputs(self.handle)
        for value in self._values:
            value.close()
        self._values.clear()

    def close(self) -> None:
        if self.handle:
            self.clear()
            self.api.ReleaseIoBinding(self.handle)
            self.handle = c_void_p()
        self.session._bindings.discard(self)


class Session:
    """One graph's OrtSession. Created by `Env.session`; keeps the initializer Values it was given referenced
    (ORT points at them, it does not copy them). Owns its Bindings."""

    def __init__(self, env: Env, handle: c_void_p, path: str, initializers: dict[str, Value]) -> None:
        self.env, self.api, self.handle, self.path = env, env.api, handle, path
        self._initializers = initializers
        self._bindings: set[Binding] = set()
        self.input_names = self._names(self.api.SessionGetInputCount, self.api.SessionGetInputName)
        self.output_names = self._names(self.api.SessionGetOutputCount, self.api.SessionGetOutputName)

    def _names(self, count_fn, name_fn) -> list[str]:
        count = c_size_t()
        count_fn(self.handle, ctypes.byref(count))
        return [self.api.read_name(name_fn, self.handle, i) for i in range(count.value)]

    def binding(self) -> Binding:
        binding = Binding(self)
        self._bindings.add(binding)
        return binding

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Plain Run: inputs from numpy (no copy), outputs allocated by ORT and copied out to numpy."""
        outputs = list(self.output_names if outputs is None else outputs)
        inputs: list[Value] = []
        results = (c_void_p * max(1, len(outputs)))()
        try:
            inputs.extend(Value.over(np.ascontiguousarray(arr)) for arr in feeds.values())
            self.api.Run(self.handle, None, (c_char_p * len(feeds))(*(n.encode() for n in feeds)),
                         (c_void_p * len(inputs))(*(v.handle for v in inputs)), len(inputs),
                         (c_char_p * len(outputs))(*(n.encode() for n in outputs)), len(outputs), results)
            return [_to_numpy(self.api, c_void_p(results[i])) for i in range(len(outputs))]
        finally:
            for i in range(len(outputs)):
                if results[i]:
                    self.api.ReleaseValue(c_void_p(results[i]))
            for value in inputs:
                value.close()

    def close(self) -> None:
        for binding in list(self._bindings):
            binding.close()
        if self.handle:
            self.api.ReleaseSession(self.handle)
            self.handle = c_void_p()
        self._initializers = {}
        self.env._sessions.discard(self)


_LIVE_ENVS: list[tuple] = []  # settings of each open Env: ORT has one OrtEnv per process


class Env:
    """The process's OrtEnv, one PrepackedWeightsContainer, and everything created through them.

    `global_pool=True` (default): one intra-op pool of `threads` threads (default: every core) shared by every
    session, which runs with per-session threads disabled; `spin` lets its workers spin between calls.
    `global_pool=False`: each session gets its own pool of `threads`. ORT keeps ONE OrtEnv per process and
    silently ignores the settings of a second one, so opening a second Env with other settings raises."""

    def __init__(self, threads: int | None = None, *, global_pool: bool = True, spin: bool = True,
                 log_level: int = LOG_WARNING, logid: str = "skipdecode") -> None:
        self.api = api()
        self.threads, self.global_pool = threads or os.cpu_count() or 1, global_pool
        self._settings = (self.threads, global_pool, spin)
        if any(s != self._settings for s in _LIVE_ENVS):
            raise OrtCapiError(f"an Env with settings {_LIVE_ENVS[0]} is open; onnxruntime has one environment "
                               f"per process and would ignore {self._settings}")
        self.handle, self.container = c_void_p(), c_void_p()
        self._sessions: set[Session] = set()
        self._values: list[Value] = []
        if global_pool:
            self._create_with_pool(spin, log_level, logid)
        else:
            self.api.CreateEnv(log_level, logid.encode(), ctypes.byref(self.handle))
        _LIVE_ENVS.append(self._settings)
        try:
            self.api.CreatePrepackedWeightsContainer(ctypes.byref(self.container))
        except OrtCapiError:
            self.close()
            raise

    def _create_with_pool(self, spin: bool, log_level: int, logid: str) -> None:
        options = c_void_p()
        self.api.CreateThreadingOptions(ctypes.byref(options))
        try:
            self.api.SetGlobalIntraOpNumThreads(options, self.threads)
            self.api.SetGlobalInterOpNumThreads(options, 1)
            self.api.SetGlobalSpinControl(options, int(spin))
            self.api.CreateEnvWithGlobalThreadPools(log_level, logid.encode(), options, ctypes.byref(self.handle))
        finally:
            self.api.ReleaseThreadingOptions(options)

    def value(self, arr: np.ndarray) -> Value:
        """An OrtValue over `arr` (no copy) owned by this Env, e.g. a weight shared by every session."""
        value = Value.over(arr)
        self._values.append(value)
        return value

    def session(self, path: str | Path, initializers: dict[str, Value] | None = None, *, prepacked: bool = True,
                config: dict[str, str] | None = None, optimization: int = ORT_ENABLE_ALL) -> Session:
        """Load the model at `path`. `initializers` (name -> Value) are added with AddInitializer (shared, not
        copied); with `prepacked`, their MLAS pre-packed forms go to (or come from) this Env's container.
        `config`: session config entries (AddSessionConfigEntry), e.g. {"session.disable_prepacking": "1"}."""
        initializers = dict(initializers or {})
        options = self._session_options(initializers, config or {}, optimization)
        handle = c_void_p()
        try:
            if prepacked:
                self.api.CreateSessionWithPrepackedWeightsContainer(self.handle, str(path).encode(), options,
                                                                    self.container, ctypes.byref(handle))
            else:
                self.api.CreateSession(self.handle, str(path).encode(), options, ctypes.byref(handle))
        finally:
            self.api.ReleaseSessionOptions(options)  # the session keeps its own copy of the options
        try:
            session = Session(self, handle, str(path), initializers)
        except OrtCapiError:
            self.api.ReleaseSession(handle)
            raise
        self._sessions.add(session)
        return session

    def _session_options(self, initializers: dict[str, Value], config: dict[str, str], optimization: int):
        options = c_void_p()
        self.api.CreateSessionOptions(ctypes.byref(options))
        try:
            self.api.SetSessionGraphOptimizationLevel(options, optimization)
            if self.global_pool:
                self.api.DisablePerSessionThreads(options)
            else:
                self.api.SetIntraOpNumThreads(options, self.threads)
                self.api.SetInterOpNumThreads(options, 1)
            for key, val in config.items():
                self.api.AddSessionConfigEntry(options, key.encode(), str(val).encode())
            for name, value in initializers.items():
                self.api.AddInitializer(options, name.encode(), value.handle)
        except OrtCapiError:
            self.api.ReleaseSessionOptions(options)
            raise
        return options

    def close(self) -> None:
        """Release sessions (and their bindings), the container, owned Values, then the OrtEnv."""
        for session in list(self._sessions):
            session.close()
        if self.container:
            self.api.ReleasePrepackedWeightsContainer(self.container)
            self.container = c_void_p()
        for value in self._values:
            value.close()
        self._values.clear()
        if self.handle:
            self.api.ReleaseEnv(self.handle)
            self.handle = c_void_p()
            _LIVE_ENVS.remove(self._settings)

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
