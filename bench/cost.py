"""Cost model of a decode step, the ideal SkipDecode speedup it predicts, and the step's growth with past length.

A decode step of a bucket graph that runs `b` layers costs `fixed + per_layer * b`. `fixed` is what does not
shrink when layers are skipped (embedding, final norm, LM head, per-call overhead; a quarter of a full opt-125m
step in docs/bench/2026-11-30/quick/bench.md, "Cost model"), `per_layer` one decoder layer at the step's past
length. Both are fitted by least squares over every exported bucket, each timed with `OrtBackend.decode_rows` in
the same run as the throughput it is compared with. The ideal speedup of a schedule is then
`sum cost(L) / sum cost(bucket_t)` over its decode steps, not `L / mean(budget)`.

Timings come from rounds whose order rotates (and flips every other round), so a slow drift of the machine's
speed (these 2-core machines are shared and noisy) hits every key alike instead of the last one timed.

No torch here; `onnx` builds the attention-only probe graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from ..runtime.ort_sessions import session_options
from ..runtime.request import GenerateOptions
from ..runtime.schedule import make_plan


@dataclass(frozen=True)
class CostModel:
    """Seconds per decode step as a linear function of the layers it runs."""

    fixed_s: float
    per_layer_s: float
    r2: float  # of the least-squares fit over the timed buckets

    def step_s(self, layers: float) -> float:
        return self.fixed_s + self.per_layer_s * layers

    def to_dict(self) -> dict:
        return asdict(self)


def fit_cost_model(layers: Sequence[float], seconds: Sequence[float]) -> CostModel:
    """Least-squares `seconds = fixed + per_layer * layers`; needs at least two distinct layer counts."""
    x, y = np.asarray(layers, dtype=float), np.asarray(seconds, dtype=float)
    if x.shape != y.shape or len(np.unique(x)) < 2:
        raise ValueError(f"a cost model needs timings at >= 2 distinct layer counts, got layers {list(x)}")
    A = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    # Costs are non-negative; noisy timings of a tiny model can tilt the line below zero, which would predict
    # negative step times. Then the best fit on that boundary: through the origin, or flat.
    if coef[0] < 0:
        coef = np.array([0.0, float(x @ y / (x @ x))])
    if coef[1] < 0:
        coef = np.array([float(y.mean()), 0.0])
    resid = y - A @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return CostModel(float(coef[0]), float(coef[1]), r2)


def ideal_speedup(cost: CostModel, num_layers: int, step_layers: Sequence[int]) -> float:
    """Full-depth time over skip time of the same decode steps, both predicted by `cost`."""
    if not step_layers:
        return 1.0
    return cost.step_s(num_layers) * len(step_layers) / sum(cost.step_s(b) for b in step_layers)


def step_buckets(num_layers: int, warmup: int | None, buckets: Sequence[int], speedup: float,
                 prompt_length: int, max_new_tokens: int) -> list[int]:
    """Layers run by each decode step of `Engine.generate` for a static batch with (padded) prompt length p: the
    same schedule, plan and bucket choice the generation loop makes (runtime/request.py)."""
    opts = GenerateOptions(max_new_tokens=max_new_tokens, speedup=speedup)
    plan = make_plan(opts.schedule(num_layers, warmup), prompt_length, prompt_length + max_new_tokens, buckets)
    return [s.bucket for s in plan.steps[: max_new_tokens - 1]]


def rotated_samples(fns: Mapping[Hashable, Callable[[], object]], rounds: int, calls: int = 1,
                    lead_in: int = 0) -> dict[Hashable, list[float]]:
    """Seconds per call of each function, one sample per round. Every function runs once untimed first (bindings,
    allocator, caches); then each round times `calls` calls of each, after `lead_in` untimed calls of the same
    function, in an order rotated by one per round (odd rounds backwards).

    Why a lead-in: with onnxruntime's per-session thread pools, the previous session's pool keeps spinning after
    its run. On opt-125m (2 cores, 2 threads) the first three runs of a bucket graph after another graph's took
    38, 39, 30 ms, later runs 21 ms. The cost model is of a graph's own step; the switching penalty stays visible
    where it belongs, in the realised speedup of the generation loop.
    """
    keys = list(fns)
    for fn in fns.values():
        fn()
    samples: dict = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        order = keys[shift:] + keys[:shift]
        for k in reversed(order) if r % 2 else order:
            for _ in range(lead_in):
                fns[k]()
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[k]()
            samples[k].append((time.perf_counter() - t0) / calls)
    return samples


def fastest(samples: Mapping[Hashable, Sequence[float]]) -> dict:
    """The fastest sample of each key: other processes on a shared machine only ever add time to a fixed amount
    of work, so the minimum is its best estimate (timeit's rule). Used for the graph costs of the cost model and
    the length scaling; generation throughput uses medians (it is what a user gets)."""
    return {k: float(min(v)) for k, v in samples.items()}


def _decode_call(backend, slots: list[int], bucket: int, lengths: np.ndarray) -> Callable[[], object]:
    # token ids do not change the cost; every gate on = the graph runs all its layers for every row
    ids = np.full(len(lengths), 4, dtype=np.int64)
    gates = np.ones((len(lengths), bucket), dtype=bool)

    def call():
        backend.slots.lengths[slots] = lengths  # time at this past length (the call advances it by one)
        return backend.decode_rows(slots, ids, bucket, gates)
    return call


@contextmanager
def _slots(backend, n: int) -> Iterator[list[int]]:
    """KV slots for timing graph calls directly, given back afterwards."""
    slots = backend.slots.allocate(n)
    try:
        yield slots
    finally:
        backend.slots.free(slots)


def time_buckets(backend, lengths: Sequence[int], rounds: int) -> dict[int, float]:
    """Seconds of one decode step of every exported bucket over rows with past `lengths` (fastest of `rounds`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    with _slots(backend, len(lengths)) as slots:
        calls = {b: _decode_call(backend, slots, b, lengths) for b in backend.buckets}
        return fastest(rotated_samples(calls, rounds, lead_in=3))


def attention_graph(heads: int, head_dim: int) -> bytes:
    """One com.microsoft GroupQueryAttention node, wired as in the decode graphs (export/graphs.py): one new token per
    row, past and present K/V [B, H, max_length, D] meant to be bound to the same buffer, fp32."""
    from onnx import TensorProto, helper

    f32, hd = TensorProto.FLOAT, heads * head_dim
    kv = ["batch", heads, "max_length", head_dim]
    inputs = [helper.make_tensor_value_info(n, f32, ["batch", 1, hd]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info(n, f32, kv) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", f32, ["batch", 1, hd])]
    outputs += [helper.make_tensor_value_info(n, f32, kv) for n in ("present_key", "present_value")]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=heads,
                            scale=1.0 / math.sqrt(head_dim))
    graph = helper.make_graph([node], "attention_only", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # onnxruntime 1.31 loads at most IR 13 (docs/DESIGN.md §8)
    return model.SerializeToString()


class AttentionOnly:
    """The attention of one decoder layer alone: a GroupQueryAttention session bound in place to its own KV buffers
    [batch, heads, max_length, head_dim], like the decode graphs' layers. `call(n)` runs it at past length n."""

    def __init__(self, heads: int, head_dim: int, batch: int, max_length: int, threads: int | None) -> None:
        so = session_options(prepack=False, threads=threads)  # same thread pool as the engine's sessions
        self.session = ort.InferenceSession(attention_graph(heads, head_dim), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        kv = [rng.standard_normal((batch, heads, max_length, head_dim), dtype=np.float32) for _ in range(2)]
        self.seqlens = np.zeros(batch, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        ins = {n: rng.standard_normal((batch, 1, heads * head_dim), dtype=np.float32) for n in ("q", "k", "v")}
        ins |= {"past_key": kv[0], "past_value": kv[1], "seqlens_k": self.seqlens,
                "total_sequence_length": self.total}
        outs = {"out": np.zeros((batch, 1, heads * head_dim), dtype=np.float32), "present_key": kv[0],
                "present_value": kv[1]}
        self._keep = (ins, outs)  # the binding holds raw pointers: keep the arrays alive
        self.binding = self.session.io_binding()
        for name, arr in ins.items():
            self.binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name, arr in outs.items():
            self.binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def call(self, past_length: int) -> Callable[[], None]:
        def run() -> None:
            self.seqlens[:] = past_length
            self.total[()] = past_length + 1
            self.session.run_with_iobinding(self.binding)
        return run


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    return float(np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)[0])


def length_scaling(backend, batch: int, past_lengths: Sequence[int], rounds: int, threads: int | None) -> dict:
    """Full-depth step time at each past length next to L x one layer's attention alone at the same length.

    If the step re-read, copied or reallocated the cache per token, its growth would exceed attention's own
    (attention reads each cached K/V once); equal slopes mean the growth is attention's.
    """
    L, m = backend.num_layers, backend.manifest.model
    with _slots(backend, batch) as slots:
        steps = fastest(rotated_samples({n: _decode_call(backend, slots, L, np.full(batch, n, dtype=np.int64))
                                         for n in past_lengths}, rounds))
    attn = AttentionOnly(m.num_heads, m.head_dim, batch, backend.max_length, threads)
    # one attention call is short: several calls per sample keep timer and Python overhead out of the estimate
    att = fastest(rotated_samples({n: attn.call(n) for n in past_lengths}, rounds, calls=5, lead_in=3))
    lo, hi = min(past_lengths), max(past_lengths)
    points = [{"past_length": n, "step_ms": steps[n] * 1e3, "attention_ms": att[n] * 1e3,
               "attention_x_layers_ms": att[n] * L * 1e3} for n in past_lengths]
    return {
        "batch": batch, "num_layers": L, "points": points,
        "step_slope_us_per_token": _slope(past_lengths, [steps[n] * 1e6 for n in past_lengths]),
        "attention_slope_us_per_token": _slope(past_lengths, [att[n] * L * 1e6 for n in past_lengths]),
        "step_growth_ms": (steps[hi] - steps[lo]) * 1e3,
        "attention_growth_ms": (att[hi] - att[lo]) * L * 1e3,
        "step_ms_at_shortest": steps[lo] * 1e3,
    }
