"""Scale-out on Ray Serve (skipdecode/serve/ray.py) and engine distribution (skipdecode/serve/engine_source.py).

Without a cluster: engine sources (shared path, archive over file:// and loopback http, fetched once per cache
under concurrent replicas, verified, pinned), settings validation, the proxy middleware's error shapes.
With one local Ray instance for the module (2 replicas of a tiny engine, 4 logical CPUs on a 2-core machine): 40
concurrent requests, plain and streamed, mixed speedups, each equal to a solo `engine.generate`; backpressure as
503 with Retry-After from both the replica and Ray's proxy; a replica killed under load fails only its own
requests, with a clear error, and comes back; shutdown leaves no process behind. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

for _module in ("httpx", "starlette", "uvicorn", "prometheus_client"):  # the `serve` extra
    pytest.importorskip(_module, reason="the HTTP server needs the serve extra: pip install -e .[serve]")
pytest.importorskip("ray.serve", reason="Ray Serve tests need the ray extra: pip install -e .[ray]")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from skipdecode.runtime.engine import Engine  # noqa: E402
from skipdecode.runtime.errors import InputError  # noqa: E402

from skipdecode.serve import ray as ray_serve  # noqa: E402
from skipdecode.serve.config import ServeConfig  # noqa: E402
from skipdecode.serve.metrics import LATENCY_BUCKETS, merge, render  # noqa: E402
from skipdecode.serve.protocol import ServerLimits, parse_completion  # noqa: E402

from .serving_fakes import mixed_bodies  # noqa: E402

pytestmark = pytest.mark.timeout(180)
HEADER_TIMEOUT = 2.0  # the local instance's proxy closes a request head not complete by then




# -- settings and the proxy middleware (no Ray cluster) ----------------------------------------------------------
def metric_values(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def snapshot(**service) -> dict:
    base = {"submitted": 0, "rejected_overloaded": 0, "finished": {}, "generated_tokens": 0, "layers_executed": 0,
            "decode_steps": 0, "decoded_rows": 0, "graph_row_layers": 0, "queue_depth": 0, "running": 0,
            "last_batch_size": 0, "tokens_per_s": 0.0, "draft_tokens": 0, "accepted_draft_tokens": 0,
            "prefill_tokens": 0}
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[service.pop("latency_bucket", 0)] = service.get("submitted", 0)
    return {"service": base | service, "invalid": 1, "gone": 0, "latency_counts": counts,
            "latency_sum": 0.04 * service.get("submitted", 0), "replicas": 1}


def test_merged_metrics_are_sums_and_ratios_of_sums():
    a = snapshot(submitted=10, finished={"length": 9, "stop": 1}, generated_tokens=100, layers_executed=1200,
                 decode_steps=10, decoded_rows=10, draft_tokens=40, accepted_draft_tokens=30, queue_depth=2)
    b = snapshot(submitted=30, finished={"length": 30}, generated_tokens=300, layers_executed=1200,
                 decode_steps=10, decoded_rows=70, draft_tokens=0, queue_depth=1, latency_bucket=3)
    m = metric_values(render(merge([a, b]))[0].decode())
    assert m[("skipdecode_requests_submitted_total", ())] == 40
    assert m[("skipdecode_requests_finished_total", (("outcome", "length"),))] == 39
    assert m[("skipdecode_requests_finished_total", (("outcome", "stop"),))] == 1
    assert m[("skipdecode_requests_invalid_total", ())] == 2 and m[("skipdecode_replicas", ())] == 2
    assert m[("skipdecode_queue_depth", ())] == 3
    # ratios of the sums, not means of the replicas' ratios (those would be 4.0, 6.0 and 0.375)
    assert m[("skipdecode_mean_batch_size", ())] == 4.0
    assert m[("skipdecode_mean_layers_per_token", ())] == 6.0
    assert m[("skipdecode_draft_acceptance_rate", ())] == 0.75
    assert m[("skipdecode_request_seconds_count", ())] == 40
    assert m[("skipdecode_request_seconds_bucket", (("le", "0.05"),))] == 10  # a's 10 in the first bucket
    assert m[("skipdecode_request_seconds_bucket", (("le", "0.5"),))] == 40  # b's 30 in the fourth



def test_settings_name_the_bad_value_and_the_limit(tiny_engine):
    engine = str(tiny_engine)
    with pytest.raises(InputError, match="replicas=0 is below the minimum 1"):
        ServeConfig(engine=engine, replicas=0)
    with pytest.raises(InputError, match="min_replicas=2 and max_replicas=None: give both bounds"):
        ServeConfig(engine=engine, min_replicas=2)
    with pytest.raises(InputError, match="max_replicas=1 is below the minimum 2"):
        ServeConfig(engine=engine, replicas=2, min_replicas=2, max_replicas=1)
    with pytest.raises(InputError, match=r"replicas=5 \(the initial count\) must be within min_replicas=1 and "
                                         "max_replicas=4"):
        ServeConfig(engine=engine, replicas=5, min_replicas=1, max_replicas=4)
    with pytest.raises(InputError, match="replica_cpus=0 must be a number > 0"):
        ServeConfig(engine=engine, replica_cpus=0)
    with pytest.raises(InputError, match="max_queue=0 is below the minimum 1"):
        ServeConfig(engine=engine, max_queue=0)
    with pytest.raises(InputError, match=r"unknown argument\(s\) \['replica'\]"):
        ray_serve.app_builder({"engine": engine, "replica": 2})
    with pytest.raises(InputError, match=r"\['port'\] of skipdecode.serve.ray:app_builder are options of the serving "
                                         "process"):
        ray_serve.app_builder({"engine": engine, "port": 9000})
    opts = ray_serve.deployment_options(ServeConfig(engine=engine, replicas=2, min_replicas=1, max_replicas=3))
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 2,
                                          "target_ongoing_requests": 8.0} and "num_replicas" not in opts
    assert ray_serve.deployment_options(ServeConfig(engine=engine, replicas=2))["num_replicas"] == 2
    with pytest.raises(InputError, match="3 replicas x 1 CPUs = 3 CPUs, above the 2 CPUs of this local Ray"):
        ray_serve.check_local_capacity(ServeConfig(engine=engine, replicas=3), 2.0)


def test_serve_parser_takes_the_ray_options():
    from skipdecode.cli import build_parser
    args = build_parser().parse_args(["serve", "--engine", "https://h/e.tar.gz", "--ray", "--replicas", "2",
                                      "--address", "auto", "--min-replicas", "1", "--max-replicas", "4",
                                      "--replica-cpus", "2", "--max-ongoing-requests", "16"])
    config = ServeConfig.from_args(args)
    assert config.engine == "https://h/e.tar.gz" and config.served_name == "e" and config.ray
    assert (config.replicas, config.min_replicas, config.max_replicas, config.replica_cpus,
            config.max_ongoing_requests) == (2, 1, 4, 2.0, 16)


def test_the_serve_run_config_file_is_valid_for_ray_and_for_the_app_builder(tiny_engine):
    """configs/ray_serve.yaml: Ray's own schema accepts it and app_builder builds the app from its args."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "ray_serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "skipdecode.serve.ray:app_builder"
    built = ray_serve.app_builder({**app["args"], "engine": str(tiny_engine)})
    assert type(built).__name__ == "Application"


