"""`skipdecode serve`: the HTTP server (skipdecode/server.py) as a subcommand. Parser only at import time; the
server libraries are imported when the command runs.

Also runnable alone (`python -m skipdecode.serve_cli --engine DIR --port N`), which the soak benchmark uses to
measure the server in its own process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", required=True, help="engine directory (built by `skipdecode export`)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="name reported in responses (default: the engine directory's name)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, help="running sequences (default: the engine's KV slots)")
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 overloaded")
    g.add_argument("--max-tokens-in-flight", type=int,
                   help="KV columns reserved by running requests, prompt + max_tokens each (default: no limit)")
    g.add_argument("--max-prefill-tokens", type=int, help="prompt tokens admitted per step (default: no limit)")
    g.add_argument("--strategy", choices=("gate", "group"), default="gate",
                   help="gate: one call of the deepest row's graph, shallower rows gated; group: one call per bucket")
    g.add_argument("--max-timeout", type=float, default=600.0, help="largest per-request timeout in seconds")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on shutdown, seconds to finish in-flight requests before cancelling them")
    g = p.add_argument_group("runtime")
    g.add_argument("--max-length", type=int, help="positions per sequence (default: the engine's)")
    g.add_argument("--providers", default="CPUExecutionProvider")
    g.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    g.add_argument("--prepack", choices=("shared", "private", "off"),
                   help="weight pre-packing: shared (default), private (one packed copy per graph), off")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the content-hash check of the engine's files at load")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="HTTP server: OpenAI-style /v1/completions with continuous batching")
    add_serve_arguments(p)


def run_serve(args) -> int:
    """Load the engine, start the service and serve until SIGINT/SIGTERM; then drain and stop."""
    from pathlib import Path

    import uvicorn

    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_backend import use_global_thread_pool
    from skipdecode.runtime.service import Service, ServiceConfig
    from skipdecode.server import create_app
    use_global_thread_pool(args.threads)  # one pool for every bucket graph (no stall when the bucket changes)
    engine = Engine.load(args.engine, providers=args.providers.split(","), threads=args.threads,
                         max_length=args.max_length, prepack=args.prepack, verify=args.verify)
    service = Service(engine, ServiceConfig(max_batch=args.max_batch, max_tokens_in_flight=args.max_tokens_in_flight,
                                            max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens,
                                            strategy=args.strategy))
    app = create_app(engine, service, args.model_name or Path(args.engine).name, args.max_timeout,
                     args.drain_timeout)
    print(f"skipdecode serve: {args.engine} on http://{args.host}:{args.port} (buckets "
          f"{list(engine.backend.buckets)}, {engine.backend.max_batch} KV slots)", file=sys.stderr, flush=True)
    # uvicorn waits this long for open connections (streams) to finish before the app's shutdown drains the rest
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(args.drain_timeout))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from skipdecode.runtime.errors import SkipDecodeError

    parser = argparse.ArgumentParser(prog="skipdecode-serve", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except SkipDecodeError as exc:
        print(f"skipdecode serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
