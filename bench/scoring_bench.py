"""Prompt scoring under load: an ordinary request's time to first token while long prompts are scored.

    python -m skipdecode.bench.scoring_bench --engine engines/tiny-opt-kjv --scorers 8 --rounds 5

One engine, one `Service`, as `skipdecode serve` runs it. Per round, in turn:
* idle: one ordinary request (a short prompt, greedy, full depth) on an otherwise idle service;
* chunk: one scoring job of SCORE_CHUNK + 1 tokens alone (the cost of one scoring chunk, with its admission);
* loaded: `--scorers` scoring jobs of `--score-prompt` tokens with their top `--logprobs` (what `echo: true,
  logprobs: k, max_tokens: 0` asks for) are submitted, then, once the first of them has started, the same
  ordinary request.
Reported, medians over rounds: the three times and the loaded time to first token against the bound
`2 x idle + one chunk`: scoring is ordinary work that shares steps with decoding, so a request that arrives behind
eight long scoring jobs waits for at most the chunk in progress, not for the jobs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from skipdecode.runtime.logprobs import SCORE_CHUNK
from skipdecode.runtime.request import GenerateOptions, TokenEvent
from skipdecode.runtime.service import Service, ServiceConfig


def _ttft_ms(svc: Service, prompt: list[int], new_tokens: int) -> float:
    first = threading.Event()
    stamp: list[float] = []

    def on_event(ev) -> None:  # the worker thread: record and return at once
        if isinstance(ev, TokenEvent) and not stamp:
            stamp.append(time.perf_counter())
            first.set()

    start = time.perf_counter()
    handle = svc.submit(prompt, GenerateOptions(max_new_tokens=new_tokens, eos_token_id=None), listener=on_event)
    if not first.wait(120):
        raise RuntimeError("the ordinary request got no token in 120 s")
    handle.result(120)
    return 1e3 * (stamp[0] - start)


def run_round(svc: Service, rng, vocab: int, args) -> dict:
    prompt = [int(t) for t in rng.integers(3, vocab, args.prompt)]
    idle = _ttft_ms(svc, prompt, args.new_tokens)
    start = time.perf_counter()
    svc.score([int(t) for t in rng.integers(3, vocab, SCORE_CHUNK + 1)], args.logprobs).result(120)
    chunk = 1e3 * (time.perf_counter() - start)
    jobs = [svc.score([int(t) for t in rng.integers(3, vocab, args.score_prompt)], args.logprobs)
            for _ in range(args.scorers)]
    deadline = time.monotonic() + 30
    while svc.stats().running == 0 and time.monotonic() < deadline:  # the first scoring job holds a slot
        time.sleep(0.001)
    loaded = _ttft_ms(svc, prompt, args.new_tokens)
    pending = sum(not j.done() for j in jobs)
    for j in jobs:
        if len(j.result(300)) != args.score_prompt - 1:
            raise RuntimeError("a scoring job returned the wrong number of log-probabilities")
    return {"idle_ttft_ms": idle, "chunk_ms": chunk, "loaded_ttft_ms": loaded, "scoring_jobs_pending": pending}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="skipdecode-scoring-bench", description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--scorers", type=int, default=8, help="concurrent scoring jobs")
    p.add_argument("--score-prompt", type=int, default=255, help="tokens of each scored prompt")
    p.add_argument("--logprobs", type=int, default=5, help="top-k alternatives per scored position")
    p.add_argument("--prompt", type=int, default=8, help="tokens of the ordinary request's prompt")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    configure_onnxruntime(args.threads)
    engine = Engine.load(args.engine, threads=args.threads)
    be = engine.backend
    if not 2 <= args.score_prompt < be.max_length:
        p.error(f"--score-prompt {args.score_prompt} is outside 2..{be.max_length - 1} (the engine's positions - 1)")
    if args.prompt < 1 or args.prompt + args.new_tokens > be.max_length:
        p.error(f"--prompt {args.prompt} + --new-tokens {args.new_tokens} is outside 2..{be.max_length}")
    rng = np.random.default_rng(args.seed)
    rounds = []
    with Service(engine, ServiceConfig(max_queue=max(64, args.scorers + 1))) as svc:
        for rnd in range(-1, args.rounds):  # round -1 warms up and is not reported
            r = run_round(svc, rng, engine.vocab_size, args)
            if rnd >= 0:
                rounds.append(r)
                print(f"  round {rnd}: idle {r['idle_ttft_ms']:.1f} ms, chunk {r['chunk_ms']:.1f} ms, loaded "
                      f"{r['loaded_ttft_ms']:.1f} ms ({r['scoring_jobs_pending']} jobs still scoring)", file=sys.stderr)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("idle_ttft_ms", "chunk_ms", "loaded_ttft_ms")}
    bound = 2 * med["idle_ttft_ms"] + med["chunk_ms"]
    print(f"engine {args.engine}: {args.scorers} scoring jobs of {args.score_prompt} tokens (top {args.logprobs}); "
          f"an ordinary {args.prompt}-token request; medians of {args.rounds} rounds")
    print(f"time to first token: idle {med['idle_ttft_ms']:.1f} ms, while scoring {med['loaded_ttft_ms']:.1f} ms "
          f"({med['loaded_ttft_ms'] / med['idle_ttft_ms']:.2f}x idle); one scoring chunk {med['chunk_ms']:.1f} ms; "
          f"bound 2 x idle + chunk = {bound:.1f} ms: {'met' if med['loaded_ttft_ms'] <= bound else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None}, "medians": med, "bound_ms": bound,
                                         "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
