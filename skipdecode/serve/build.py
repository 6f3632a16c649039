"""From a `ServeConfig` to a running server: `build_server` resolves and loads the engine, starts the
continuous-batching service and builds the app. `skipdecode serve` runs it under uvicorn (`run`); each Ray Serve
replica builds the very same server (skipdecode/serve/ray.py).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from skipdecode.serve.config import ServeConfig


@dataclass(frozen=True)
class Server:
    """A loaded engine, the service that batches requests on it, the ASGI app serving them and its handlers
    (`CompletionsApp`: its metrics, which a Ray replica sums with the other replicas')."""

    engine: object
    service: object
    app: object
    handlers: object


def build_server(config: ServeConfig) -> Server:
    """Resolve the engine (a directory, or an archive URI fetched and verified once per machine:
    skipdecode/serve/engine_source.py), load it, start its service and build the app."""
    from skipdecode.cli import default_kernel, report_kernel
    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.errors import InputError
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    from skipdecode.runtime.service import Service, ServiceConfig
    from skipdecode.serve.app import CompletionsApp
    from skipdecode.serve.engine_source import resolve_engine

    if config.engine is None:
        raise InputError("no engine: give an engine directory or an archive URI of one")
    where = resolve_engine(config.engine, config.engine_cache, config.manifest_sha256, config.verify)
    configure_onnxruntime(config.threads)  # one pool for every bucket graph (no stall when the bucket changes)
    engine = Engine.load(where.path, providers=config.providers.split(","), threads=config.threads,
                         max_length=config.max_length, prepack=config.prepack,
                         verify=config.verify and not where.verified, kernel=default_kernel(config.kernel))
    report_kernel(engine)
    service = Service(engine, ServiceConfig(
        max_batch=config.max_batch, max_tokens_in_flight=config.max_tokens_in_flight, max_queue=config.max_queue,
        max_prefill_tokens=config.max_prefill_tokens or None, strategy=config.strategy))
    handlers = CompletionsApp(engine, service, config)
    return Server(engine, service, handlers.starlette(), handlers)


def run(config: ServeConfig) -> int:
    """`skipdecode serve`: build the server and serve until SIGINT/SIGTERM; then drain and stop."""
    import uvicorn

    from skipdecode.serve.net import uvicorn_config, warn_if_exposed

    server = build_server(config)
    warn_if_exposed(config.host, config.api_key)
    be = server.engine.backend
    print(f"skipdecode serve: {config.engine} on http://{config.host}:{config.port} (buckets {list(be.buckets)}, "
          f"{be.max_batch} KV slots)", file=sys.stderr, flush=True)
    service = server.service

    class DrainingServer(uvicorn.Server):
        """On SIGINT/SIGTERM the service starts draining at once (in-flight requests finish; after drain_timeout
        the rest end as documented: 503 for a plain request, finish_reason "length" for a stream), while uvicorn
        waits for the connections. Its own cutoff comes later (GRACE_S), so it never cuts an answer the service is
        about to give: a cut would be a bare 500 or a reset."""

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                threading.Thread(target=service.shutdown, args=(False, config.drain_timeout),
                                 name="skipdecode-drain", daemon=True).start()
            super().handle_exit(sig, frame)

    try:
        DrainingServer(uvicorn_config(server.app, config, host=config.host, port=config.port,
                                      log_level=config.log_level,
                                      timeout_graceful_shutdown=int(config.drain_timeout + GRACE_S))).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once everything has drained
        return 130
    return 0


GRACE_S = 5  # uvicorn's cutoff after the service's drain timeout: time for the last answers to be written
