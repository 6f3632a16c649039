"""Chunked prefill benchmark: the inter-token latency of running streams while a long prompt is admitted.

    python -m skipdecode.bench.prefill_bench --engine engines/tiny-opt-kjv --budgets 0,64 --rounds 5

One engine, one process. Per round, for each `max_prefill_tokens` setting in turn (0: no limit, every prompt
prefilled in one call), a `Service` with that setting runs `--streams` streamed requests (short prompts, greedy, full
depth, EOS ignored). Once each of them has produced `--warm` tokens, one long prompt (default: as long as the engine's
KV window allows beside `--long-new-tokens`) is submitted. Token times are taken on the service's worker thread as the
tokens are emitted.

Reported per setting, medians over rounds: the max and p50 inter-token latency (ITL) of the running streams over
the long prompt's prefill (every gap between two tokens of a stream that overlaps the span from its submission to
its first token), the p50 ITL of the streams over their whole run, the long prompt's time to first token and the
tokens each stream got meanwhile.
Settings run interleaved within each round, so they see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from skipdecode.runtime.request import GenerateOptions, TokenEvent
from skipdecode.runtime.service import Service, ServiceConfig


@dataclass(frozen=True)
class RoundResult:
    budget: int  # max_prefill_tokens; 0 = no limit (one-call prefill)
    round: int
    long_prompt: int
    itl_max_ms: float  # over the long prompt's prefill
    itl_p50_ms: float  # over the long prompt's prefill
    itl_p50_all_ms: float  # over the streams' whole run
    long_ttft_ms: float
    stream_tokens: int  # tokens each stream got from the long prompt's submission to its first token (median)


def run_round(engine, budget: int, streams: int, stream_prompt: int, stream_new: int, warm: int, long_prompt: int,
              long_new: int, seed: int, rnd: int) -> RoundResult:
    rng = np.random.default_rng([seed, rnd + 1])
    vocab = engine.vocab_size
    times: dict[int, list[float]] = {}
    warmed = threading.Event()
    first_long = threading.Event()

    def listener_for(key: int):
        def on_event(ev) -> None:  # the worker thread: record and return at once
            if isinstance(ev, TokenEvent):
                times.setdefault(key, []).append(time.perf_counter())
                if key < streams and all(len(times.get(k, ())) >= warm for k in range(streams)):
                    warmed.set()
                if key == streams:
                    first_long.set()
        return on_event

    opts = GenerateOptions(max_new_tokens=stream_new, eos_token_id=None)
    with Service(engine, ServiceConfig(max_prefill_tokens=budget or None)) as svc:
        handles = [svc.submit([int(t) for t in rng.integers(3, vocab, stream_prompt)], opts,
                              listener=listener_for(k)) for k in range(streams)]
        if not warmed.wait(60):
            raise RuntimeError("the streams did not start")
        submitted = time.perf_counter()
        long = svc.submit([int(t) for t in rng.integers(3, vocab, long_prompt)],
                          GenerateOptions(max_new_tokens=long_new, eos_token_id=None), listener=listener_for(streams))
        if not first_long.wait(120):
            raise RuntimeError("the long prompt got no token")
        for h in (*handles, long):
            h.result(120)
    first = times[streams][0]
    during, everything, counts = [], [], []
    for k in range(streams):
        t = np.array(times[k])
        gaps = np.diff(t)
        everything += list(gaps)
        overlap = (t[1:] > submitted) & (t[:-1] < first)  # gaps that overlap the long prompt's prefill
        during += list(gaps[overlap])
        counts.append(int(((t > submitted) & (t <= first)).sum()))
        if len(t) < stream_new:
            raise RuntimeError(f"stream {k} got {len(t)} of {stream_new} tokens")
    if first > max(ts[-1] for k, ts in times.items() if k < streams):
        raise RuntimeError("the streams ended before the long prompt's first token: raise --stream-new-tokens")
    return RoundResult(budget, rnd, long_prompt, 1e3 * max(during), 1e3 * float(np.median(during)),
                       1e3 * float(np.median(everything)), 1e3 * (first - submitted), int(np.median(counts)))


def medians(results: list[RoundResult]) -> list[dict]:
    out = []
    for budget in dict.fromkeys(r.budget for r in results):
        rs = [r for r in results if r.budget == budget]
        out.append({"budget": budget, "rounds": len(rs), "long_prompt": rs[0].long_prompt,
                    **{k: statistics.median(getattr(r, k) for r in rs)
                       for k in ("itl_max_ms", "itl_p50_ms", "itl_p50_all_ms", "long_ttft_ms", "stream_tokens")}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="skipdecode-prefill-bench", description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--budgets", default="0,64", help="comma-separated max_prefill_tokens settings; 0: no limit")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=4, help="running streamed requests")
    p.add_argument("--stream-prompt", type=int, default=8, help="prompt tokens of each stream")
    p.add_argument("--stream-new-tokens", type=int, default=160)
    p.add_argument("--warm", type=int, default=8, help="tokens each stream produces before the long prompt comes")
    p.add_argument("--long-prompt", type=int, help="default: max_length - long new tokens")
    p.add_argument("--long-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets or min(budgets) < 0:
        p.error(f"--budgets {args.budgets!r}: give one or more integers >= 0")
    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    configure_onnxruntime(args.threads)  # one pool for every graph, as `skipdecode serve` runs
    engine = Engine.load(args.engine, threads=args.threads)
    be = engine.backend
    long_prompt = args.long_prompt or be.max_length - args.long_new_tokens
    if args.streams + 1 > be.max_batch:
        p.error(f"--streams {args.streams} plus the long prompt need {args.streams + 1} KV slots; the engine has "
                f"{be.max_batch}")
    for name, prompt, new in (("long prompt", long_prompt, args.long_new_tokens),
                              ("stream", args.stream_prompt, args.stream_new_tokens)):
        if prompt < 1 or prompt + new > be.max_length:
            p.error(f"{name} of {prompt} tokens + {new} new tokens is outside 2..max_length {be.max_length}")
    results = []
    for rnd in range(-1, args.rounds):  # round -1 warms up and is not reported
        for budget in budgets:
            r = run_round(engine, budget, args.streams, args.stream_prompt, args.stream_new_tokens, args.warm,
                          long_prompt, args.long_new_tokens, args.seed, rnd)
            if rnd >= 0:
                results.append(r)
                print(f"  budget {budget or 'none'} round {rnd}: ITL max {r.itl_max_ms:.2f} ms, p50 "
                      f"{r.itl_p50_ms:.2f} ms; long prompt TTFT {r.long_ttft_ms:.1f} ms", file=sys.stderr)
    table = medians(results)
    print(f"engine {args.engine}: {be.num_layers} layers, {args.streams} streams of {args.stream_prompt}-token "
          f"prompts, a {long_prompt}-token prompt admitted among them; medians of {args.rounds} rounds")
    print("max_prefill_tokens  ITL max ms  ITL p50 ms  (whole run p50)  long prompt TTFT ms  stream tokens meanwhile")
    for row in table:
        print(f"{row['budget'] or 'none':<18}  {row['itl_max_ms']:10.2f}  {row['itl_p50_ms']:10.2f}  "
              f"{row['itl_p50_all_ms']:15.2f}  {row['long_ttft_ms']:19.1f}  {row['stream_tokens']:23g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None, "long_prompt": long_prompt},
                                         "medians": table, "rounds": [asdict(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
