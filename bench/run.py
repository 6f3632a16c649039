"""`skipdecode bench`: decode throughput of the onnxruntime engine at full depth and at SkipDecode speedups, next to
the ideal speedup of a cost model measured in the same run, Hugging Face `generate`, prefill time, resident memory
and the step's growth with past length. Engines for public OPT shapes are built locally with random weights (speed
does not depend on weight values) and cached.

Definitions (generation figures are medians over repeats; compare ratios, not absolute times: the machines are noisy):
* `tokens_per_s`: decode throughput, batch x (new tokens - 1) / (time from the first token to the last); the
  first token comes from the prefill, timed separately as `prefill_ms`. HF `generate` gets the same split: the
  time of `max_new_tokens=N` minus that of `max_new_tokens=1` on the same inputs.
* `measured_speedup`: full-depth decode time / SkipDecode decode time, same backend, prompts and lengths; the
  median over rounds of that ratio within a round.
* `ideal_speedup`: what the cost model (bench/cost.py) predicts for the same steps; its graph timings are
  the fastest of rotated rounds (other processes only add time), the generation figures medians.
Repeats interleave the speedups and the two HF lengths (HF with the first backend), so drift hits all alike.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..export.random_models import OPT_SHAPES, TINY_SHAPES
from ..runtime.generator import timed_generate
from ..runtime.manifest import load_manifest
from ..runtime.request import GenerateOptions
from . import cost
from .env import load_average, machine_info, memory_available, memory_read_gbps, probe_load_rss
from .hf import HFBaseline

EMBEDDED = "embedded"
SMALL = "small-opt-kjv"
# Models trained by this repository and committed under models/ (paths from the repository root): bench name ->
# skip-tuned checkpoint. "embedded" is the tiny one, whose step is mostly session overhead; small-opt-kjv is sized so
# that a batch-1 step reads its weights from memory (models/small-opt-kjv/MODEL_CARD.md).
EMBEDDED_MODELS = {EMBEDDED: Path("models/tiny-opt-kjv/skip-tuned"), SMALL: Path("models/small-opt-kjv/skip-tuned")}
EMBEDDED_CHECKPOINT = EMBEDDED_MODELS[EMBEDDED]
# label -> (Engine.load(prepack=...), export --quantize): the default (one pre-packed copy shared by all graphs), a
# private pre-packed copy per graph, no pre-packing, and the default on engines of each quantization scheme
# (docs/quantization.md: int8 / int4 blockwise MatMulNBits, dyn8 per-column DynamicQuantizeMatMul)
BACKENDS = {"onnxruntime": (None, None), "onnxruntime-private": ("private", None),
            "onnxruntime-noprepack": ("off", None), "onnxruntime-int8": (None, "int8"),
            "onnxruntime-int4": (None, "int4"), "onnxruntime-dyn8": (None, "dyn8")}
# peer label -> CTranslate2 quantization of the same checkpoint (timed in the first backend's rounds, like HF)
PEERS = {"ctranslate2-int8": "int8", "ctranslate2-fp32": "float32"}
EXPORT_SPEEDUPS = (2.0, 3.0, 5.0)
# Exporter sources whose change makes a cached engine stale (same format version, different graphs).
_EXPORTER_SOURCES = ("graphs.py", "onnx_export.py", "exporter.py", "quantize.py", "quantize_export.py",
                     "../runtime/contract.py")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. `quick()` and `full()` are the presets behind `--quick` and the default."""

    models: tuple[str, ...]  # a name of EMBEDDED_MODELS or a shape of random_models (opt-125m, opt-1.3b, tiny-*)
    batches: tuple[int, ...]
    speedups: tuple[float, ...] = (2.0, 3.0, 5.0)  # full depth (1) is always measured too
    max_new_tokens: int = 128
    prompt_lengths: tuple[int, int] = (16, 64)  # each prompt's length is drawn uniformly from [lo, hi]
    repeats: int = 3  # at least this many timed repeats per measurement ...
    # ... and more (up to max_repeats) until each measurement has this many seconds of samples: a small model's run
    # lasts milliseconds, about one scheduler time slice, so a few samples would measure the neighbours' load
    min_time_s: float = 2.0
    max_repeats: int = 30
    cost_rounds: int = 7  # rounds of the bucket timings behind each cost model
    threads: int | None = None  # onnxruntime intra-op threads = torch threads; None: every core
    backends: tuple[str, ...] = ("onnxruntime", "onnxruntime-private", "onnxruntime-int8")
    peers: tuple[str, ...] = tuple(PEERS)  # skipped (and recorded) where ctranslate2 is not installed
    hf: bool = True
    memory: bool = True
    scaling_lengths: tuple[int, ...] = (32, 64, 128, 192, 255)  # past lengths of the length-scaling section
    max_length: int = 256  # engines' max total length: KV cache = max_batch x max_length per layer
    max_batch: int = 32
    cache_dir: Path = Path("engines/bench")
    rebuild: bool = False
    seed: int = 0
    quick: bool = False
    weight_gbps: float | None = None  # measured at the start of a run (env.memory_read_gbps)
    # lossless mode rows: (draft speedup, draft tokens) pairs, timed in the same rounds as the speedups, on these
    # backends (greedy: their tokens are checked against the same round's full-depth run; int8 engines are exact
    # only up to MatMulNBits' rounding, docs/DESIGN.md §8, so they are not in the default). Draft speedup 0: the
    # engine's automatic policy's depth; draft tokens 0: its automatic drafting (the manifest's `lossless` policy,
    # measured at export; automatic requests draft only in steps with one lossless row).
    lossless: tuple[tuple[float, int], ...] = ((0.0, 0), (3.0, 4))
    lossless_backends: tuple[str, ...] = ("onnxruntime",)
    # quantized engines' kernel path (runtime/kernels.py): auto = the fastest that passed parity on this machine
    kernel: str = "auto"

    def __post_init__(self) -> None:
        known = [*EMBEDDED_MODELS, *OPT_SHAPES, *TINY_SHAPES]
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; known: {known}")
        bad = [b for b in self.backends if b not in BACKENDS] + [p for p in self.peers if p not in PEERS]
        if bad:
            raise ValueError(f"unknown backend {bad[0]!r}; known: {list(BACKENDS) + list(PEERS)}")
        if not self.batches or max(self.batches) > self.max_batch or min(self.batches) < 1:
            raise ValueError(f"batches {self.batches} must lie in [1, max_batch={self.max_batch}]")
        lo, hi = self.prompt_lengths
        if not 1 <= lo <= hi or hi + self.max_new_tokens > self.max_length:
            raise ValueError(f"prompt lengths {self.prompt_lengths} + max_new_tokens {self.max_new_tokens} must fit "
                             f"in max_length {self.max_length}")
        if self.max_new_tokens < 2 or self.repeats < 1 or min(self.speedups, default=2) < 1:
            raise ValueError("max_new_tokens >= 2, repeats >= 1 and speedups >= 1 are required")
        for ds, k in self.lossless:  # names a bad value
            GenerateOptions(max_new_tokens=2, lossless=True, draft_speedup=ds or None, draft_tokens=k or None)

    @property
    def all_speedups(self) -> tuple[float, ...]:
        return tuple(sorted({1.0, *map(float, self.speedups)}))

    @classmethod
    def quick_preset(cls, **kw) -> BenchConfig:
        # Sized to finish in a few minutes on 2 cores once the opt-125m engine is cached.
        base = dict(models=(EMBEDDED, "opt-125m"), batches=(1, 8), max_new_tokens=32, prompt_lengths=(8, 32),
                    repeats=3, min_time_s=1.0, cost_rounds=5, scaling_lengths=(32, 96, 160, 255), quick=True)
        return cls(**(base | kw))

    @classmethod
    def full_preset(cls, **kw) -> BenchConfig:
        base = dict(models=(*present_embedded(), "opt-125m", "opt-350m", "opt-1.3b"), batches=(1, 8, 32))
        return cls(**(base | kw))


