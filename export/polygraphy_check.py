"""Cross-backend parity of every graph of an engine with polygraphy. Fails hard, reports the worst difference.

For each graph, a reference runner (onnxruntime CPU, the fp32 engine by default) and a candidate runner (onnxruntime
CUDA, TensorRT, or another engine of the same model) get identical feeds (`graph_feeds`: realistic ids, left
padding, ragged past lengths, K/V values representable in fp16) through `polygraphy.comparator.Comparator`.
Tolerances are data, per output kind (`ToleranceTable`): an output passes when
    max |candidate - reference| <= atol + scale * max |reference|
(the same rule as export/parity.py; polygraphy checks it as an absolute bound per output). Non-finite candidate
outputs fail whatever the tolerance. Inputs a runner does not have (weights fed to TensorRT plans built with
weights as inputs) are ignored by the others: polygraphy coerces each feed to each runner's own inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime import contract as C
from ..runtime.errors import EngineError
from ..runtime.manifest import GraphSpec, Manifest, load_manifest
from ..runtime.ort_sessions import load_weights, open_session, session_options
from ..runtime.slot_backend import position_ids


@dataclass(frozen=True)
class OutputTolerance:
    """Limit for one output: atol + scale * max|reference|."""

    atol: float
    scale: float

    def limit(self, reference_max: float) -> float:
        return self.atol + self.scale * reference_max


@dataclass(frozen=True)
class ToleranceTable:
    """Tolerances by output kind: logits, K/V a graph computes (prefill present.*, decode new.*) and K/V buffers
    returned whole (gqa decode present.*: mostly the input copied through, plus one new column)."""

    logits: OutputTolerance
    kv: OutputTolerance

    def for_output(self, name: str) -> OutputTolerance:
        return self.logits if name == C.LOGITS else self.kv


TOLERANCES = {
    # same dtype on two backends: reduction order and fused kernels differ (GPU fp32 runs without TF32)
    "fp32": ToleranceTable(logits=OutputTolerance(1e-3, 1e-4), kv=OutputTolerance(1e-3, 1e-4)),
    "fp16": ToleranceTable(logits=OutputTolerance(1e-2, 5e-3), kv=OutputTolerance(1e-2, 5e-3)),
    # an fp16 engine against the fp32 reference: weight rounding plus fp16 arithmetic (export/fp16_parity.py).
    # Measured on the tiny test OPT (6 layers, onnxruntime CPU): logits 0.005, K/V 0.005 worst; limits ~0.07/0.03.
    "fp16-vs-fp32": ToleranceTable(logits=OutputTolerance(2e-2, 5e-3), kv=OutputTolerance(1e-2, 5e-3)),
}


class CrossBackendError(EngineError):
    """A graph's outputs differ between two backends beyond their tolerance, or are not finite."""