def test_health_check_fails_only_when_the_batching_worker_is_gone(tiny_engine, monkeypatch):
    """Ray replaces a replica whose check_health raises: one whose service worker died (requests would wait
    forever), not one that is shutting down."""
    from types import SimpleNamespace

    from skipdecode.runtime.request import GenerateOptions
    from skipdecode.runtime.service import Service

    check = ray_serve.SkipDecodeEngine.func_or_class.check_health
    engine = Engine.load(tiny_engine)
    svc = Service(engine)
    check(SimpleNamespace(service=svc))
    assert svc.alive
    svc.shutdown()
    assert not svc.alive
    check(SimpleNamespace(service=svc))  # stopped on purpose: healthy enough to drain and exit
    broken = Service(engine)

    def crash(*args):
        raise RuntimeError("injected worker crash")
    monkeypatch.setattr(broken, "_apply_cancels", crash)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # the injected crash is expected
    broken.submit([2, 3], GenerateOptions(max_new_tokens=2))
    deadline = time.monotonic() + 10
    while broken.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="worker thread of this replica has stopped"):
        check(SimpleNamespace(service=broken))
    broken.shutdown()
    engine.close()


def run_asgi(app, path="/x"):
    """Call an ASGI app once -> the messages it sent."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    asyncio.run(app({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send))
    return sent


def test_proxy_middleware_turns_a_lost_replica_into_the_servers_error_shapes():
    async def no_answer(scope, receive, send):  # what Ray's proxy does when the replica died before answering
        return

    async def cut_stream(scope, receive, send):  # ... and when it died mid-stream
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    async def complete(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    start, body = run_asgi(ray_serve.ReplicaLossMiddleware(no_answer))
    assert start["status"] == 502
    assert json.loads(body["body"])["error"]["code"] == "replica_failed"
    sent = run_asgi(ray_serve.ReplicaLossMiddleware(cut_stream))
    assert len(sent) == 3 and sent[-1]["more_body"] is False
    lines = sent[-1]["body"].decode().split("\n\n")
    assert json.loads(lines[0][len("data: "):])["error"]["code"] == "replica_failed" and lines[1] == "data: [DONE]"
    assert len(run_asgi(ray_serve.ReplicaLossMiddleware(complete))) == 2  # untouched


def test_health_answers_503_by_its_deadline_when_no_replica_answers():
    async def never(scope, receive, send):  # every replica dead: Ray's proxy keeps waiting for one
        await asyncio.sleep(30)

    async def slow_generation(scope, receive, send):
        await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    t0 = time.monotonic()
    start, body = run_asgi(ray_serve.HealthDeadlineMiddleware(never, timeout_s=0.3), path="/health")
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(body["body"])["status"] == "unavailable" and time.monotonic() - t0 < 5
    # a live replica's answer passes; other routes are never cut by the health deadline
    ok = run_asgi(ray_serve.HealthDeadlineMiddleware(slow_generation, timeout_s=2.0), path="/health")
    assert ok[0]["status"] == 200
    assert run_asgi(ray_serve.HealthDeadlineMiddleware(slow_generation, timeout_s=0.1), path="/v1/completions"
                    )[0]["status"] == 200


def test_proxy_limits_travel_in_one_environment_variable():
    cfg = ServeConfig(header_timeout=2.5, max_connections=9, max_client_connections=3, health_timeout=1.5)
    back = ray_serve.proxy_config(ray_serve.proxy_limits(cfg))
    assert (back.header_timeout, back.max_connections, back.max_client_connections, back.health_timeout) == \
        (2.5, 9, 3, 1.5)
    assert ray_serve.proxy_config(None).header_timeout == ServeConfig().header_timeout
    for bad, match in (("{", "not JSON"), ('{"engine": "x"}', "keys among"),
                       ('{"header_timeout": -1}', "header_timeout")):
        with pytest.raises(InputError, match=match):
            ray_serve.proxy_config(bad)


def _half_sent_head_lives(port: int, seconds: float) -> float | None:
    """Open a connection, send half a request head; -> seconds until the server closed it, None if still open."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        try:
            while sock.recv(1024):
                pass
            return time.monotonic() - t0
        except TimeoutError:
            return None


