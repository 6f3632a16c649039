"""TensorRT backend: one plan per graph, executed with `execute_async_v3` on device buffers bound by tensor name.

The plans are built by `skipdecode export --backend tensorrt` (export/tensorrt_build.py) from the engine's
matmul-flavour ONNX graphs (TensorRT has no GroupQueryAttention) and described by `tensorrt.json` (`TrtPlans`).

Memory, all allocated once with cudaMalloc (runtime/device.py) and bound by address:
* Weights ("inputs" strategy): the plans take every weight as an input tensor; one device copy of weights.bin,
  laid out on 256-byte boundaries (TensorRT's address alignment), is bound to every context. With the
  "embedded" strategy each plan owns its own copy and nothing is bound.
* KV: the `KVCache` of runtime/kv.py in device memory (the same owner as the onnxruntime backends); a decode
  context binds rows [0, n) of its buffers (same base address for every n) and its new K/V [n, heads, 1, head_dim]
  to the cache's staging buffers, which `GraphBackend` moves into column past_length[i] of row i. Prefill K/V land
  in staging buffers grown on demand to the largest prefill seen, then each row's real columns are copied into its
  slot. The slot API is the base's, so TensorRT engines serve continuous batches too.
* Activations: every context is created with USER_MANAGED allocation and given the same buffer, sized for the
  largest engine: contexts run one at a time on one stream, so they can share it.

`decode_bindings` / `prefill_bindings` compute which buffer (and offset) every tensor of a graph binds to as
plain data; the backend resolves them to addresses. They and `TrtPlans` are importable without TensorRT.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import contract as C
from .device import CudaRuntime, aligned_offsets
from .errors import BackendError, EngineError
from .manifest import GraphSpec, Manifest
from .profiling import graph_range
from .slot_backend import GraphBackend
from .weights import read_weights

TRT_FILE = "tensorrt.json"
TRT_FORMAT = "skipdecode-tensorrt"
TRT_FORMAT_VERSION = 1
WEIGHT_STRATEGIES = ("inputs", "embedded")


@dataclass(frozen=True)
class TrtPlans:
    """`tensorrt.json`: what the TensorRT build produced. Paths are relative to the engine directory."""

    tensorrt_version: str
    weights: str  # "inputs" (one shared device copy bound to every plan) | "embedded" (a copy inside each plan)
    plans: dict[str, str]  # graph name -> plan file
    onnx: dict[str, str]  # graph name -> the ONNX file the plan was built from
    profiles: dict[str, dict[str, list[list[int]]]]  # graph -> input -> [min, opt, max] shapes
    weight_inputs: dict[str, list[str]]  # graph -> weight names bound as inputs ([] when embedded)
    timing_cache: str | None = None
    activation_bytes: dict[str, int] = field(default_factory=dict)  # graph -> context memory at max profile
    format: str = TRT_FORMAT
    format_version: int = TRT_FORMAT_VERSION

    def write(self, directory: Path) -> None:
        (Path(directory) / TRT_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, directory: str | Path) -> TrtPlans:
        path = Path(directory) / TRT_FILE
        if not path.is_file():
            raise EngineError(f"{path} is missing: build TensorRT plans with `skipdecode export --backend tensorrt`")
        try:
            raw = json.loads(path.read_text())
            plans = cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise EngineError(f"{path} is corrupted: {exc}") from exc
        if (plans.format, plans.format_version) != (TRT_FORMAT, TRT_FORMAT_VERSION):
            raise EngineError(f"{path} is {plans.format} v{plans.format_version}; this runtime reads {TRT_FORMAT} "
                              f"v{TRT_FORMAT_VERSION}: rebuild the plans")
        if plans.weights not in WEIGHT_STRATEGIES:
            raise EngineError(f"{path}: weights={plans.weights!r} is not one of {WEIGHT_STRATEGIES}")
        return plans


@dataclass(frozen=True)
class Binding:
    """Tensor `name` binds to `buffer` (+ `offset` bytes); `shape` is the input shape to set (None: static)."""

    name: str
    buffer: str  # "ids" | "lengths" | "gate" | "logits" | "key.L" | "value.L" | "new_key.L" | "new_value.L"
    #             "prefill_ids" | "prefill_pos" | "prefill_mask" | "present_key.L" | "present_value.L" | "weights"
    offset: int = 0
    shape: tuple[int, ...] | None = None


def weight_layout(man: Manifest) -> tuple[dict[str, int], int]:
    """Device offsets of every weight in the one shared allocation (256-byte aligned), and its size."""
    return aligned_offsets({name: w.nbytes for name, w in man.weights.items()})


def decode_bindings(spec: GraphSpec, weight_inputs: list[str], offsets: dict[str, int], n: int, heads: int,
                    head_dim: int, max_length: int) -> list[Binding]:
    """Every I/O tensor of a matmul-flavour decode graph over slots [0, n)."""
    k = len(spec.layers)
    out = [Binding(C.INPUT_IDS, "ids", shape=(n, 1)), Binding(C.PAST_LENGTH, "lengths", shape=(n,)),
           Binding(C.GATE, "gate", shape=(n, k)), Binding(C.LOGITS, "logits")]
    kv = (n, heads, max_length, head_dim)
    for layer in spec.layers:
        out += [Binding(C.past_key(layer), f"key.{layer}", shape=kv), Binding(C.past_value(layer), f"value.{layer}",
                                                                              shape=kv),
                Binding(C.new_key(layer), f"new_key.{layer}"), Binding(C.new_value(layer), f"new_value.{layer}")]
    return out + [Binding(w, "weights", offsets[w]) for w in weight_inputs]


def prefill_bindings(spec: GraphSpec, weight_inputs: list[str], offsets: dict[str, int], batch: int, seq: int
                     ) -> list[Binding]:
    """Every I/O tensor of the prefill graph for a [batch, seq] left-padded batch."""
    out = [Binding(C.INPUT_IDS, "prefill_ids", shape=(batch, seq)),
           Binding(C.POSITION_IDS, "prefill_pos", shape=(batch, seq)),
           Binding(C.ATTENTION_MASK, "prefill_mask", shape=(batch, seq)), Binding(C.LOGITS, "logits")]
    for layer in spec.layers:
        out += [Binding(C.present_key(layer), f"present_key.{layer}"),
                Binding(C.present_value(layer), f"present_value.{layer}")]
    return out + [Binding(w, "weights", offsets[w]) for w in weight_inputs]


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError("TensorRT is not installed: it comes from NVIDIA's package index, see docs/GPU.md "
                           f"(import failed: {exc})") from exc
    return trt


class TrtBackend(GraphBackend):
    """The slot API over the TensorRT plans of one engine directory on CUDA device `device`."""

    def __init__(self, directory: str | Path, man: Manifest, device: int = 0, max_batch: int | None = None,
                 max_length: int | None = None) -> None:
        trt = import_tensorrt()
        if man.attention != "matmul":
            raise BackendError(f"TensorRT runs the matmul attention flavour; this engine is {man.attention!r}: "
                               "export with --backend tensorrt")
        directory = Path(directory)
        self.plans = TrtPlans.read(directory)
        if self.plans.tensorrt_version != trt.__version__:  # a plan only loads in the TensorRT that built it
            raise BackendError(f"the plans were built by TensorRT {self.plans.tensorrt_version}; this is "
                               f"{trt.__version__}: rebuild them with `skipdecode export --backend tensorrt`")
        self.trt = trt
        self.cuda = CudaRuntime(device)
        man = man.without_drafts()  # TensorRT plans no quantized draft graph (a TensorRT export has none)
        self._setup(man, max_batch, max_length, self.cuda)
        self.itemsize = self.kv.itemsize
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines = {g.name: self._load_engine(directory, g) for g in man.graphs if not g.kind.startswith("verify")}
        self._allocate(directory)
        self.contexts = {name: self._context(name) for name in self.engines}
        self._shapes: dict[str, tuple] = {}  # graph -> input shapes last set on its context
        self._addressed: set[str] = set()  # contexts whose tensor addresses are set

    # -- loading ---------------------------------------------------------------------------------------------
    def _load_engine(self, directory: Path, spec: GraphSpec):
        plan = directory / self.plans.plans[spec.name]
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT cannot deserialize {plan} ({spec.name}); see the TensorRT log above")
        trt = self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [x for x in names if engine.get_tensor_mode(x) == trt.TensorIOMode.INPUT]
        outs = [x for x in names if engine.get_tensor_mode(x) == trt.TensorIOMode.OUTPUT]
        want_in = [s.name for s in spec.inputs] + list(self.plans.weight_inputs.get(spec.name, []))
        if sorted(ins) != sorted(want_in) or sorted(outs) != sorted(s.name for s in spec.outputs):
            raise EngineError(f"plan {plan.name} has inputs {ins} and outputs {outs}; the manifest expects "
                              f"{want_in} and {[s.name for s in spec.outputs]}")
        for s in (*spec.inputs, *spec.outputs):
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(s.name)))
            if got != np.dtype(s.dtype):
                raise EngineError(f"plan {plan.name}: tensor {s.name} is {got}, the manifest says {s.dtype}")
            if engine.is_shape_inference_io(s.name):  # would need a host address; none of ours is a shape tensor
                raise EngineError(f"plan {plan.name}: {s.name} became a shape tensor; rebuild from the exported ONNX")
        return engine

    def _allocate(self, directory: Path) -> None:
        """Every device buffer, once: weights, KV, staging, inputs, logits, shared activation memory."""
        cuda, man = self.cuda, self.manifest
        self.ptr: dict[str, int] = {}
        if self.plans.weights == "inputs":
            self.weight_offsets, total = weight_layout(man)
            self.ptr["weights"] = cuda.malloc(total, zero=False)
            for name, arr in read_weights(directory, man).items():
                cuda.h2d(self.ptr["weights"] + self.weight_offsets[name], arr)
        else:
            self.weight_offsets = {}
        for layer in range(self.num_layers):  # the KV cache's buffers, bound by name
            self.ptr[f"key.{layer}"], self.ptr[f"value.{layer}"] = self.kv.keys[layer], self.kv.values[layer]
            self.ptr[f"new_key.{layer}"] = self.kv.new_keys[layer]
            self.ptr[f"new_value.{layer}"] = self.kv.new_values[layer]
        S = self.max_length - 1  # longest prompt: one column must remain for the first generated token
        for name in ("prefill_ids", "prefill_pos", "prefill_mask"):
            self.ptr[name] = cuda.malloc(self.max_batch * S * 8)
        self.ptr["ids"] = cuda.malloc(self.max_batch * 8)
        self.ptr["lengths"] = cuda.malloc(self.max_batch * 4)
        self.ptr["gate"] = cuda.malloc(self.max_batch * self.num_layers)
        self.ptr["logits"] = cuda.malloc(self.max_batch * self.vocab_size * 4)
        self._present_bytes = 0  # prefill K/V staging, grown on demand (see _ensure_present)
        self.activation_bytes = max(e.get_device_memory_size_for_profile_v2(0) for e in self.engines.values())
        self.ptr["activations"] = cuda.malloc(self.activation_bytes, zero=False)
        cuda.synchronize()

    def _context(self, name: str):
        engine = self.engines[name]
        ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise BackendError(f"TensorRT could not create an execution context for {name}")
        # one activation buffer for all contexts: they never run concurrently (one stream, one call at a time)
        ctx.set_device_memory(self.ptr["activations"], self.activation_bytes)
        return ctx

    # -- GraphBackend primitives ----------------------------------------------------------------------------
    def _run_prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray):
        B, S = ids.shape
        spec = self.manifest.prefill()
        for name, arr in (("prefill_ids", ids), ("prefill_pos", pos), ("prefill_mask", mask)):
            self.cuda.h2d(self.ptr[name], arr.astype(np.int64))
        self._ensure_present(B, S)
        self._execute(spec, prefill_bindings(spec, self.plans.weight_inputs.get(spec.name, []), self.weight_offsets,
                                             B, S))
        kv = [(self.ptr[f"present_key.{layer}"], self.ptr[f"present_value.{layer}"])
              for layer in range(self.num_layers)]
        return self._read_logits(B), kv, None

    def _run_decode(self, spec: GraphSpec, n: int) -> None:
        self.cuda.h2d(self.ptr["ids"], self._ids[:n])
        self.cuda.h2d(self.ptr["lengths"], self._lengths[:n])
        self.cuda.h2d(self.ptr["gate"], self._gate[: n * len(spec.layers)])
        self._execute(spec, decode_bindings(spec, self.plans.weight_inputs.get(spec.name, []), self.weight_offsets,
                                            n, self.heads, self.head_dim, self.max_length))
        self._read_logits(n)

    # -- internals -------------------------------------------------------------------------------------------
    def _ensure_present(self, batch: int, seq: int) -> None:
        need = batch * self.heads * seq * self.head_dim * self.itemsize
        if need <= self._present_bytes:
            return
        self.cuda.synchronize()
        for layer in range(self.num_layers):
            for part in ("present_key", "present_value"):
                old = self.ptr.pop(f"{part}.{layer}", None)
                if old is not None:
                    self.cuda.free(old)
                self.ptr[f"{part}.{layer}"] = self.cuda.malloc(need, zero=False)
        self._present_bytes = need
        self._addressed.discard(self.manifest.prefill().name)

    def _execute(self, spec: GraphSpec, bindings: list[Binding]) -> None:
        """Set shapes when they changed and addresses once per context (buffers never move, except the prefill
        staging, which resets its context's addresses when it grows), then enqueue on the stream."""
        ctx = self.contexts[spec.name]
        shapes = tuple(b.shape for b in bindings if b.shape is not None)
        if self._shapes.get(spec.name) != shapes:
            for b in bindings:
                if b.shape is not None and not ctx.set_input_shape(b.name, b.shape):
                    raise BackendError(f"{spec.name}: shape {b.shape} of {b.name} is outside the plan's profile "
                                       f"{self.plans.profiles[spec.name].get(b.name)}")
            self._shapes[spec.name] = shapes
        if spec.name not in self._addressed:
            for b in bindings:
                if not ctx.set_tensor_address(b.name, self.ptr[b.buffer] + b.offset):
                    raise BackendError(f"{spec.name}: TensorRT refused the address of {b.name}")
            self._addressed.add(spec.name)
        with graph_range(spec.name):
            if not ctx.execute_async_v3(self.cuda.stream_handle):
                raise BackendError(f"TensorRT execute_async_v3 failed for {spec.name}; see the TensorRT log")

    def _read_logits(self, n: int) -> np.ndarray:
        logits = self._logits[: n * self.vocab_size]
        self.cuda.d2h(logits, self.ptr["logits"])
        self.cuda.synchronize()
        return logits.reshape(n, self.vocab_size)

    def _release(self) -> None:
        self.contexts.clear()
        self.engines.clear()