def graph_feeds(spec: GraphSpec, man: Manifest, iterations: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Deterministic, realistic inputs for one graph: token ids in the vocabulary, a left-padded prefill batch with
    one single-token row (the case where naive fp16 masking overflows), ragged decode lengths below max_length,
    and past K/V drawn in fp32 but representable exactly in fp16 so fp16 and fp32 runners see the same values."""
    rng = np.random.default_rng(seed)
    vocab, pad = man.model.vocab_size, man.model.pad_token_id
    batch = min(3, man.max_batch)
    feeds = []
    for it in range(iterations):
        if spec.kind == "prefill":
            seq = min(7 + it, man.max_length - 1)
            lengths = np.array([seq, 1, max(1, seq // 2)][:batch])
            mask = (np.arange(seq)[None, :] >= seq - lengths[:, None]).astype(np.int64)
            ids = np.where(mask == 1, rng.integers(3, vocab, size=(batch, seq)), pad).astype(np.int64)
            feeds.append({C.INPUT_IDS: ids, C.POSITION_IDS: position_ids(mask), C.ATTENTION_MASK: mask})
        elif spec.kind.startswith("verify"):
            feeds.append(_verify_feed(spec, man, 1 if spec.kind == "verify_row" else batch, rng, seq=3 + it))
        else:
            feeds.append(_decode_feed(spec, man, batch, rng, all_gates=(it == 0)))
    return feeds


def _decode_feed(spec: GraphSpec, man: Manifest, batch: int, rng, all_gates: bool) -> dict[str, np.ndarray]:
    T, H = man.max_length, man.model.num_heads
    D = man.model.hidden_size // H
    lengths = rng.choice(np.arange(1, T - 1), size=batch, replace=False).astype(np.int32)
    gate = np.ones((batch, len(spec.layers)), dtype=bool)
    if not all_gates:  # rows of one call may run different layer sets (continuous batching): a fixed checkerboard
        rows, cols = np.meshgrid(np.arange(batch), np.arange(len(spec.layers)), indexing="ij")
        gate &= (rows == 0) | (cols == 0) | ((rows + cols) % 2 == 1)
    feed = {C.INPUT_IDS: rng.integers(3, man.model.vocab_size, size=(batch, 1)).astype(np.int64),
            C.PAST_LENGTH: lengths, C.GATE: gate}
    if man.attention == "gqa":
        feed[C.KV_LENGTH] = np.array(int(lengths.max()) + 1, dtype=np.int32)
    dtype = np.dtype(man.dtype)
    for layer in spec.layers:
        for name in (C.past_key(layer), C.past_value(layer)):
            feed[name] = rng.normal(0.0, 0.5, size=(batch, H, T, D)).astype(np.float16).astype(dtype)
    return {s.name: feed[s.name] for s in spec.inputs}


def _verify_feed(spec: GraphSpec, man: Manifest, batch: int, rng, seq: int) -> dict[str, np.ndarray]:
    T, H = man.max_length, man.model.num_heads
    D = man.model.hidden_size // H
    seq = max(1, min(seq, T - 1))
    lengths = rng.choice(np.arange(1, T - seq + 1), size=batch, replace=T - seq < batch).astype(np.int32)
    feed = {C.INPUT_IDS: rng.integers(3, man.model.vocab_size, size=(batch, seq)).astype(np.int64),
            C.PAST_LENGTH: lengths, C.KV_LENGTH: np.array(int(lengths.max()) + seq, dtype=np.int32)}
    dtype = np.dtype(man.dtype)
    for layer in range(man.num_layers):
        for name in (C.past_key(layer), C.past_value(layer)):
            feed[name] = rng.normal(0.0, 0.5, size=(batch, H, T, D)).astype(np.float16).astype(dtype)
    return {s.name: feed[s.name] for s in spec.inputs}


class OrtRunners:
    """polygraphy OnnxrtRunners over one engine directory's graphs, with the engine's shared weights (read once).
    `weight_override` replaces named weights (the negative control perturbs one)."""

    def __init__(self, directory: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), label: str = "",
                 weight_override: dict[str, np.ndarray] | None = None) -> None:
        import onnxruntime as ort
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.providers = list(providers)
        self.label = label or f"{self.directory.name}:{self.providers[0].replace('ExecutionProvider', '')}"
        self.weights = load_weights(self.directory, self.manifest)
        for name, arr in (weight_override or {}).items():
            self.weights[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))

    def __call__(self, spec: GraphSpec):
        from polygraphy.backend.onnxrt import OnnxrtRunner
        session = open_session(self.directory, self.manifest.graphs[self._index(spec)], self.weights, self.providers,
                               session_options(prepack=False))
        return OnnxrtRunner(session, name=f"{self.label}:{spec.name}")

    def _index(self, spec: GraphSpec) -> int:
        names = [g.name for g in self.manifest.graphs]
        if spec.name not in names:
            raise EngineError(f"{self.directory} has no graph {spec.name} (graphs: {names})")
        return names.index(spec.name)


def compare_graph(spec: GraphSpec, reference, candidate, feeds: list[dict], table: ToleranceTable) -> dict:
    """Run both polygraphy runners on `feeds`; -> {output: {max_abs_diff, limit, finite, passed}}."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # our error names every failure
            results = Comparator.run([reference, candidate], data_loader=feeds)
            ref_runs, cand_runs = results[reference.name], results[candidate.name]
            if spec.kind == "prefill":
                _drop_padding_columns(spec, feeds, ref_runs, cand_runs)
            limits = {o.name: table.for_output(o.name).limit(
                max(float(np.abs(np.asarray(r[o.name], dtype=np.float64)).max()) for r in ref_runs))
                for o in spec.outputs}
            func = SimpleCompareFunc(atol=limits, rtol=0.0, check_error_stat="max")
            accuracy = Comparator.compare_accuracy(results, compare_func=func)
    except PolygraphyException as exc:
        raise CrossBackendError(f"polygraphy could not compare {spec.name}: {exc}") from exc
    per_iteration = accuracy[0][(reference.name, candidate.name)]
    report = {}
    for o in spec.outputs:
        worst = max(float(it[o.name].max_absdiff) for it in per_iteration)
        finite = all(bool(np.isfinite(np.asarray(r[o.name], dtype=np.float64)).all()) for r in cand_runs)
        passed = finite and all(bool(it[o.name]) for it in per_iteration)
        report[o.name] = {"max_abs_diff": worst, "limit": limits[o.name], "finite": finite, "passed": passed}
    return report


def _drop_padding_columns(spec: GraphSpec, feeds: list[dict], *runs) -> None:
    """Zero the left-padding columns of prefill K/V in every runner's results. The runtime copies only a row's real
    columns into its slot, and padding columns are garbage by construction: their queries attend to nothing but
    masked keys, so fp16 and fp32 (different mask constants) legitimately disagree there."""
    for i, feed in enumerate(feeds):
        keep = feed[C.ATTENTION_MASK][:, None, :, None]  # [B, 1, S, 1]
        for out in spec.outputs:
            if out.name == C.LOGITS:
                continue
            for run in runs:
                arr = np.asarray(run[i][out.name])
                run[i][out.name] = arr * keep.astype(arr.dtype)


def compare_engine(man: Manifest, reference: Callable[[GraphSpec], object], candidate: Callable[[GraphSpec], object],
                   table: ToleranceTable, extra_feeds: Callable[[GraphSpec], dict] | None = None,
                   graphs: Sequence[str] | None = None, iterations: int = 2, seed: int = 0) -> dict:
    """Compare every graph (or `graphs`) of `man`; runner factories map a GraphSpec to a polygraphy runner.
    `extra_feeds(spec)` adds inputs only some runners take (TensorRT weight inputs). -> {graph: {output: ...}};
    raises CrossBackendError naming every failing output with its worst difference and limit."""
    report = {}
    for spec in man.graphs:
        if graphs is not None and spec.name not in graphs:
            continue
        feeds = graph_feeds(spec, man, iterations, seed)
        if extra_feeds is not None:
            extra = extra_feeds(spec)
            feeds = [{**f, **extra} for f in feeds]
        report[spec.name] = compare_graph(spec, reference(spec), candidate(spec), feeds, table)
    failed = [f"{g}.{o}: {v['max_abs_diff']:.3g} > {v['limit']:.3g}" + ("" if v["finite"] else " (not finite)")
              for g, outs in report.items() for o, v in outs.items() if not v["passed"]]
    if failed:
        raise CrossBackendError(f"cross-backend parity failed for {len(failed)} output(s): " + ", ".join(failed))
    return report


class TrtRunners:
    """polygraphy TrtRunners over the TensorRT plans of an engine directory (built by export/tensorrt_build.py).
    With the "inputs" weight strategy the plans take the weights as inputs: `extra_feeds` supplies them."""

    def __init__(self, directory: str | Path, label: str = "tensorrt") -> None:
        from ..runtime.trt_backend import TrtPlans
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.plans = TrtPlans.read(self.directory)
        self.label = label
        self._host = None

    def __call__(self, spec: GraphSpec):
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        plan = (self.directory / self.plans.plans[spec.name]).read_bytes()
        return TrtRunner(EngineFromBytes(plan), name=f"{self.label}:{spec.name}")

    def extra_feeds(self, spec: GraphSpec) -> dict[str, np.ndarray]:
        if self._host is None:
            self._host = np.fromfile(self.directory / self.manifest.weights_file, dtype=np.uint8)
        out = {}
        for name in self.plans.weight_inputs.get(spec.name, []):
            w = self.manifest.weights[name]
            out[name] = self._host[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape)
        return out


def check_backend_parity(directory: str | Path, backend: str, iterations: int = 2) -> dict:
    """The export step's cross-backend check: every graph on onnxruntime CPU (the reference, same dtype) against
    `backend` ("cuda": onnxruntime CUDA, "tensorrt": the built plans). Raises CrossBackendError."""
    reference = OrtRunners(directory, label="onnxruntime-cpu")
    man = reference.manifest
    table = TOLERANCES["fp16" if man.dtype == "float16" else "fp32"]
    if backend == "cuda":
        candidate = OrtRunners(directory, providers=("CUDAExecutionProvider",), label="onnxruntime-cuda")
        return compare_engine(man, reference, candidate, table, iterations=iterations)
    if backend == "tensorrt":
        trt = TrtRunners(directory)
        planned = [g.name for g in man.graphs if not g.kind.startswith("verify")]  # TensorRT plans no verify graph
        return compare_engine(man, reference, trt, table, extra_feeds=trt.extra_feeds, graphs=planned,
                              iterations=iterations)
    raise EngineError(f"backend={backend!r}: cross-backend parity knows 'cuda' and 'tensorrt'")