def test_the_proxy_guard_gives_uvicorns_default_protocol_the_header_timeout(monkeypatch):
    """What the callback does in Ray's proxy process, on a plain uvicorn server built as Ray builds its proxy's (the
    default "auto" protocol): a half-sent request head is closed at the header timeout; without the guard it stays
    open (negative control)."""
    import threading

    import uvicorn
    import uvicorn.config

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    def serve_once(check):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                               lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.02)
            return check(port)
        finally:
            server.should_exit = True
            thread.join(10)

    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    assert serve_once(lambda port: _half_sent_head_lives(port, 1.5)) is None  # uvicorn alone: held open
    ray_serve.guard_proxy_connections(ServeConfig(header_timeout=0.5))
    closed = serve_once(lambda port: _half_sent_head_lives(port, 5.0))
    assert closed is not None and closed < 3.0


# -- a local Ray instance: 2 replicas ------------------------------------------------------------------------------
def children_of() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    return out


def descendants(pid: int) -> set[int]:
    tree, out, todo = children_of(), set(), [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Cluster:
    """The module's local Ray instance and the processes it started (recorded as they appear)."""

    def __init__(self, url: str, engine: Path, before: set[int]) -> None:
        self.url, self.engine, self.before, self.seen = url, engine, before, set()
        self.up = True
        self.record()

    def record(self) -> None:
        self.seen |= descendants(os.getpid()) - self.before

    def shutdown(self) -> None:
        if self.up:
            self.record()
            self.up = False
            serve.shutdown()
            ray.shutdown()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_engine):
    if not Path("/proc/self/stat").exists():
        pytest.skip("the process checks read /proc (Linux)")
    before = descendants(os.getpid())
    saved = dict(os.environ)
    # the proxy middleware and limits, inherited by the processes ray.init starts
    ray_serve.local_ray_environment(os.environ, ServeConfig(header_timeout=HEADER_TIMEOUT))
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 logging_level="error", object_store_memory=100 * 2**20)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    port = free_port()
    c = Cluster(f"http://127.0.0.1:{port}", tiny_engine, before)
    try:
        serve.start(http_options=ray_serve.http_options(ServeConfig(port=port, max_timeout=60.0)))
        # 2 running rows per replica: requests queue on each, so a killed replica always holds some. Ray's router
        # picks replicas from queue lengths it caches, so under a burst it may send everything to one replica
        # unless that one is full: 12 in flight per replica makes a burst of more than 12 use both.
        ray_serve.deploy(ServeConfig(engine=str(tiny_engine), model_name="tiny", threads=1, max_batch=2, replicas=2,
                                     replica_cpus=1, health_check_period=1, max_ongoing_requests=12),
                         timeout_s=120)
        wait_for_replicas(c.url, 2, timeout_s=60)
        c.record()
        yield c
    finally:
        c.shutdown()


