"""Scale-out on Ray Serve: the `skipdecode serve` HTTP app on many replicas, across processes and machines.

    skipdecode serve --engine engines/tiny-opt-kjv --ray --replicas 2            # a local Ray instance
    skipdecode serve --engine https://host/tiny-opt-kjv.tar.gz --ray --address auto --min-replicas 1 --max-replicas 8
    serve run configs/ray_serve.yaml                                              # Ray's own CLI, same app

Each replica is one Ray actor (one process) that builds the very server `skipdecode serve` builds, from the same
`ServeConfig` (`build_server`: the engine resolved from a shared path or an archive URI downloaded once per machine
and verified, loaded once, its continuous-batching `Service`, the app with the same routes, errors, limits and
metrics) and serves it through Ray Serve's ASGI ingress. Ray's HTTP proxy routes each request to a replica with
spare capacity; Ray restarts a replica that dies or fails its health check (the service's worker thread is gone).

Backpressure reaches the client as 503 with Retry-After from either layer: a replica whose own queue is full
answers it (`OverloadedError`), and Ray's proxy answers it when every replica holds `max_ongoing_requests` and
`max_queued_requests` more are waiting for one.

A replica that dies fails only the requests it was running. Ray's proxy then has no answer to relay: without help
a client would see a bare "Internal Server Error" or a stream cut off mid-body. `ReplicaLossMiddleware`, which
Ray loads into its proxies through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=skipdecode.serve.ray:proxy_middlewares`
(set for a local instance by `skipdecode serve --ray`; set it on `ray start` for a cluster), turns that into the
server's own error shapes: a JSON 502 before the response started, an SSE error event in a stream.

Ray is imported by this module only: the rest of the package works without it (`pip install -e .[ray]`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from skipdecode.runtime.errors import InputError, ReplicaFailedError
from skipdecode.runtime.manifest import load_manifest
from skipdecode.serve.config import ServeConfig
from skipdecode.serve.engine_source import is_archive_uri, normalize_source
from skipdecode.serve.metrics import merge
from skipdecode.serve.protocol import DONE, error_body, event

APP_NAME = "skipdecode"
DEPLOYMENT_NAME = "SkipDecodeEngine"
METRICS_DEPLOYMENT = "SkipDecodeMetrics"
# Replicas publish their metrics this often (and on every scrape they answer); a replica silent for STALE_AFTER_S
# (dead, or removed by autoscaling) drops out of the sum
PUBLISH_PERIOD_S = 2.0
STALE_AFTER_S = 3 * PUBLISH_PERIOD_S
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "skipdecode.serve.ray:proxy_middlewares"
RAY_METRICS_ENV = "RAY_enable_metrics_collection"  # "0": the node's metrics agent starts no Prometheus exporter
REPLICA_HEADER = "x-skipdecode-replica"  # the Ray actor name of the replica that answered (operations, tests)


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Keyword arguments of `Deployment.options`: how many replicas and how much each takes."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests, "max_queued_requests": config.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=config.retry_after),
        "ray_actor_options": {"num_cpus": config.replica_cpus},
        "health_check_period_s": config.health_check_period,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout}
    if config.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                      "initial_replicas": config.replicas,
                                      "target_ongoing_requests": config.target_ongoing_requests}
    else:
        opts["num_replicas"] = config.replicas
    return opts


class ReplicaHeader:
    """ASGI wrapper: names the answering replica in every HTTP response (`x-skipdecode-replica`), so an operator
    can tell which process served a request and a test can kill exactly the replica a stream runs on."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, send_named)