def present_embedded(root: Path = Path(".")) -> tuple[str, ...]:
    """The embedded models of the full run: the default one always (a missing one is an error when it loads), the
    others where their checkpoint is in this checkout (`make small-model` writes models/small-opt-kjv/)."""
    return tuple(name for name, path in EMBEDDED_MODELS.items()
                 if name == EMBEDDED or (root / path / "config.json").is_file())


@dataclass(frozen=True)
class BenchModel:
    name: str
    checkpoint: Path  # HF checkpoint: the embedded model, or random weights saved by this module
    engine: Path
    engines: dict = field(default_factory=dict)  # export --quantize value (None: float) -> engine directory


def make_prompts(batch: int, vocab_size: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """Random token ids of mixed lengths, seeded per batch size (ids 4.. avoid the special tokens 0-3)."""
    rng = np.random.default_rng([seed, batch])
    return [rng.integers(4, vocab_size, size=int(n)).tolist() for n in rng.integers(lengths[0], lengths[1] + 1, batch)]


def _exporter_hash() -> str:
    h = hashlib.sha256()
    for rel in _EXPORTER_SOURCES:
        h.update((Path(__file__).parent.parent / "export" / rel).read_bytes())
    return h.hexdigest()[:16]


def prepare_model(name: str, cfg: BenchConfig, log: Callable[[str], None]) -> BenchModel:
    """Checkpoint + engines for `name` (float, and int8 when a backend needs it), reused from `cfg.cache_dir` when
    built with the same settings and exporter."""
    from ..export.random_models import save_random_opt

    embedded = EMBEDDED_MODELS.get(name)
    root = cfg.cache_dir / (embedded.parent.name if embedded else name)  # the embedded ones by their model's name
    checkpoint = embedded or root / "checkpoint"
    if embedded and not checkpoint.is_dir():
        raise FileNotFoundError(f"the embedded model {checkpoint} is missing: run the bench from the repository root "
                                f"(`make tiny-model` / `make small-model` train them)")
    if not embedded and (cfg.rebuild or not (checkpoint / "config.json").is_file()):
        log(f"[{name}] saving a random-weight checkpoint (seed {cfg.seed})")
        shutil.rmtree(checkpoint, ignore_errors=True)
        save_random_opt(name, checkpoint, seed=cfg.seed)
    variants = sorted({BACKENDS[b][1] for b in cfg.backends} | {None}, key=str)
    engines = {q: _prepare_engine(name, checkpoint, root, cfg, log, q) for q in variants}
    return BenchModel(name, checkpoint, engines[None], engines)


def _prepare_engine(name: str, checkpoint: Path, root: Path, cfg: BenchConfig, log, quantize: str | None) -> Path:
    from ..export.exporter import ExportConfig, export

    suffix = f"-{quantize}" if quantize else ""
    engine, marker = root / f"engine{suffix}", root / f"bench-build{suffix}.json"
    want = {"checkpoint": str(checkpoint), "seed": cfg.seed, "speedups": list(EXPORT_SPEEDUPS),
            "max_length": cfg.max_length, "max_batch": cfg.max_batch, "exporter": _exporter_hash(),
            "quantize": quantize}
    if not cfg.rebuild and marker.is_file() and json.loads(marker.read_text()) == want and _loads(engine):
        return engine
    from transformers import AutoConfig
    positions = AutoConfig.from_pretrained(checkpoint, local_files_only=True).max_position_embeddings
    log(f"[{name}] exporting {checkpoint}{' (' + quantize + ')' if quantize else ''} -> {engine}")
    t0 = time.perf_counter()
    export(ExportConfig(model=str(checkpoint), out=engine, speedups=EXPORT_SPEEDUPS, max_batch=cfg.max_batch,
                        max_length=min(cfg.max_length, positions), force=True, quantize=quantize), progress=False)
    log(f"[{name}] exported in {time.perf_counter() - t0:.0f} s")
    marker.write_text(json.dumps(want))
    return engine


def _loads(engine: Path) -> bool:
    from ..runtime.errors import EngineError
    try:
        load_manifest(engine)
    except EngineError:
        return False
    return True


@dataclass
class _Runs:
    """Per-repeat timings of one (backend, batch, speedup)."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    tokens: list = field(default_factory=list)  # the last run's tokens per row
    drafted: int = 0  # lossless runs: over all repeats
    accepted: int = 0


def _repeats(cfg: BenchConfig, measurements: int) -> Iterator[int]:
    """Rounds of interleaved repeats: at least `cfg.repeats`, then more while the rounds so far took less than
    `min_time_s` per measurement (capped at `max_repeats`)."""
    t0 = time.perf_counter()
    for i in range(max(cfg.max_repeats, cfg.repeats)):
        if i >= cfg.repeats and time.perf_counter() - t0 >= cfg.min_time_s * measurements:
            return
        yield i


def _timed_generate(engine, prompts, opts: GenerateOptions, runs: _Runs) -> None:
    timed = timed_generate(engine, prompts, opts)
    runs.total.append(timed.total_s)
    runs.tokens = [tuple(r.tokens) for r in timed.results]
    short = [len(t) for t in runs.tokens if len(t) != opts.max_new_tokens]
    if short:
        raise RuntimeError(f"generation stopped after {short[0]} of {opts.max_new_tokens} tokens")
    runs.prefill.append(timed.prefill_s)  # prefill + sampling of the first token
    runs.decode.append(timed.decode_s)
    runs.drafted += sum(r.drafted for r in timed.results)
    runs.accepted += sum(r.accepted for r in timed.results)


def bench_engines(model: BenchModel, backends: Sequence[str], cfg: BenchConfig, log: Callable[[str], None],
                  baselines: Sequence = ()) -> dict:
    """Throughput rows, cost models and (the run's first backend) length scaling of several engines, loaded
    together so that every round times each backend's runs back to back (drift and the neighbours' load hit all
    alike, and ratios between backends pair within a round); with `baselines` (HF generate, CTranslate2), their rows
    too, timed in the same rounds."""
    from ..runtime.engine import Engine

    engines = {}
    for backend in backends:
        prepack, quantize = BACKENDS[backend]
        directory = model.engines.get(quantize, model.engine)
        max_length = min(cfg.max_length, load_manifest(directory).max_length)  # a model may have fewer positions
        engines[backend] = Engine.load(directory, threads=cfg.threads, max_batch=max(cfg.batches),
                                       max_length=max_length, prepack=prepack, kernel=cfg.kernel)
    out: dict = {"results": [], "cost_models": [], "length_scaling": [], "lossless": [], "kernels": []}
    for backend, engine in engines.items():
        if engine.kernel_choice is not None:
            log(f"[{model.name}] {backend}: {engine.kernel_choice.line()}")
            out["kernels"].append({"model": model.name, "backend": backend, **engine.kernel_choice.to_dict()})
    for batch in cfg.batches:
        rows, cms, lossless = _bench_batch(engines, model.name, batch, cfg, log, baselines)
        out["results"] += rows
        out["cost_models"] += cms
        out["lossless"] += lossless
    if cfg.backends[0] in engines:
        be = engines[cfg.backends[0]].backend
        lengths = tuple(n for n in cfg.scaling_lengths if n < be.max_length)
        scaling = cost.length_scaling(be, max(cfg.batches), lengths, cfg.cost_rounds, cfg.threads)
        out["length_scaling"].append({"model": model.name, "backend": cfg.backends[0], **scaling})
    for engine in engines.values():
        engine.close()
    del engines, engine
    gc.collect()  # the sessions and the KV caches go before the next engines load
    return out


def bench_engine(model: BenchModel, backend: str, cfg: BenchConfig, log: Callable[[str], None],
                 baselines: Sequence = ()) -> dict:
    """`bench_engines` of one backend."""
    return bench_engines(model, [backend], cfg, log, baselines)


def _bench_batch(engines: dict, name: str, batch: int, cfg: BenchConfig, log,
                 baselines: Sequence) -> tuple[list[dict], list[dict], list[dict]]:
    """Cost models, then every backend's speedups (and the baselines') in interleaved rounds at one batch size."""
    N = cfg.max_new_tokens
    first = next(iter(engines.values()))
    prompts = make_prompts(batch, first.vocab_size, cfg.prompt_lengths, cfg.seed)
    p = max(map(len, prompts))
    cms, runs, options = {}, {}, {}
    for backend, engine in engines.items():
        # cost model at the mid-generation past length of each row (the steps' average attention span)
        buckets_s = cost.time_buckets(engine.backend, [len(x) + N // 2 for x in prompts], cfg.cost_rounds)
        cms[backend] = (cost.fit_cost_model(list(buckets_s), list(buckets_s.values())), buckets_s)
        runs[backend] = {s: _Runs() for s in cfg.all_speedups}
        options[backend] = {s: GenerateOptions(max_new_tokens=N, speedup=s) for s in runs[backend]}
        if backend in cfg.lossless_backends:  # keyed (draft speedup, draft tokens)
            for ds, k in cfg.lossless:
                runs[backend][(ds, k)] = _Runs()
                options[backend][(ds, k)] = GenerateOptions(max_new_tokens=N, lossless=True,
                                                            draft_speedup=ds or None, draft_tokens=k or None)
    timers = [(b, b.runner(prompts, N), b.runner(prompts, 1), _Runs()) for b in baselines]
    for backend, engine in engines.items():  # warm-up: session caches, bindings per (bucket, rows)
        for s in runs[backend]:
            _timed_generate(engine, prompts, options[backend][s], _Runs())
    for _, run_n, run_1, _ in timers:
        run_n(), run_1()
    for _ in _repeats(cfg, sum(map(len, runs.values())) + 2 * len(timers)):
        for backend, engine in engines.items():
            for s in runs[backend]:
                _timed_generate(engine, prompts, options[backend][s], runs[backend][s])
        for _, run_n, run_1, r in timers:  # decode time = generate(N) - generate(1): prefill and setup cancel
            r.total.append(run_n())
            r.prefill.append(run_1())
            r.decode.append(r.total[-1] - r.prefill[-1])
    rows, lossless, entries = [], [], []
    for backend, engine in engines.items():
        be, (cm, buckets_s), full = engine.backend, cms[backend], runs[backend][1.0]
        for s, r in runs[backend].items():
            if isinstance(s, tuple):
                lossless.append(_lossless_row(name, backend, batch, s, r, full, N, be.draft_policy))
                log(f"[{name} {backend} b{batch}] lossless (draft {_draft_name(s, be.draft_policy)}): "
                    f"{lossless[-1]['tokens_per_s']:.1f} tok/s, {lossless[-1]['speedup']:.2f}x full depth, "
                    f"acceptance {lossless[-1]['acceptance_rate']:.2f}, identical tokens {lossless[-1]['identical']}")
                continue
            steps = cost.step_buckets(be.num_layers, be.warmup_layers, be.buckets, s, p, N)
            row = _row(name, backend, batch, s, r, N, be.num_layers, steps)
            # paired by round: a round's full-depth and skip runs were timed back to back, so drift cancels
            paired = statistics.median(f / d for f, d in zip(full.decode, r.decode, strict=True))
            row |= {"ideal_speedup": cost.ideal_speedup(cm, be.num_layers, steps), "measured_speedup": paired}
            if s == 1.0:  # the loop's own cost (sampling, Python) plus other processes' interference: median step
                # of the generation minus the fastest run of the full-depth graph alone
                row["step_over_graph_ms"] = row["step_ms"] - cm.step_s(be.num_layers) * 1e3
            row |= _roofline(be.manifest, steps, row["step_ms"], cfg.weight_gbps)
            row["e2e_speedup"] = statistics.median(f / d for f, d in zip(full.total, r.total, strict=True))
            rows.append(row)
            log(f"[{name} {backend} b{batch}] {s:g}x: {row['tokens_per_s']:.1f} tok/s, step {row['step_ms']:.2f} "
                f"ms, speedup {row['measured_speedup']:.2f} (ideal {row['ideal_speedup']:.2f}, end to end "
                f"{row['e2e_speedup']:.2f})")
        entries.append({"model": name, "backend": backend, "batch": batch, **cm.to_dict(),
                        "fixed_fraction": cm.fixed_s / cm.step_s(be.num_layers),
                        "mean_past_length": float(np.mean([len(x) for x in prompts])) + N // 2,
                        "bucket_ms": {str(b): t * 1e3 for b, t in buckets_s.items()}})
    for b, _, _, r in timers:
        rows.append(_row(name, b.label, batch, 1.0, r, N, b.num_layers, [b.num_layers]) | b.extra())
        log(f"[{name} {b.label} b{batch}] {rows[-1]['tokens_per_s']:.1f} tok/s, step {rows[-1]['step_ms']:.2f} ms")
    return rows, entries, lossless


def _draft_name(key: tuple[float, int], policy) -> str:
    """How a lossless row drafts, in words: "4 tokens from 3x", or the engine's automatic policy."""
    speedup = f"{key[0]:g}x" if key[0] else f"{policy.draft_speedup:g}x"
    if key[1]:
        return f"{key[1]} tokens from {speedup}"
    if not policy.tokens:
        return "automatic: the engine's policy drafts nothing (full-depth steps)"
    stop = f", a round ends below {policy.stop_below:g}" if policy.stop_below is not None else ""
    return f"automatic: {policy.tokens} tokens from {speedup}{stop}"