def wait_for_replicas(url: str, count: int, timeout_s: float, exclude: str | None = None) -> set[str]:
    """Send small requests until `count` distinct replicas (other than `exclude`) have answered through the proxy
    (its routing table follows the controller's with a delay) -> their names."""
    deadline, names = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": [2, 3], "max_tokens": 1}, timeout=10)
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code == 200:
            names.add(r.headers[ray_serve.REPLICA_HEADER])
            if len(names - {exclude}) >= count:
                return names
        time.sleep(0.05)
    raise AssertionError(f"{count} replicas did not answer within {timeout_s} s (answered: {sorted(names)})")


def bodies(n: int, seed: int = 0) -> list[dict]:
    return mixed_bodies(n, seed, max_prompt=16, max_tokens=(4, 40))


async def complete(client: httpx.AsyncClient, url: str, body: dict, started: list | None = None) -> dict:
    """One request -> {"replica", "status", "tokens", "reason", "error"}. A stream's error event is its error.
    `started` gets the replica's name when a stream's response starts."""
    out = {"replica": None, "status": None, "tokens": [], "reason": None, "error": None}
    if not body.get("stream"):
        r = await client.post(url + "/v1/completions", json=body)
        out.update(replica=r.headers.get(ray_serve.REPLICA_HEADER), status=r.status_code)
        if r.status_code == 200:
            data = r.json()
            out.update(tokens=data["choices"][0]["tokens"], reason=data["skipdecode"]["finish_reason"])
        else:
            out["error"] = r.json()["error"]
        return out
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        out.update(replica=r.headers.get(ray_serve.REPLICA_HEADER), status=r.status_code)
        if r.status_code != 200:  # refused or failed before the stream started: a JSON error
            out["error"] = json.loads(await r.aread())["error"]
            return out
        if started is not None and out["replica"] is not None:
            started.append(out["replica"])
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]
                continue
            choice = event["choices"][0]
            if "token" in choice:
                out["tokens"].append(choice["token"])
            out["reason"] = choice["finish_reason"] and event["skipdecode"]["finish_reason"] or out["reason"]
    return out


