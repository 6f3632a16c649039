"""`skipdecode serve`: the HTTP server (skipdecode/server.py) as a subcommand. Parser only at import time; the
server libraries are imported when the command runs.

Also runnable alone (`python -m skipdecode.serve_cli --engine DIR --port N`), which the soak benchmark uses to
measure the server in its own process.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence

API_KEY_ENV = "SKIPDECODE_API_KEY"
ANY_ADDRESS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: str) -> tuple[str, ...] | None:
    """Host header names accepted: localhost, the bind address (unless it is a wildcard) and `extra`; None (any)
    when `extra` holds '*'."""
    from skipdecode.server import LOOPBACK_HOSTS

    names = [h.strip() for h in extra.split(",") if h.strip()]
    if "*" in names:
        return None
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *([bind] if bind not in ANY_ADDRESS else []), *names]))


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if api_key or is_loopback(host):
        return
    bar = "!" * 100
    print(f"{bar}\nskipdecode serve: WARNING: listening on {host}, beyond this machine, WITHOUT an API key: anyone who "
          f"can reach the port can use it.\nSet --api-key or ${API_KEY_ENV}.\n{bar}", file=sys.stderr, flush=True)


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
    g = p.add_argument_group("access and limits")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    g.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host header names accepted besides localhost and the bind address "
                        "(DNS-rebinding guard; '*' accepts any)")
    g.add_argument("--max-prompt-chars", type=int,
                   help="longest text prompt before tokenizing (default: 32 per model position)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request head to arrive (after connect or the first byte of a request)")
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request body to arrive (408)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle kept-alive connection stays open")
    g.add_argument("--max-connections", type=int, default=512,
                   help="open connections; one beyond it is closed at once")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_ray_arguments(p)


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """Scale-out (skipdecode/ray_serve.py): the same app on Ray Serve replicas; --engine may then be an archive URI."""
    g = p.add_argument_group("scale-out on Ray Serve (pip install -e .[ray]; --header-timeout and "
                             "--max-connections do not apply: Ray's proxy serves HTTP)")
    g.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: one engine per replica, Ray's HTTP proxy in front; --engine may be a "
                        "file://, http:// or https:// URI of a tar archive of the engine, downloaded once per machine")
    g.add_argument("--replicas", type=int, default=1, help="replicas (with autoscaling: the initial count)")
    g.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT of a `ray start --head`) instead of "
                                     "starting a local Ray instance")
    g.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    g.add_argument("--max-replicas", type=int, help="autoscaling upper bound (with --min-replicas)")
    g.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="autoscaling target: requests in flight per replica")
    g.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests Ray sends one replica at once (its batch plus its queue)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting in Ray for a free replica before 503 with Retry-After")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per replica; also its default --threads")
    g.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray instance (default: every core)")
    g.add_argument("--engine-cache", help="per-machine directory archive URIs are unpacked into "
                                          "(default: $SKIPDECODE_ENGINE_CACHE or ~/.cache/skipdecode/engines)")
    g.add_argument("--manifest-sha256", help="sha256 of the engine's manifest.json: replicas refuse any other export")
    g.add_argument("--ray-start-timeout", type=float, default=300.0,
                   help="seconds for every replica to load its engine and report healthy")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="HTTP server: OpenAI-style /v1/completions with continuous batching")
    add_serve_arguments(p)


def run_serve(args) -> int:
    """Load the engine, start the service and serve until SIGINT/SIGTERM; then drain and stop. With --ray: the
    same app on Ray Serve replicas (skipdecode/ray_serve.py)."""
    if getattr(args, "ray", False):
        return run_ray(args)
    from pathlib import Path

    import uvicorn

    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_backend import use_global_thread_pool
    from skipdecode.runtime.service import Service, ServiceConfig
    from skipdecode.server import create_app
    from skipdecode.server_net import ConnectionLimits, uvicorn_config
    net = ConnectionLimits(args.header_timeout, args.keep_alive_timeout, args.max_connections)
    use_global_thread_pool(args.threads)  # one pool for every bucket graph (no stall when the bucket changes)
    engine = Engine.load(args.engine, providers=args.providers.split(","), threads=args.threads,
                         max_length=args.max_length, prepack=args.prepack, verify=args.verify)
    service = Service(engine, ServiceConfig(max_batch=args.max_batch, max_tokens_in_flight=args.max_tokens_in_flight,
                                            max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens,
                                            strategy=args.strategy))
    hosts = allowed_hosts(args.host, args.allowed_hosts)
    app = create_app(engine, service, args.model_name or Path(args.engine).name, args.max_timeout,
                     args.drain_timeout, api_key=args.api_key or None, allowed_hosts=hosts,
                     max_prompt_chars=args.max_prompt_chars, body_timeout_s=args.body_timeout)
    warn_if_exposed(args.host, args.api_key)
    print(f"skipdecode serve: {args.engine} on http://{args.host}:{args.port} (buckets "
          f"{list(engine.backend.buckets)}, {engine.backend.max_batch} KV slots)", file=sys.stderr, flush=True)
    # uvicorn waits this long for open connections (streams) to finish before the app's shutdown drains the rest
    uvicorn.Server(uvicorn_config(app, net, host=args.host, port=args.port, log_level=args.log_level,
                                  timeout_graceful_shutdown=int(args.drain_timeout))).run()
    return 0


def run_ray(args) -> int:
    from skipdecode.runtime.errors import InputError
    try:
        from skipdecode import ray_serve
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Serve ({exc}): pip install -e '.[ray]'") from None
    warn_if_exposed(args.host, args.api_key)
    return ray_serve.run(args)


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