def _lossless_row(model: str, backend: str, batch: int, key: tuple[float, int], r: _Runs, full: _Runs, N: int,
                  policy) -> dict:
    """Lossless mode next to full depth on the same backend, paired by round (drift cancels)."""
    decode = statistics.median(r.decode)
    return {"model": model, "backend": backend, "batch": batch, "draft_speedup": key[0], "draft_tokens": key[1],
            "drafting": _draft_name(key, policy), "policy": policy.as_dict(),
            "max_new_tokens": N, "tokens_per_s": batch * (N - 1) / decode,
            "speedup": statistics.median(f / d for f, d in zip(full.decode, r.decode, strict=True)),
            "e2e_speedup": statistics.median(f / d for f, d in zip(full.total, r.total, strict=True)),
            "acceptance_rate": r.accepted / r.drafted if r.drafted else 0.0,
            "identical": r.tokens == full.tokens, "repeats": len(r.decode)}


def _roofline(man, steps: Sequence[int], step_ms: float, gbps: float | None) -> dict:
    """Weights read per decode step (its graph's, averaged over the steps) and the step's fraction of the time that
    reading them at the measured bandwidth takes: at batch 1 decoding is memory-bound and this is its roof."""
    per_bucket = {b: sum(man.weights[w].nbytes for w in man.decode(b).weights) for b in set(steps)}
    nbytes = sum(per_bucket[b] for b in steps) / len(steps)
    out = {"weight_bytes_per_step": nbytes}
    if gbps:
        out["roofline_fraction"] = nbytes / (gbps * 1e9) * 1e3 / step_ms
    return out