def solo(engine: Engine, body: dict) -> tuple[list[int], str]:
    limits = ServerLimits(max_length=engine.backend.max_length, vocab_size=engine.vocab_size,
                          eos_token_id=engine.eos_token_id)
    r = engine.generate([list(body["prompt"])], parse_completion(body, limits, None).options)[0]
    return list(r.tokens), r.finish_reason


def test_40_concurrent_requests_each_equal_a_solo_run(cluster):
    work = bodies(40)

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.wait_for(asyncio.gather(*[complete(client, cluster.url, b) for b in work]), 90)
    results = asyncio.run(main())
    ref = Engine.load(cluster.engine)
    for body, got in zip(work, results, strict=True):
        assert got["status"] == 200 and got["error"] is None, (body, got)
        assert (got["tokens"], got["reason"]) == solo(ref, body), body
    assert len({r["replica"] for r in results}) == 2  # both replicas served
    models = httpx.get(cluster.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(cluster.url + "/health", timeout=10).json()["status"] == "ok"
    assert "skipdecode_requests_submitted_total" in httpx.get(cluster.url + "/metrics", timeout=10).text
    bad = httpx.post(cluster.url + "/v1/completions", json={"prompt": [2, 3], "max_tokens": -1}, timeout=10)
    assert bad.status_code == 400 and "max_tokens=-1 is below the minimum 1" in bad.json()["error"]["message"]


def listening_ports() -> dict[int, str]:
    """TCP ports in LISTEN state on this machine (IPv4) -> the address they are bound to (hex, as /proc has it)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":
            ip, port = fields[1].split(":")
            out[int(port, 16)] = ip
    return out


def test_rays_own_metrics_exporter_is_off_unless_asked_for(cluster):
    """Ray serves its Prometheus metrics on every interface without authentication (it refuses to bind a node to
    loopback), so the local instance of `serve --ray` starts none unless --ray-metrics asks for one."""
    env: dict = {}
    ray_serve.local_ray_environment(env, ServeConfig())
    assert env[ray_serve.RAY_METRICS_ENV] == "0"
    env = {}
    ray_serve.local_ray_environment(env, ServeConfig(ray_metrics=True))
    assert ray_serve.RAY_METRICS_ENV not in env
    [node] = ray.nodes()  # the module's instance, started with the environment of a default ServeConfig
    port = node["MetricsExportPort"]
    assert port <= 0 or port not in listening_ports(), (port, listening_ports().get(port))


def test_metrics_through_the_proxy_are_the_sum_over_every_replica(cluster):
    """Whichever replica answers the scrape, /metrics through Ray's proxy counts every replica's requests; the
    replicas' own shares are each below that sum (negative control: one replica's counters, what a scrape showed
    before, would miss requests)."""
    def settled():  # the other replica's snapshot is at most PUBLISH_PERIOD_S old
        time.sleep(ray_serve.PUBLISH_PERIOD_S + 1)
        return metric_values(httpx.get(cluster.url + "/metrics", timeout=10).text)

    before = settled()
    work = [{"prompt": [2, 5 + i], "max_tokens": 3} for i in range(30)]

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.wait_for(asyncio.gather(*[complete(client, cluster.url, b) for b in work]), 60)
    results = asyncio.run(main())
    assert all(r["status"] == 200 for r in results)
    share = {name: sum(r["replica"] == name for r in results) for name in {r["replica"] for r in results}}
    assert len(share) == 2 and all(0 < n < 30 for n in share.values()), share
    after = settled()
    key = ("skipdecode_requests_submitted_total", ())
    assert after[key] - before[key] == 30, (before[key], after[key], share)
    assert after[("skipdecode_request_seconds_count", ())] - before[("skipdecode_request_seconds_count", ())] == 30
    assert after[("skipdecode_replicas", ())] == 2


def test_rays_proxy_closes_a_half_sent_request_head_at_the_header_timeout(cluster):
    port = int(cluster.url.rsplit(":", 1)[1])
    closed = _half_sent_head_lives(port, HEADER_TIMEOUT + 20)
    assert closed is not None and closed < HEADER_TIMEOUT + 5
    assert httpx.get(cluster.url + "/health", timeout=30).status_code == 200  # whole heads still served


def test_backpressure_reaches_the_client_as_503_with_retry_after(cluster):
    """A replica with one running slot and one queued request. Ray forwarding everything: the replica refuses what
    its queue cannot take (OverloadedError). Ray forwarding one at a time and queueing one: Ray's proxy refuses."""
    replica = ServeConfig(engine=str(cluster.engine), threads=1, max_batch=1, max_queue=1, replicas=1)
    body = {"prompt": [2, 5], "max_tokens": 120, "ignore_eos": True}

    def burst(n: int, ongoing: int, queued: int) -> list[httpx.Response]:
        ray_serve.deploy(dataclasses.replace(replica, max_ongoing_requests=ongoing, max_queued_requests=queued),
                         timeout_s=120, name="bp", route_prefix="/bp")
        wait_for_replicas(cluster.url + "/bp", 1, timeout_s=60)
        cluster.record()

        async def main():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
                return await asyncio.wait_for(asyncio.gather(
                    *[client.post(cluster.url + "/bp/v1/completions", json=body) for _ in range(n)]), 60)
        return asyncio.run(main())
    try:
        by_replica = burst(30, ongoing=32, queued=32)
        by_ray = burst(10, ongoing=1, queued=1)
    finally:
        serve.delete("bp")
    for responses in (by_replica, by_ray):
        assert {r.status_code for r in responses} == {200, 503}, [r.status_code for r in responses]
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    refused = [r for r in by_replica if r.status_code == 503]
    assert all(r.json()["error"]["type"] == "overloaded_error" for r in refused), refused[0].text
    assert "the queue limit is 1; retry later" in refused[0].json()["error"]["message"]
    refused = [r for r in by_ray if r.status_code == 503]
    assert all("Request dropped due to backpressure" in r.text for r in refused), refused[0].text


