"""Serving benchmark: continuous vs static batching under Poisson arrivals, at full depth and with SkipDecode.

    python -m skipdecode.bench.serve_bench --engine engines/tiny-opt-kjv --requests 64 --rate 40 --speedups 1,2,3

Workload: `requests` requests arriving as a Poisson process of `rate` per second (seeded), prompt lengths and
max_new_tokens uniform in their ranges, EOS ignored so every request does a fixed amount of work, greedy.
Modes, all in-process on one engine (no HTTP, so the batching policy is what is measured):
* static: whenever the engine is free, the requests that have arrived (up to max batch) form one static batch
  (`Engine.stream`, the paper's batch-shared schedule over the batch's p and T); it runs until its longest request
  is done, and late arrivals wait for the next batch.
* gate / group: continuous batching (runtime/batcher.py); rows join and leave between steps, each row runs its own
  schedule. gate = one call of the deepest row's graph with per-row gates; group = one call per distinct bucket.
Also a step micro-benchmark: one decode step over a fixed mix of row buckets, gate vs group, median of many.
Reported: useful tokens/s, mean and p95 latency (arrival -> last token), mean time to first token, mean layers
per token (each token's own bucket) and graph layers per token (compute handed to the graphs, free rows included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from skipdecode.runtime.batcher import Batcher, gate_row, prepare_request
from skipdecode.runtime.request import FinishEvent, GenerateOptions, TokenEvent
from skipdecode.runtime.scheduler import SchedulerConfig

from skipdecode.cliargs import floats

MODES = ("static", "gate", "group")


@dataclass(frozen=True)
class BenchRequest:
    arrival_s: float
    prompt: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class RunResult:
    mode: str
    speedup: float
    repeat: int
    makespan_s: float
    tokens: int
    tokens_per_s: float
    mean_latency_s: float
    p95_latency_s: float
    mean_ttft_s: float
    mean_layers: float  # per generated token, the layers its row ran
    graph_layers_per_token: float  # graph budget x rows per call (free and finished rows included) / tokens


def workload(n: int, rate: float, prompt_range: tuple[int, int], new_range: tuple[int, int], vocab: int,
             seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n)) - 1.0 / rate  # first request at ~t=0
    return [BenchRequest(float(max(t, 0.0)), tuple(int(x) for x in rng.integers(3, vocab, int(rng.integers(*p)))),
                         int(rng.integers(*m)))
            for t, p, m in zip(arrivals, [prompt_range] * n, [new_range] * n, strict=True)]


def _options(max_new: int, speedup: float) -> GenerateOptions:
    return GenerateOptions(max_new_tokens=max_new, speedup=None if speedup == 1 else speedup, eos_token_id=None)


def _summary(mode, speedup, repeat, reqs, finish, first, layers, work, start) -> RunResult:
    tokens = sum(r.max_new_tokens for r in reqs)
    makespan = max(finish.values()) - start
    lat = np.array([finish[i] - start - r.arrival_s for i, r in enumerate(reqs)])
    ttft = np.array([first[i] - start - r.arrival_s for i, r in enumerate(reqs)])
    return RunResult(mode, speedup, repeat, makespan, tokens, tokens / makespan, float(lat.mean()),
                     float(np.percentile(lat, 95)), float(ttft.mean()), layers / tokens, work / tokens)


def run_continuous(engine, reqs: list[BenchRequest], speedup: float, strategy: str, max_batch: int,
                   repeat: int = 0) -> RunResult:
    be = engine.backend
    batcher = Batcher(be, SchedulerConfig(max_batch, max_batch * be.max_length, None, strategy))
    pending = deque(enumerate(reqs))
    finish, first, layers, work = {}, {}, 0, 0
    start = time.perf_counter()
    while pending or not batcher.idle:
        now = time.perf_counter() - start
        while pending and pending[0][1].arrival_s <= now:
            i, r = pending.popleft()
            batcher.add(prepare_request(i, r.prompt, _options(r.max_new_tokens, speedup), be, engine.vocab_size))
        if batcher.idle:
            time.sleep(max(pending[0][1].arrival_s - now, 0.0))
            continue
        res = batcher.step()
        t = time.perf_counter()
        work += res.graph_row_layers
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                layers += ev.budget
                first.setdefault(ev.request_id, t)
            elif isinstance(ev, FinishEvent):
                finish[ev.request_id] = t
    return _summary(strategy, speedup, repeat, reqs, finish, first, layers, work, start)


def run_static(engine, reqs: list[BenchRequest], speedup: float, max_batch: int, repeat: int = 0) -> RunResult:
    pending = deque(enumerate(reqs))
    finish, first, layers, work = {}, {}, 0, 0
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0][1].arrival_s > now:
            time.sleep(pending[0][1].arrival_s - now)
            continue
        batch = []
        while pending and pending[0][1].arrival_s <= now and len(batch) < max_batch:
            batch.append(pending.popleft())
        # a static batch: every row runs to the batch's longest request (as engine.generate would run it); a
        # request is complete at its own length
        opts = _options(max(r.max_new_tokens for _, r in batch), speedup)
        be = engine.backend
        batcher = Batcher(be, SchedulerConfig(len(batch), len(batch) * be.max_length))
        for row, (_, r) in enumerate(batch):
            batcher.add(prepare_request(row, r.prompt, opts, be, engine.vocab_size))
        while not batcher.idle:
            res = batcher.step()
            t = time.perf_counter()
            work += res.graph_row_layers
            for ev in res.events:
                i, r = batch[ev.request_id]
                if not isinstance(ev, TokenEvent) or ev.index >= r.max_new_tokens:
                    continue
                layers += ev.budget
                first.setdefault(i, t)
                if ev.index == r.max_new_tokens - 1:
                    finish[i] = t
    return _summary("static", speedup, repeat, reqs, finish, first, layers, work, start)


def step_micro(engine, mixes: dict[str, list[int]], reps: int = 100) -> list[dict]:
    """Median time of one decode step over rows of the given buckets (slot order), gate vs group."""
    be = engine.backend
    L, w, n = be.num_layers, be.warmup_layers or 1, be.max_batch
    slots = be.slots.allocate(n)
    be.prefill_rows([[5] * 32] * n, slots)
    ids = np.full(n, 7)
    out = []
    for name, buckets in mixes.items():
        buckets = [min(b for b in be.buckets if b >= x) for x in buckets[:n]]
        k = len(buckets)
        top = max(buckets)
        gate_call = [(slots[:k], ids[:k], top, np.array([gate_row(L, w, top, b) for b in buckets]))]
        group_calls = []
        for g in sorted(set(buckets), reverse=True):
            rows = [i for i, b in enumerate(buckets) if b == g]
            group_calls.append(([slots[i] for i in rows], ids[rows], g, np.ones((len(rows), g), dtype=bool)))
        times = {"gate": [], "group": []}
        for _ in range(reps):  # alternate, so drifting machine load hits both alike
            for key, calls in (("gate", gate_call), ("group", group_calls)):
                be.slots.lengths[slots] = 32  # every step at the same past length
                t = time.perf_counter()
                for c in calls:
                    be.decode_rows(*c)
                times[key].append(time.perf_counter() - t)
        g_ms, p_ms = (float(np.median(times[x]) * 1e3) for x in ("gate", "group"))
        out.append({"rows": name, "buckets": buckets, "gate_ms": g_ms, "group_ms": p_ms,
                    "group_over_gate": p_ms / g_ms})
    be.slots.free(slots)
    return out


def default_mixes(L: int) -> dict[str, list[int]]:
    return {"all full depth": [L] * 8, "all at L/4": [max(L // 4, 1)] * 8,
            "one new row + 7 late rows": [L] + [max(L // 4, 1)] * 7,
            "two halves (L/2 | L/4)": [L // 2] * 4 + [max(L // 4, 1)] * 4,
            "spread L..L/6": [round(L - i * (L - L / 6) / 7) for i in range(8)]}


def medians(results: list[RunResult]) -> list[dict]:
    """Median of each field over the repeats of every (mode, speedup), with throughput relative to static."""
    keys = sorted({(r.mode, r.speedup) for r in results}, key=lambda k: (k[1], MODES.index(k[0])))
    rows = []
    for mode, s in keys:
        runs = [asdict(r) for r in results if (r.mode, r.speedup) == (mode, s)]
        row = {"mode": mode, "speedup": s, "runs": len(runs)}
        row |= {f: float(np.median([r[f] for r in runs])) for f in runs[0] if f not in ("mode", "speedup", "repeat")}
        rows.append(row)
    for row in rows:
        static = [r for r in rows if r["mode"] == "static" and r["speedup"] == row["speedup"]]
        row["vs_static"] = row["tokens_per_s"] / static[0]["tokens_per_s"] if static else None
    return rows


def print_table(rows: list[dict], micro: list[dict]) -> None:
    print(f"{'mode':<7} {'speedup':>7} {'tokens/s':>9} {'vs static':>9} {'mean lat s':>10} {'p95 lat s':>9} "
          f"{'ttft s':>7} {'layers/tok':>10} {'graph layers/tok':>16}")
    for r in rows:
        vs = f"{r['vs_static']:.2f}x" if r["vs_static"] else "-"
        print(f"{r['mode']:<7} {r['speedup']:>7g} {r['tokens_per_s']:>9.1f} {vs:>9} {r['mean_latency_s']:>10.3f} "
              f"{r['p95_latency_s']:>9.3f} {r['mean_ttft_s']:>7.3f} {r['mean_layers']:>10.2f} "
              f"{r['graph_layers_per_token']:>16.2f}")
    if micro:
        print("one decode step over 8 rows (median ms):")
        for m in micro:
            print(f"  {m['rows']:<28} gate {m['gate_ms']:7.3f}  group {m['group_ms']:7.3f}  "
                  f"group/gate {m['group_over_gate']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="skipdecode-serve-bench", description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=40.0, help="Poisson arrival rate, requests per second")
    p.add_argument("--prompt-lengths", type=int, nargs=2, default=(8, 48), metavar=("MIN", "MAX"),
                   help="uniform in [MIN, MAX)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"),
                   help="max_new_tokens uniform in [MIN, MAX)")
    p.add_argument("--speedups", type=floats, default=(1.0, 2.0, 3.0))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of static,gate,group")
    p.add_argument("--max-batch", type=int, help="default: the engine's KV slots")
    p.add_argument("--repeats", type=int, default=1, help="runs per (mode, speedup), interleaved; medians reported")
    p.add_argument("--micro-reps", type=int, default=100, help="0 skips the step micro-benchmark")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    configure_onnxruntime(args.threads)  # one pool for every bucket graph, as `skipdecode serve` runs
    engine = Engine.load(args.engine, threads=args.threads)
    be = engine.backend
    max_batch = args.max_batch or be.max_batch
    reqs = workload(args.requests, args.rate, tuple(args.prompt_lengths), tuple(args.new_tokens), engine.vocab_size,
                    args.seed)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        p.error(f"--modes {args.modes!r}: each must be one of {','.join(MODES)}")
    if args.prompt_lengths[1] + args.new_tokens[1] - 2 > be.max_length:
        p.error(f"longest prompt {args.prompt_lengths[1] - 1} + new tokens {args.new_tokens[1] - 1} is above the "
                f"engine's max_length {be.max_length}")
    results = []
    for rep in range(args.repeats):
        for s in args.speedups:
            for mode in modes:
                results.append(run_static(engine, reqs, s, max_batch, rep) if mode == "static"
                               else run_continuous(engine, reqs, s, mode, max_batch, rep))
                print(f"  {mode} {s:g}x run {rep}: {results[-1].tokens_per_s:.1f} tokens/s", file=sys.stderr)
    micro = step_micro(engine, default_mixes(be.num_layers), args.micro_reps) if args.micro_reps else []
    print(f"engine {args.engine}: L={be.num_layers} buckets {list(be.buckets)} max batch {max_batch}; "
          f"{args.requests} requests, Poisson {args.rate:g}/s, prompts {args.prompt_lengths}, new tokens "
          f"{args.new_tokens}, {sum(r.max_new_tokens for r in reqs)} tokens")
    table = medians(results)
    print_table(table, micro)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: (list(v) if isinstance(v, tuple) else v)
                                                    for k, v in vars(args).items() if k != "json"} | {
            "engine": str(args.engine), "num_layers": be.num_layers, "buckets": list(be.buckets)},
            "medians": table, "runs": [asdict(r) for r in results], "step_micro": micro}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
