"""Soak benchmark: run `skipdecode serve` in its own process under steady mixed load and record its memory.

    python -m skipdecode.bench.serve_soak --engine engines/tiny-opt-kjv --duration 600 --clients 32 --json soak.json

The server runs as a subprocess (its resident memory is read from /proc, so Linux only). `clients` loops each
send one request at a time: mixed prompt lengths and max_tokens, half streamed, some cancelled mid-stream, some
with SkipDecode speedups. Every `interval` seconds a sample records the server's RSS and its /metrics counters.
At the end the server gets SIGTERM and must exit cleanly (graceful shutdown). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        raise SystemExit(f"cannot read {status}: the soak benchmark reads memory from /proc (Linux only)")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"{status} has no VmRSS line")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client_loop(client, url: str, rng: random.Random, vocab: int, stop_at: float, counts: dict) -> None:
    while time.monotonic() < stop_at:
        body = {"prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 48))],
                "max_tokens": rng.randint(1, 64), "stream": rng.random() < 0.5}
        if rng.random() < 0.6:
            body["speedup"] = rng.choice([2.0, 3.0])
        cancel_after = rng.randint(1, 8) if body["stream"] and rng.random() < 0.2 else None
        try:
            if not body["stream"]:
                r = await client.post(url, json=body)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                continue
            async with client.stream("POST", url, json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: {")
                    if cancel_after is not None and n >= cancel_after:
                        counts["cancelled"] = counts.get("cancelled", 0) + 1
                        break
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
        except Exception as exc:  # recorded and reported: a soak run counts failures instead of stopping
            key = f"error: {type(exc).__name__}"
            counts[key] = counts.get(key, 0) + 1


def scrape(base: str) -> dict[str, float]:
    import httpx
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("skipdecode_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def soak(base: str, pid: int, args, vocab: int) -> tuple[list[dict], dict]:
    import httpx
    stop_at = time.monotonic() + args.duration
    counts: dict = {}
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        loops = [asyncio.create_task(client_loop(client, base + "/v1/completions", random.Random(args.seed + i),
                                                 vocab, stop_at, counts)) for i in range(args.clients)]
        samples, t0 = [], time.monotonic()
        while time.monotonic() < stop_at:
            m = await asyncio.to_thread(scrape, base)
            samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": round(rss_mib(pid), 1),
                            "tokens": m.get("skipdecode_generated_tokens_total", 0.0),
                            "requests": m.get("skipdecode_requests_submitted_total", 0.0),
                            "tokens_per_s": m.get("skipdecode_tokens_per_second", 0.0),
                            "queue_depth": m.get("skipdecode_queue_depth", 0.0),
                            "running": m.get("skipdecode_running_requests", 0.0)})
            print("  " + "  ".join(f"{k} {v:g}" for k, v in samples[-1].items()), file=sys.stderr, flush=True)
            await asyncio.sleep(min(args.interval, max(stop_at - time.monotonic(), 0.01)))
        await asyncio.gather(*loops)
    return samples, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="skipdecode-serve-soak", description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from skipdecode.runtime.manifest import load_manifest
    vocab = load_manifest(args.engine).model.vocab_size
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "skipdecode.serve_cli", "--engine", str(args.engine),
                               "--port", str(port), "--max-queue", str(4 * args.clients)],
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(base, server)
        samples, counts = asyncio.run(soak(base, server.pid, args, vocab))
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=120)
    print(log, file=sys.stderr, end="")
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit if the app said it stopped
    clean = server.returncode in (0, -signal.SIGTERM) and "skipdecode serve: stopped" in log
    return _report(args, samples, counts, server.returncode, clean)


def _wait_healthy(base: str, server: subprocess.Popen) -> None:
    import httpx
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before becoming healthy")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy within 120 s")


def _report(args, samples: list[dict], counts: dict, code: int, clean: bool) -> int:
    warm = [s for s in samples if s["t_s"] >= min(60.0, args.duration / 5)] or samples
    rss = [s["rss_mib"] for s in warm]
    minutes = max((warm[-1]["t_s"] - warm[0]["t_s"]) / 60, 1e-9)
    summary = {"rss_after_warmup_mib": rss[0], "rss_end_mib": rss[-1], "rss_max_mib": max(rss),
               "rss_slope_mib_per_min": (rss[-1] - rss[0]) / minutes, "responses": counts,
               "server_exit_code": code, "graceful_shutdown": clean, "tokens": samples[-1]["tokens"] if samples else 0}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()},
                                         "summary": summary, "samples": samples}, indent=1))
    errors = sum(v for k, v in counts.items() if isinstance(k, str) and k.startswith("error"))
    return 0 if clean and not errors else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