def test_a_replica_killed_under_load_fails_only_its_requests_and_comes_back(cluster):
    work = [{"prompt": [2, 5 + i], "max_tokens": 120, "ignore_eos": True, "stream": i % 4 != 3,
             **({"speedup": 2.0} if i % 2 else {})} for i in range(32)]
    started: list[str] = []
    victim = None

    async def main():
        nonlocal victim
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            jobs = asyncio.gather(*[complete(client, cluster.url, b, started) for b in work])
            deadline = time.monotonic() + 30
            while (len(started) < 12 or len(set(started)) < 2) and time.monotonic() < deadline and not jobs.done():
                await asyncio.sleep(0.005)
            assert len(set(started)) == 2, f"streams started on {set(started)} only: cannot tell whose fail"
            # kill the replica most streams started on: it holds running and queued requests now
            victim = max(set(started), key=started.count)
            await asyncio.to_thread(ray.kill, ray.get_actor(victim, namespace="serve"), no_restart=True)
            return await asyncio.wait_for(jobs, 90)  # none may hang
    results = asyncio.run(main())
    ref = Engine.load(cluster.engine)
    failed = [r for r in results if r["error"] is not None]
    assert failed, "the killed replica was running none of the requests"
    for body, got in zip(work, results, strict=True):
        if got["error"] is None:
            assert got["status"] == 200 and (got["tokens"], got["reason"]) == solo(ref, body), body
            continue
        assert got["error"]["code"] == "replica_failed" and "retry the request" in got["error"]["message"]
        # a started stream gets its error as an event; a request the replica had not answered, a JSON 502
        assert got["status"] == 502 or (body["stream"] and got["status"] == 200), got
        if got["replica"] is not None:
            assert got["replica"] == victim  # only the killed replica's requests fail
    assert any(r["error"] is None and r["replica"] != victim for r in results)
    # Ray starts a replacement: two live replicas answer again
    assert victim not in wait_for_replicas(cluster.url, 2, timeout_s=90, exclude=victim)
    cluster.record()