def _decode_s(r: _Runs) -> float:
    """Median decode time. A baseline's is generate(N) - generate(1) per repeat, which a loaded machine can make
    negative; then the difference of the fastest runs (noise only adds time), and an error if even that is not
    positive (no number is better than a wrong one)."""
    decode = statistics.median(r.decode)
    if decode <= 0 and r.prefill:
        decode = min(r.total) - min(r.prefill)
    if decode <= 0:
        raise RuntimeError(f"decode time {decode:.4f} s is not positive: the machine is too busy to time this row")
    return decode


def _row(model: str, backend: str, batch: int, speedup: float, r: _Runs, N: int, L: int, steps) -> dict:
    decode = _decode_s(r)
    return {"model": model, "backend": backend, "batch": batch, "speedup": speedup, "max_new_tokens": N,
            "tokens_per_s": batch * (N - 1) / decode, "e2e_tokens_per_s": batch * N / statistics.median(r.total),
            "step_ms": decode / (N - 1) * 1e3, "prefill_ms": statistics.median(r.prefill) * 1e3,
            "mean_layers": sum(steps) / len(steps), "layer_speedup": L * len(steps) / sum(steps),
            "repeats": len(r.decode)}


def bench_memory(model: BenchModel, backends: Sequence[str]) -> dict:
    """Resident memory (fresh subprocesses): all bucket graphs per backend vs one plain copy of the weights."""
    from ..runtime.memory import measure_memory

    m = measure_memory(model.engine)
    out = {"model": model.name, **m}
    for label in backends:
        prepack, quantize = BACKENDS[label]
        if quantize is not None:
            out[f"all_buckets_{quantize}_bytes"] = probe_load_rss(model.engines[quantize], prepack=prepack)
        elif prepack is not None:
            out[f"all_buckets_{prepack}_bytes"] = probe_load_rss(model.engine, prepack=prepack)
    return out


