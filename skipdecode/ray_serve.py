"""Scale-out on Ray Serve: the `skipdecode serve` HTTP app on many replicas, across processes and machines.

    skipdecode serve --engine engines/tiny-opt-kjv --ray --replicas 2            # a local Ray instance
    skipdecode serve --engine https://host/tiny-opt-kjv.tar.gz --ray --address auto --min-replicas 1 --max-replicas 8
    serve run configs/ray_serve.yaml                                              # Ray's own CLI, same app

Each replica is one Ray actor (one process) that resolves the engine (a shared path, or an archive URI downloaded
once per machine and verified against its manifest: skipdecode/engine_source.py), loads it once, starts the
continuous-batching `Service` and serves the very app `skipdecode serve` serves (`create_app`: same routes, errors,
limits and metrics) through Ray Serve's ASGI ingress. Ray's HTTP proxy routes each request to a replica with
spare capacity; Ray restarts a replica that dies or fails its health check (the service's worker thread is gone).

Backpressure reaches the client as 503 with Retry-After from either layer: a replica whose own queue is full
answers it (`OverloadedError`), and Ray's proxy answers it when every replica holds `max_ongoing_requests` and
`max_queued_requests` more are waiting for one.

A replica that dies fails only the requests it was running. Ray's proxy then has no answer to relay: without help
a client would see a bare "Internal Server Error" or a stream cut off mid-body. `ReplicaLossMiddleware`, which
Ray loads into its proxies through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=skipdecode.ray_serve:proxy_middlewares`
(set for a local instance by `skipdecode serve --ray`; set it on `ray start` for a cluster), turns that into the
server's own error shapes: a JSON 502 before the response started, an SSE error event in a stream.

Ray is imported by this module only: the rest of the package works without it (`pip install -e .[ray]`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from skipdecode.engine_source import check_source, engine_name, is_archive_uri, normalize_source, resolve_engine
from skipdecode.runtime.errors import InputError, check_int
from skipdecode.runtime.manifest import load_manifest

APP_NAME = "skipdecode"
DEPLOYMENT_NAME = "SkipDecodeEngine"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "skipdecode.ray_serve:proxy_middlewares"
REPLICA_HEADER = "x-skipdecode-replica"  # the Ray actor name of the replica that answered (operations, tests)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # as skipdecode.server, without importing it on the driver


def _positive(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise InputError(f"{name}={value!r} must be a number > 0")


@dataclass(frozen=True)
class ReplicaSettings:
    """What one replica needs to build its engine, service and app: the `skipdecode serve` options of one
    process. Plain values only, since Ray pickles them to every replica."""

    engine: str  # engine directory (shared path) or archive URI (file://, http://, https://)
    model_name: str | None = None  # default: the engine's directory or archive name
    manifest_sha256: str | None = None  # pin the export an archive must contain
    cache_dir: str | None = None  # per-machine download cache (default: $SKIPDECODE_ENGINE_CACHE or ~/.cache/...)
    verify: bool = True
    threads: int | None = None  # onnxruntime intra-op threads (default: the replica's CPUs, at least 1)
    max_length: int | None = None
    prepack: str | None = None
    max_batch: int | None = None
    max_queue: int = 64
    max_tokens_in_flight: int | None = None
    max_prefill_tokens: int | None = None
    strategy: str = "gate"
    max_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    max_prompt_chars: int | None = None
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_source(self.engine)
        for name in ("threads", "max_length", "max_batch", "max_tokens_in_flight", "max_prefill_tokens",
                     "max_prompt_chars"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lo=1)
        check_int("max_queue", self.max_queue, lo=1)
        for name in ("max_timeout_s", "drain_timeout_s", "body_timeout_s"):
            _positive(name, getattr(self, name))
        if self.strategy not in ("gate", "group"):
            raise InputError(f"strategy={self.strategy!r} is not one of ['gate', 'group']")
        if self.prepack not in (None, "shared", "private", "off"):
            raise InputError(f"prepack={self.prepack!r} is not one of ['shared', 'private', 'off']")
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))


@dataclass(frozen=True)
class DeploymentSettings:
    """How many replicas and how much each takes: Ray Serve's deployment options for the engine."""

    replicas: int = 1  # fixed count; with autoscaling, the count it starts from
    min_replicas: int | None = None  # both bounds set: Ray's autoscaler keeps the count in [min, max]
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # autoscaling aims at this many requests per replica
    max_ongoing_requests: int = 64  # requests Ray sends one replica at once (its batch plus its queue)
    max_queued_requests: int = 256  # requests waiting in Ray for a replica; beyond: 503 with Retry-After
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica (its actor's num_cpus)
    retry_after_s: int = 1  # Retry-After on Ray's own 503s
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 35.0  # a stopping replica finishes its requests (drain_timeout_s) first

    def __post_init__(self) -> None:
        check_int("replicas", self.replicas, lo=1)
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InputError(f"min_replicas={self.min_replicas!r} and max_replicas={self.max_replicas!r}: give both "
                             "bounds for autoscaling, or neither for a fixed count")
        if self.autoscaling:
            check_int("min_replicas", self.min_replicas, lo=0)
            check_int("max_replicas", self.max_replicas, lo=max(1, self.min_replicas))
            if not self.min_replicas <= self.replicas <= self.max_replicas:
                raise InputError(f"replicas={self.replicas} (the initial count) must be within min_replicas="
                                 f"{self.min_replicas} and max_replicas={self.max_replicas}")
        check_int("max_ongoing_requests", self.max_ongoing_requests, lo=1)
        check_int("max_queued_requests", self.max_queued_requests, lo=1)
        check_int("retry_after_s", self.retry_after_s, lo=0)
        for name in ("target_ongoing_requests", "replica_cpus", "health_check_period_s",
                     "graceful_shutdown_timeout_s"):
            _positive(name, getattr(self, name))

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options`."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=self.retry_after_s),
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}
        if self.autoscaling:
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "initial_replicas": self.replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas
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


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SkipDecodeEngine:
    """One replica: the engine loaded once, its continuous-batching service, and `skipdecode serve`'s app."""

    def __init__(self, settings: ReplicaSettings, replica_cpus: float = 1.0) -> None:
        from skipdecode.runtime.engine import Engine
        from skipdecode.runtime.ort_backend import use_global_thread_pool
        from skipdecode.runtime.service import Service, ServiceConfig
        from skipdecode.server import create_app

        s = settings
        where = resolve_engine(s.engine, s.cache_dir, s.manifest_sha256, s.verify)
        threads = s.threads or max(1, int(replica_cpus))  # as many as Ray reserved: replicas share the cores
        use_global_thread_pool(threads)
        self.engine = Engine.load(where.path, threads=threads, max_length=s.max_length, prepack=s.prepack,
                                  verify=s.verify and not where.verified)
        self.service = Service(self.engine, ServiceConfig(
            max_batch=s.max_batch, max_tokens_in_flight=s.max_tokens_in_flight, max_queue=s.max_queue,
            max_prefill_tokens=s.max_prefill_tokens, strategy=s.strategy))
        app = create_app(self.engine, self.service, s.model_name or engine_name(s.engine), s.max_timeout_s,
                         s.drain_timeout_s, api_key=s.api_key, allowed_hosts=s.allowed_hosts,
                         max_prompt_chars=s.max_prompt_chars, body_timeout_s=s.body_timeout_s)
        self.app_with_header = ReplicaHeader(app, serve.get_replica_context().replica_id.to_full_id_str())

    def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ingress: the app is built in __init__, once the engine is loaded."""
        return self.app_with_header

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica. A service whose worker thread
        is gone would leave every request waiting, so that is the failure checked."""
        if not self.service.alive and not self.service.closing:
            raise RuntimeError("the continuous-batching worker thread of this replica has stopped")


def build_app(replica: ReplicaSettings, deployment: DeploymentSettings | None = None):
    """The Ray Serve application (deploy it with `serve.run`)."""
    deployment = deployment or DeploymentSettings()
    return SkipDecodeEngine.options(**deployment.options()).bind(replica, deployment.replica_cpus)


def app_builder(args: dict[str, Any]):
    """`serve run` entry point: `import_path: skipdecode.ray_serve:app_builder` with the fields of
    ReplicaSettings and DeploymentSettings as `args` (configs/ray_serve.yaml)."""
    replica_keys = {f.name for f in fields(ReplicaSettings)}
    deployment_keys = {f.name for f in fields(DeploymentSettings)}
    unknown = sorted(set(args) - replica_keys - deployment_keys)
    if unknown:
        raise InputError(f"unknown argument(s) {unknown} for skipdecode.ray_serve:app_builder; known: "
                         f"{sorted(replica_keys | deployment_keys)}")
    if "engine" not in args:
        raise InputError("app_builder needs `engine`: an engine directory every node mounts, or an archive URI")
    replica = {k: v for k, v in args.items() if k in replica_keys}
    check_source(replica["engine"])
    replica["engine"] = normalize_source(replica["engine"])  # replicas do not run in this directory
    if isinstance(replica.get("allowed_hosts"), str):  # "a,b" or "*" as on the command line
        names = [h.strip() for h in replica["allowed_hosts"].split(",") if h.strip()]
        replica["allowed_hosts"] = None if "*" in names else tuple(dict.fromkeys([*LOOPBACK_HOSTS, *names]))
    if replica.get("api_key") is None and os.environ.get("SKIPDECODE_API_KEY"):
        replica["api_key"] = os.environ["SKIPDECODE_API_KEY"]
    return build_app(ReplicaSettings(**replica),
                     DeploymentSettings(**{k: v for k, v in args.items() if k in deployment_keys}))


# -- Ray's HTTP proxy: a clear error when a replica dies under a request -----------------------------------------
def _error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


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
                body = json.dumps(_error_body(
                    "the replica serving this request stopped before answering (Ray Serve is replacing it); "
                    "retry the request", "replica_failed")).encode()
                await send({"type": "http.response.start", "status": 502,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif state["sse"]:
                event = _error_body("generation failed: the replica serving this stream stopped (Ray Serve is "
                                    "replacing it); retry the request", "replica_failed")
                await send({"type": "http.response.body", "more_body": False,
                            "body": f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()})
        except OSError:  # the client is gone as well: nothing to tell
            pass


def proxy_middlewares() -> list:
    """The callback Ray Serve's proxy imports from RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossMiddleware)]


# -- `skipdecode serve --ray` ---------------------------------------------------------------------------------------
def settings_from_args(args) -> tuple[ReplicaSettings, DeploymentSettings]:
    """The serve command's arguments as settings; a local engine path becomes absolute (replicas do not run in
    this directory)."""
    from skipdecode.serve_cli import allowed_hosts

    replica = ReplicaSettings(
        engine=normalize_source(args.engine), model_name=args.model_name or engine_name(args.engine),
        manifest_sha256=args.manifest_sha256, cache_dir=args.engine_cache, verify=args.verify,
        threads=args.threads, max_length=args.max_length, prepack=args.prepack, max_batch=args.max_batch,
        max_queue=args.max_queue, max_tokens_in_flight=args.max_tokens_in_flight,
        max_prefill_tokens=args.max_prefill_tokens, strategy=args.strategy, max_timeout_s=args.max_timeout,
        drain_timeout_s=args.drain_timeout, api_key=args.api_key or None,
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts), max_prompt_chars=args.max_prompt_chars,
        body_timeout_s=args.body_timeout)
    deployment = DeploymentSettings(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests, replica_cpus=args.replica_cpus,
        graceful_shutdown_timeout_s=args.drain_timeout + 5)
    return replica, deployment


def http_options(host: str, port: int, max_timeout_s: float, keep_alive_s: float) -> dict[str, Any]:
    """Ray Serve proxy options. The request timeout is a backstop above the app's own per-request limit, so a
    request can never wait at the proxy forever."""
    return {"host": host, "port": port, "request_timeout_s": max_timeout_s + 30, "keep_alive_timeout_s": keep_alive_s}


def deploy(replica: ReplicaSettings, deployment: DeploymentSettings, timeout_s: float = 300.0,
           name: str = APP_NAME, route_prefix: str = "/") -> None:
    """Deploy the app on the connected Ray cluster (Serve started) and wait until it runs; raise RuntimeError
    with Ray's message if it failed, TimeoutError if it is not running after `timeout_s` (replicas that cannot be
    scheduled: too few CPUs)."""
    serve.run_many([serve.RunTarget(build_app(replica, deployment), name=name, route_prefix=route_prefix)],
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


def check_local_capacity(deployment: DeploymentSettings, cpus: float) -> None:
    """On a local instance nothing adds machines: refuse a replica count that can never be scheduled."""
    need = (deployment.max_replicas if deployment.autoscaling else deployment.replicas) * deployment.replica_cpus
    if need > cpus:
        count = deployment.max_replicas if deployment.autoscaling else deployment.replicas
        raise InputError(f"{count} replicas x {deployment.replica_cpus:g} CPUs = {need:g} CPUs, above the "
                         f"{cpus:g} CPUs of this local Ray instance: lower --replicas/--max-replicas or "
                         "--replica-cpus, or join a cluster with --address")


def local_ray_environment(env) -> None:
    """Environment a local Ray instance's processes inherit (set before `ray.init` starts them): the proxy's
    middleware; no usage reporting (Ray's default today, pinned so a machine without network never tries); and
    30 s instead of 5 s for the proxy to report ready, since on a small, busy machine (2 cores, replicas loading)
    the controller otherwise kills a proxy that is merely slow to start (seen at a load of 4 on 2 cores)."""
    env.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args) -> int:
    """`skipdecode serve --ray`: start (or join, with --address) Ray, deploy, serve until SIGINT/SIGTERM, stop."""
    import ray

    replica, deployment = settings_from_args(args)
    local = args.address is None
    if local and not is_archive_uri(replica.engine):
        load_manifest(replica.engine)  # the replicas run here: a wrong path fails now, not in each replica
    stop = threading.Event()
    # A signal in the middle of ray.init would leave the processes it had started so far behind: hold signals
    # until it returns, then stop cleanly if one came. While deploying, a signal interrupts like Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if local:
            local_ray_environment(os.environ)
            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, logging_level="warning")
        else:
            try:
                ray.init(address=args.address, logging_level="warning")
            except (ConnectionError, RuntimeError) as exc:  # wrong address, or no / another auth token
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"could not join the Ray cluster at --address {args.address!r}: {first}. Check the "
                                 "address; with token authentication, set RAY_AUTH_MODE=token and the cluster's "
                                 "token (RAY_AUTH_TOKEN or ~/.ray/auth_token) here as on its nodes") from None
        if stop.is_set():
            return 1
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        if local:
            check_local_capacity(deployment, ray.cluster_resources().get("CPU", 0.0))
        serve.start(http_options=http_options(args.host, args.port, args.max_timeout, args.keep_alive_timeout))
        try:
            deploy(replica, deployment, timeout_s=args.ray_start_timeout)
        except (RuntimeError, TimeoutError) as exc:  # Ray's deployment failure, or replicas never ready
            print(f"skipdecode serve: error: {exc}", file=sys.stderr, flush=True)
            return 2
        for sig in (signal.SIGINT, signal.SIGTERM):  # from here on, a signal stops serving
            signal.signal(sig, lambda *_: stop.set())
        count = (f"{deployment.min_replicas}..{deployment.max_replicas} replicas (autoscaling)"
                 if deployment.autoscaling else f"{deployment.replicas} replica(s)")
        print(f"skipdecode serve --ray: {replica.engine} on http://{args.host}:{args.port} ({count}, "
              f"{deployment.replica_cpus:g} CPU each, Ray {'local' if local else args.address})",
              file=sys.stderr, flush=True)
        stop.wait()
    except KeyboardInterrupt:  # a signal while deploying: stop what was started, no traceback
        print("skipdecode serve: interrupted while deploying; stopping", file=sys.stderr, flush=True)
        return 130
    finally:
        try:
            if ray.is_initialized() and local:
                serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s), then the proxy and controller stop
            elif ray.is_initialized():
                serve.delete(APP_NAME)  # leave the cluster's Serve (and other applications) running
        finally:
            ray.shutdown()  # also stops what a local ray.init had started when it was interrupted
    return 0