def test_shutdown_leaves_no_process_behind(cluster):
    started = set(cluster.seen)
    assert len(started) >= 4  # gcs, raylet, controller, proxy, replicas: the check below means something
    cluster.shutdown()
    deadline = time.monotonic() + 30
    while (left := {p for p in started if running(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
    assert not ray.is_initialized()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_the_serve_command_drains_in_flight_requests_on_a_signal_and_leaves_no_process_behind(tiny_engine, tmp_path,
                                                                                             sig):
    """`skipdecode serve --ray` as a user runs it (after the module's instance is down: one Ray at a time here).
    A rolling restart's signal arrives with requests in flight, plain and streamed: each completes in full."""
    import signal
    import subprocess
    import sys
    import threading

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "skipdecode.serve_cli", "--engine", str(tiny_engine),
                                 "--ray", "--replicas", "1", "--port", str(port), "--ray-cpus", "2"],
                                stdout=subprocess.DEVNULL, stderr=err)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 180  # a Ray instance, its proxy and two deployments on 2 busy cores
        while "skipdecode serve --ray: " not in log.read_text():  # deployed: serving until a signal
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(url + "/v1/completions", json={"prompt": [2, 3], "max_tokens": 4, "stream": True}, timeout=30)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        started = descendants(proc.pid)
        assert len(started) >= 4
        results: dict = {}
        first_chunk = threading.Event()

        def call(i: int, stream: bool) -> None:
            body = {"prompt": [2, 3 + i], "max_tokens": 100, "ignore_eos": True, "stream": stream}
            try:
                if stream:
                    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as s:
                        chunks = []
                        for line in s.iter_lines():
                            first_chunk.set()
                            if line:
                                chunks.append(line)
                        results[i] = (s.status_code, sum('"token"' in c for c in chunks), chunks[-2:])
                else:
                    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                    results[i] = (r.status_code, len(r.json()["choices"][0]["tokens"]) if r.status_code == 200
                                  else r.text[:200], None)
            except httpx.HTTPError as exc:
                results[i] = (None, repr(exc), None)

        calls = [threading.Thread(target=call, args=(i, i < 2)) for i in range(6)]
        for t in calls:
            t.start()
        assert first_chunk.wait(60)  # requests are in flight
        proc.send_signal(getattr(signal, sig))
        for t in calls:
            t.join(120)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()
        for i in range(6):  # streamed (0, 1) and plain: 200 with all 100 tokens, streams ending with [DONE]
            status, tokens, tail = results[i]
            assert (status, tokens) == (200, 100), (i, results[i])
            if i < 2:
                assert tail[-1] == "data: [DONE]", (i, tail)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 30
    while (left := {p for p in started if running(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