@serve.deployment(name=METRICS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class MetricsBoard:
    """The latest metrics snapshot of every engine replica (skipdecode/serve/metrics.py). Each replica publishes its
    own every PUBLISH_PERIOD_S and when it answers a scrape; the one answering `/metrics` renders the sum of all
    that are fresh, so a scrape through Ray's proxy describes the whole application, not whichever replica the
    proxy picked. A replica that stops publishing drops out after STALE_AFTER_S: its counts leave the sums, which
    Prometheus' rate() and increase() read as a counter reset."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, dict]] = {}

    def publish(self, replica: str, snapshot: dict) -> None:
        self.snapshots[replica] = (time.monotonic(), snapshot)

    def forget(self, replica: str) -> None:
        self.snapshots.pop(replica, None)

    def collect(self) -> list[dict]:
        now = time.monotonic()
        self.snapshots = {k: v for k, v in self.snapshots.items() if now - v[0] <= STALE_AFTER_S}
        return [snap for _, snap in self.snapshots.values()]


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SkipDecodeEngine:
    """One replica: the engine loaded once, its continuous-batching service, and `skipdecode serve`'s app."""

    def __init__(self, config: ServeConfig, board=None) -> None:
        from skipdecode.serve.build import build_server

        # onnxruntime threads: as many as Ray reserved for this replica (replicas share the machine's cores)
        server = build_server(dataclasses.replace(config, threads=config.threads or max(1, int(config.replica_cpus))))
        self.engine, self.service, self.handlers = server.engine, server.service, server.handlers
        self.name = serve.get_replica_context().replica_id.to_full_id_str()
        self.app_with_header = ReplicaHeader(server.app, self.name)
        self.board = board  # the MetricsBoard's handle (None: this replica's metrics alone)
        if board is not None:
            self.handlers.metrics_snapshot = self.application_snapshot
            self._stop_publishing = threading.Event()
            threading.Thread(target=self._publish_periodically, name="skipdecode-metrics", daemon=True).start()

    def _publish_periodically(self) -> None:
        while not self._stop_publishing.wait(PUBLISH_PERIOD_S):
            try:
                self.board.publish.remote(self.name, self.handlers.snapshot())
            except Exception:  # noqa: BLE001 - the board restarting: the next period publishes again
                pass

    async def application_snapshot(self) -> dict:
        """The sum of every live replica's metrics, this one's taken now."""
        await self.board.publish.remote(self.name, self.handlers.snapshot())
        return merge(await self.board.collect.remote())

    def __del__(self) -> None:
        """Ray Serve calls this when it stops the replica: its counts leave the sums now, not after STALE_AFTER_S."""
        if getattr(self, "board", None) is not None:
            self._stop_publishing.set()
            try:
                self.board.forget.remote(self.name)
            except Exception:  # noqa: BLE001 - the application is going away as a whole: nothing to forget
                pass

    def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ingress: the app is built in __init__, once the engine is loaded."""
        return self.app_with_header

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica. A service whose worker thread
        is gone would leave every request waiting, so that is the failure checked."""
        if not self.service.alive and not self.service.closing:
            raise RuntimeError("the continuous-batching worker thread of this replica has stopped")


def build_app(config: ServeConfig):
    """The Ray Serve application (deploy it with `serve.run`). A local engine path becomes absolute: replicas do
    not run in this directory."""
    config = dataclasses.replace(config, engine=normalize_source(config.engine))
    return SkipDecodeEngine.options(**deployment_options(config)).bind(config, MetricsBoard.bind())


def app_builder(args: dict[str, Any]):
    """`serve run` entry point: `import_path: skipdecode.serve.ray:app_builder` with `ServeConfig` fields as
    `args` (configs/ray_serve.yaml); the API key comes from $SKIPDECODE_API_KEY when `args` has none."""
    if "engine" not in args:
        raise InputError("app_builder needs `engine`: an engine directory every node mounts, or an archive URI")
    return build_app(ServeConfig.from_mapping(args, "skipdecode.serve.ray:app_builder"))


# -- Ray's HTTP proxy: a clear error when a replica dies under a request -----------------------------------------
class ReplicaLossMiddleware:
    """ASGI middleware for Ray Serve's HTTP proxy (see the module docstring). When the replica under a request
    dies, the proxy ends the request without an answer (before the response started) or without ending the body
    (mid-stream). This sends the client what `skipdecode serve` sends for a failed generation instead: a JSON 502
    naming the cause, or an SSE `error` event and the end of the stream, which clients raise as an error."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False, "sse": False}

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                state["sse"] = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        await self.app(scope, receive, watch)
        if state["ended"]:
            return
        try:
            if not state["started"]:
                failure = ReplicaFailedError("the replica serving this request stopped before answering (Ray Serve "
                                             "is replacing it); retry the request")
                body = json.dumps(error_body(failure)).encode()
                await send({"type": "http.response.start", "status": failure.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif state["sse"]:
                failure = ReplicaFailedError("generation failed: the replica serving this stream stopped (Ray Serve "
                                             "is replacing it); retry the request")
                await send({"type": "http.response.body", "more_body": False,
                            "body": (event(error_body(failure)) + DONE).encode()})
        except OSError:  # the client is gone as well: nothing to tell
            pass


class HealthDeadlineMiddleware:
    """ASGI middleware for Ray Serve's HTTP proxy: `/health` answers within `timeout_s`. With every replica dead or
    busy the proxy waits for one (~18 s measured before this) while a load balancer needs a prompt "no": if no
    replica has started the answer by the deadline, the request is cancelled and the client gets a JSON 503 with
    Retry-After, as a replica that is not ready answers."""

    def __init__(self, app, timeout_s: float) -> None:  # the serve option --health-timeout
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/health":
            return await self.app(scope, receive, send)
        started = asyncio.Event()

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, watch))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if started.is_set() or task.done():
            return await task
        task.cancel()
        body = json.dumps({"status": "unavailable", "detail": f"no replica answered within {self.timeout_s:g} s"})
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})


# -- Ray's HTTP proxy: the same connection limits as `skipdecode serve` ------------------------------------------------
# Ray's proxy runs its own uvicorn server with uvicorn's default protocol, which never closes a connection that
# stops in the middle of its request head. The proxy callback below (Ray calls it in each proxy process before that
# server starts) points uvicorn's "auto" protocol at `skipdecode serve`'s guarded one (serve/net.py): the header
# timeout and the per-client and global connection limits, with the values `skipdecode serve --ray` passes in
# $SKIPDECODE_PROXY_LIMITS (for a cluster: set it on `ray start`, see docs/scale-out.md; else the defaults).
PROXY_LIMITS_ENV = "SKIPDECODE_PROXY_LIMITS"
PROXY_LIMIT_FIELDS = ("header_timeout", "max_connections", "max_client_connections", "health_timeout")
GuardedProxyProtocol = None  # the guarded protocol class, set in a proxy process by `guard_proxy_connections`


def proxy_limits(config: ServeConfig) -> str:
    """The value of $SKIPDECODE_PROXY_LIMITS for `config`."""
    return json.dumps({k: getattr(config, k) for k in PROXY_LIMIT_FIELDS})


def proxy_config(raw: str | None) -> ServeConfig:
    """The proxy's limits from $SKIPDECODE_PROXY_LIMITS (validated as serve options are); defaults where unset."""
    try:
        values = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise InputError(f"${PROXY_LIMITS_ENV} is not JSON: {exc}") from None
    if not isinstance(values, dict) or set(values) - set(PROXY_LIMIT_FIELDS):
        raise InputError(f"${PROXY_LIMITS_ENV} must be an object with keys among {list(PROXY_LIMIT_FIELDS)}")
    return ServeConfig(**values)


def guard_proxy_connections(config: ServeConfig) -> type:
    """In Ray's proxy process: make the guarded protocol of `config` uvicorn's default ("auto") HTTP protocol."""
    import uvicorn.config

    from skipdecode.serve.net import guarded_protocol

    global GuardedProxyProtocol
    GuardedProxyProtocol = guarded_protocol(config)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedProxyProtocol"
    return GuardedProxyProtocol


def proxy_middlewares() -> list:
    """The callback Ray Serve's proxy imports from RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: the connection guard,
    the health deadline and the replica-loss answers."""
    from starlette.middleware import Middleware

    config = proxy_config(os.environ.get(PROXY_LIMITS_ENV))
    guard_proxy_connections(config)
    return [Middleware(ReplicaLossMiddleware), Middleware(HealthDeadlineMiddleware, timeout_s=config.health_timeout)]


# -- `skipdecode serve --ray` ---------------------------------------------------------------------------------------
def http_options(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve proxy options. The request timeout is a backstop above the app's own per-request limit, so a
    request can never wait at the proxy forever."""
    return {"host": config.host, "port": config.port, "request_timeout_s": config.max_timeout + 30,
            "keep_alive_timeout_s": config.keep_alive_timeout}


def deploy(config: ServeConfig, timeout_s: float = 300.0, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """Deploy the app on the connected Ray cluster (Serve started) and wait until it runs; raise RuntimeError
    with Ray's message if it failed, TimeoutError if it is not running after `timeout_s` (replicas that cannot be
    scheduled: too few CPUs)."""
    serve.run_many([serve.RunTarget(build_app(config), name=name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_running(name, timeout_s)


def wait_running(name: str = APP_NAME, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None:
            last = app
            if app.status == "RUNNING":
                return
            if app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploying {name!r} failed: {app.message}")
        time.sleep(0.25)
    detail = "" if last is None else f" (status {last.status}: {last.message or 'no message'})"
    raise TimeoutError(f"application {name!r} is not running after {timeout_s:g} s{detail}")


def check_local_capacity(config: ServeConfig, cpus: float) -> None:
    """On a local instance nothing adds machines: refuse a replica count that can never be scheduled."""
    count = config.max_replicas if config.autoscaling else config.replicas
    need = count * config.replica_cpus
    if need > cpus:
        raise InputError(f"{count} replicas x {config.replica_cpus:g} CPUs = {need:g} CPUs, above the "
                         f"{cpus:g} CPUs of this local Ray instance: lower --replicas/--max-replicas or "
                         "--replica-cpus, or join a cluster with --address")


def local_ray_environment(env, config: ServeConfig | None = None) -> None:
    """Environment a local Ray instance's processes inherit (set before `ray.init` starts them): the proxy's
    middleware and connection limits (`config`'s); Ray's own Prometheus exporter off unless `--ray-metrics` (Ray
    binds it to every interface, without authentication, and turns a loopback node address into a reachable one,
    so it cannot follow `--host`); no usage reporting (Ray's default today, pinned so a machine
    without network never tries); and 30 s instead of 5 s for the proxy to report ready, since on a small, busy
    machine (2 cores, replicas loading) the controller otherwise kills a proxy that is merely slow to start (seen
    at a load of 4 on 2 cores)."""
    env.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    if config is not None:
        env[PROXY_LIMITS_ENV] = proxy_limits(config)
        if not config.ray_metrics:  # Ray cannot bind its metrics exporter to loopback: no exporter at all
            env.setdefault(RAY_METRICS_ENV, "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(config: ServeConfig) -> int:
    """`skipdecode serve --ray`: start (or join, with --address) Ray, deploy, serve until SIGINT/SIGTERM, stop."""
    import ray

    config = dataclasses.replace(config, engine=normalize_source(config.engine))
    local = config.address is None
    if local and not is_archive_uri(config.engine):
        load_manifest(config.engine)  # the replicas run here: a wrong path fails now, not in each replica
    stop = threading.Event()
    # A signal in the middle of ray.init would leave the processes it had started so far behind: hold signals
    # until it returns, then stop cleanly if one came. While deploying, a signal interrupts like Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if local:
            local_ray_environment(os.environ, config)
            ray.init(address="local", num_cpus=config.ray_cpus, include_dashboard=False, logging_level="warning")
        else:
            try:
                ray.init(address=config.address, logging_level="warning")
            except (ConnectionError, RuntimeError) as exc:  # wrong address, or no / another auth token
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"could not join the Ray cluster at --address {config.address!r}: {first}. Check the "
                                 "address; with token authentication, set RAY_AUTH_MODE=token and the cluster's "
                                 "token (RAY_AUTH_TOKEN or ~/.ray/auth_token) here as on its nodes") from None
        if stop.is_set():
            return 1
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        if local:
            check_local_capacity(config, ray.cluster_resources().get("CPU", 0.0))
        serve.start(http_options=http_options(config))
        try:
            deploy(config, timeout_s=config.ray_start_timeout)
        except (RuntimeError, TimeoutError) as exc:  # Ray's deployment failure, or replicas never ready
            print(f"skipdecode serve: error: {exc}", file=sys.stderr, flush=True)
            return 2
        for sig in (signal.SIGINT, signal.SIGTERM):  # from here on, a signal stops serving
            signal.signal(sig, lambda *_: stop.set())
        count = (f"{config.min_replicas}..{config.max_replicas} replicas (autoscaling)"
                 if config.autoscaling else f"{config.replicas} replica(s)")
        print(f"skipdecode serve --ray: {config.engine} on http://{config.host}:{config.port} ({count}, "
              f"{config.replica_cpus:g} CPU each, Ray {'local' if local else config.address})",
              file=sys.stderr, flush=True)
        stop.wait()
    except KeyboardInterrupt:  # a signal while deploying: stop what was started, no traceback
        print("skipdecode serve: interrupted while deploying; stopping", file=sys.stderr, flush=True)
        return 130
    finally:
        try:
            if ray.is_initialized():
                # drain through the proxy: deleting the application stops new requests and lets the replicas
                # finish the ones in flight (graceful_shutdown_timeout_s) while the proxy still carries their
                # responses; serve.shutdown() alone stops the proxy first and every in-flight response is lost
                serve.delete(APP_NAME)
                if local:
                    serve.shutdown()  # then the proxy and controller (a cluster's Serve keeps running)
        finally:
            ray.shutdown()  # also stops what a local ray.init had started when it was interrupted
    return 0
