"""Scale-out benchmark: HTTP throughput of `skipdecode serve` alone vs on Ray Serve with 1 and 2 replicas.

    python -m skipdecode.bench.ray_bench --engine engines/tiny-opt-kjv --replicas 1,2 --requests 192 --clients 32

Each configuration serves the same engine on this machine and gets the same closed-loop load: `clients` loopback
clients each send one non-streamed request at a time (random token-id prompts, `max_tokens` new tokens, EOS
ignored, so every request does the same work) until `requests` are done, after a warm-up, `repeats` times.
Reported (medians over the repeats): completion tokens/s, and median and p95 latency. The cores are split, not
added: `serve` runs one process with every core's threads; N replicas get cores/N CPUs (and threads) each, so the
comparison is how the same machine is best used, and the Ray rows include the cost of its proxy. The client runs
on the same cores.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from skipdecode.cliargs import ints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy within {timeout_s:g} s")


async def load(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    """Closed loop: `clients` workers share the prompts -> (seconds, latencies, completion tokens)."""
    import httpx
    todo = list(enumerate(prompts))
    latencies, tokens = [], 0

    async def worker(client):
        nonlocal tokens
        while todo:
            _, prompt = todo.pop()
            t = time.perf_counter()
            r = await client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                                 "ignore_eos": True})
            if r.status_code != 200:
                raise SystemExit(f"request failed: {r.status_code} {r.text[:200]}")
            latencies.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[worker(client) for _ in range(clients)]), 3600)
        return time.perf_counter() - t0, latencies, tokens


def measure(name: str, url: str, args, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, vocab, int(rng.integers(*args.prompt_lengths)))]
               for _ in range(args.requests + args.clients)]
    asyncio.run(load(url, prompts[: args.clients], args.clients, args.max_tokens))  # warm-up: sessions, routes
    runs = []
    for _ in range(args.repeats):
        seconds, lat, tokens = asyncio.run(load(url, prompts[args.clients:], args.clients, args.max_tokens))
        runs.append({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "p50_latency_s": float(np.median(lat)), "p95_latency_s": float(np.percentile(lat, 95))})
    row = {"config": name, "requests": args.requests, "repeats": args.repeats,
           **{k: float(np.median([r[k] for r in runs])) for k in runs[0]}, "runs": runs}
    each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
    print(f"{name:<28} {row['tokens_per_s']:>8.1f} tokens/s  p50 {row['p50_latency_s']:.3f} s  "
          f"p95 {row['p95_latency_s']:.3f} s  (median of {args.repeats}: {each})", flush=True)
    return row


def bench_plain(args, vocab: int, cores: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skipdecode.serve_cli", "--engine", args.engine, "--port",
                             str(port), "--threads", str(cores), "--max-queue", "1024"])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 120)
        return measure(f"serve (1 process, {cores} thr)", f"http://127.0.0.1:{port}", args, vocab)
    finally:
        proc.terminate()
        proc.wait(60)


def bench_ray(args, replicas: int, vocab: int, cores: int) -> dict:
    import ray
    from ray import serve

    from skipdecode.serve import ray as ray_serve
    from skipdecode.serve.config import ServeConfig
    local_cpus = max(cores, replicas)
    per_replica = max(cores // replicas, 1)
    ray_serve.local_ray_environment(os.environ)
    ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, log_to_driver=False,
             logging_level="error")
    try:
        port = free_port()
        config = ServeConfig(engine=args.engine, port=port, threads=per_replica, max_queue=1024, replicas=replicas,
                             replica_cpus=per_replica, max_ongoing_requests=1024, max_queued_requests=4096)
        serve.start(http_options=ray_serve.http_options(config))
        ray_serve.deploy(config, timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 60)
        return measure(f"ray {replicas} replica(s) x {per_replica} thr", url, args, vocab)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--replicas", type=ints, default=(1, 2), help="replica counts to measure (default 1,2)")
    p.add_argument("--requests", type=int, default=192, help="timed requests per configuration")
    p.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; medians are reported")
    p.add_argument("--prompt-lengths", type=ints, default=(8, 64), help="LO,HI: prompt lengths in [LO, HI)")
    p.add_argument("--no-plain", action="store_true", help="skip the single-process `skipdecode serve` row")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    from skipdecode.runtime.manifest import load_manifest
    vocab = load_manifest(args.engine).model.vocab_size
    cores = os.cpu_count() or 1
    rows = [] if args.no_plain else [bench_plain(args, vocab, cores)]
    rows += [bench_ray(args, n, vocab, cores) for n in args.replicas]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