def interleave_groups(model: BenchModel, backends: Sequence[str], budget: int | None = None) -> list[list[str]]:
    """Backends whose engines are loaded and timed together, in order: as many consecutive ones as fit in half of
    the available memory (a private pre-packed engine counts one copy of the weights per graph, the others their
    weights file), so that small models compare every backend within the same rounds and large ones still load."""
    budget = int(0.5 * memory_available()) if budget is None else budget
    groups: list[list[str]] = []
    used = 0
    for label in backends:
        prepack, quantize = BACKENDS[label]
        engine = model.engines.get(quantize, model.engine)
        need = prepack_bytes_estimate(engine) if prepack == "private" else _weights_bytes(engine)
        if groups and used + need <= budget:
            groups[-1].append(label)
            used += need
        else:
            groups.append([label])
            used = need
    return groups


def _weights_bytes(engine: Path) -> int:
    return sum(w.nbytes for w in load_manifest(engine).weights.values())


def prepack_bytes_estimate(engine: Path) -> int:
    """Pre-packing gives every graph a private copy of the weights it uses."""
    man = load_manifest(engine)
    return sum(man.weights[w].nbytes for g in man.graphs for w in g.weights)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run every measurement of `cfg`; -> the bench JSON object (targets added by report.finish)."""
    from .report import finish

    t_start = time.perf_counter()
    cfg = replace(cfg, threads=cfg.threads or os.cpu_count())  # recorded, and the same for onnxruntime and torch
    load_at_start = load_average()
    cfg = replace(cfg, weight_gbps=cfg.weight_gbps or memory_read_gbps())
    log(f"weight-streaming bandwidth {cfg.weight_gbps:.1f} GB/s (the batch-1 roofline)")
    out: dict = {"results": [], "cost_models": [], "length_scaling": [], "lossless": [], "memory_models": [],
                 "skipped": [], "kernels": []}
    for name in cfg.models:
        model = prepare_model(name, cfg, log)
        backends = list(cfg.backends)
        if "onnxruntime-private" in backends and prepack_bytes_estimate(model.engine) > 0.5 * memory_available():
            backends.remove("onnxruntime-private")
            out["skipped"].append({"model": name, "backend": "onnxruntime-private",
                                   "reason": "pre-packed weights (one copy per graph) would exceed half of the "
                                             "available memory"})
        # HF generate and the peers run in the first backend's rounds; they are freed before the next engine loads
        baselines = ([HFBaseline(model.checkpoint, cfg.threads)] if cfg.hf else []) + _peers(model, cfg, log, out)
        for group in interleave_groups(model, backends):
            part = bench_engines(model, group, cfg, log, baselines)
            baselines = []
            for key, rows in part.items():
                out[key] += rows
        if cfg.memory:
            out["memory_models"].append(bench_memory(model, backends))
    out["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    out["machine"] = machine_info(cfg.threads) | {"load_average_at_start": load_at_start}
    out["duration_s"] = time.perf_counter() - t_start
    return finish(out)


def _peers(model: BenchModel, cfg: BenchConfig, log, out: dict) -> list:
    """CTranslate2 baselines of the model's checkpoint (converted once into the bench cache)."""
    if not cfg.peers:
        return []
    try:
        from .ct2_peer import CT2Baseline, convert, require_ctranslate2
        require_ctranslate2()
    except ImportError as exc:
        out["skipped"] += [{"model": model.name, "backend": p, "reason": str(exc)} for p in cfg.peers]
        return []
    from transformers import AutoConfig
    layers = AutoConfig.from_pretrained(model.checkpoint, local_files_only=True).num_hidden_layers
    peers = []
    for label in cfg.peers:
        target = model.engine.parent / label
        try:
            if cfg.rebuild or not (target / "model.bin").is_file():
                log(f"[{model.name}] converting {model.checkpoint} for {label}")
                convert(model.checkpoint, target, PEERS[label])
            peers.append(CT2Baseline(label, target, layers, cfg.threads, PEERS[label]))
        except (ValueError, RuntimeError) as exc:  # e.g. its OPT converter needs a vocabulary multiple of 8
            out["skipped"].append({"model": model.name, "backend": label, "reason": str(exc)})
    return peers


def config_from(quick: bool, **overrides) -> BenchConfig:
    """The preset, with the given (non-None) fields replaced."""
    preset = BenchConfig.quick_preset() if quick else BenchConfig.full_preset()
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})
