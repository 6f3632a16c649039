"""The embeddable service (fake backend) and the HTTP server on loopback (a tiny exported engine).

Service: streams equal solo runs under concurrent submitters, cancellation, timeouts, bounded queue, graceful
shutdown (finish or cancel), backend and listener failures contained. HTTP: 200 concurrent clients with mixed
lengths, some cancelling mid-stream: nothing lost or hung and every completed output equals its solo run; bad
input gets a 4xx naming the value and the limit and the server keeps serving; 503 when overloaded; shutdown
finishes an open stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

for _module in ("httpx", "starlette", "uvicorn", "prometheus_client"):  # the `serve` extra
    pytest.importorskip(_module, reason="the HTTP server needs the serve extra: pip install -e .[serve]")

import httpx  # noqa: E402
from skipdecode.runtime.batcher import Batcher, prepare_request  # noqa: E402
from skipdecode.runtime.engine import Engine  # noqa: E402
from skipdecode.runtime.errors import InputError  # noqa: E402
from skipdecode.runtime.generator import Generator  # noqa: E402
from skipdecode.runtime.request import (  # noqa: E402
    FinishEvent,
    GenerateOptions,  # noqa: E402
    TokenEvent,
)
from skipdecode.runtime.sampling import SamplingParams  # noqa: E402
from skipdecode.runtime.scheduler import SchedulerConfig  # noqa: E402
from skipdecode.runtime.service import (  # noqa: E402
    OverloadedError,
    RequestFailedError,
    Service,
    ServiceClosedError,
    ServiceConfig,
)

from skipdecode.serve.app import create_app  # noqa: E402
from skipdecode.serve.config import ServeConfig  # noqa: E402
from skipdecode.serve.protocol import ServerLimits, TextStream, parse_completion  # noqa: E402

from .serving_fakes import EOS, FailingBackend, fake_generator, mixed_bodies, serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def solo(gen, prompt, opts):
    r = gen.generate([prompt], opts)[0]
    return list(r.tokens), list(r.budgets), r.finish_reason


OPTS = [GenerateOptions(max_new_tokens=n, speedup=s, eos_token_id=EOS,
                        sampling=SamplingParams(0.8, 0, 0.9, seed=n) if n % 2 else SamplingParams())
        for n, s in [(12, None), (20, 2.0), (7, 3.0), (30, 3.0), (1, None)]]


# -- service (fake backend) -------------------------------------------------------------------------------------------
def test_concurrent_submitters_each_get_their_solo_run():
    ref, results = fake_generator(), {}
    with Service(fake_generator()) as svc:
        def client(i):
            prompt, opts = [3 + i, 4, 5 + i % 7][: 1 + i % 3], OPTS[i % len(OPTS)]
            tokens = [ev.token for ev in svc.submit(prompt, opts)]  # the stream
            results[i] = (prompt, opts, tokens, svc.submit(prompt, opts).result())
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(results) == 16
    for prompt, opts, streamed, res in results.values():
        assert streamed == list(res.tokens)
        assert (list(res.tokens), list(res.budgets), res.finish_reason) == solo(ref, prompt, opts)


def test_cancel_mid_stream_frees_the_slot():
    with Service(fake_generator(delay_s=0.005)) as svc:
        handle = svc.submit([5, 6], GenerateOptions(max_new_tokens=60))
        it = iter(handle)
        next(it), next(it)
        handle.cancel()
        rest = list(it)
        res = handle.result(5)
        assert res.finish_reason == "cancelled" and 2 <= len(res.tokens) < 60 and len(rest) == len(res.tokens) - 2
        assert svc.generate([7], GenerateOptions(max_new_tokens=3)).finish_reason == "length"
        assert svc.stats().running == 0


def test_timeout_ends_a_request_explicitly():
    with Service(fake_generator(delay_s=0.01)) as svc:
        res = svc.submit([5, 6], GenerateOptions(max_new_tokens=60), timeout_s=0.1).result(5)
    assert res.finish_reason == "timeout" and len(res.tokens) < 60


def test_bounded_queue_raises_overloaded():
    svc = Service(fake_generator(delay_s=0.01, max_batch=1), ServiceConfig(max_queue=2))
    handles = [svc.submit([5], GenerateOptions(max_new_tokens=30))]
    time.sleep(0.05)  # the first is admitted; two more may wait
    handles += [svc.submit([5], GenerateOptions(max_new_tokens=3)) for _ in range(2)]
    with pytest.raises(OverloadedError, match="2 requests are waiting, the queue limit is 2"):
        svc.submit([5], GenerateOptions(max_new_tokens=3))
    svc.shutdown(cancel=False)
    assert [h.result().finish_reason for h in handles] == ["length"] * 3
    assert svc.stats().rejected_overloaded == 1


@pytest.mark.parametrize("cancel", [False, True])
def test_shutdown_finishes_or_cancels_in_flight_requests(cancel):
    svc = Service(fake_generator(delay_s=0.005, max_batch=2))
    handles = [svc.submit([5 + i], GenerateOptions(max_new_tokens=20)) for i in range(4)]
    svc.shutdown(cancel=cancel)
    reasons = {h.result(0).finish_reason for h in handles}
    assert reasons == ({"cancelled"} if cancel else {"length"})
    with pytest.raises(ServiceClosedError, match="shutting down"):
        svc.submit([5], GenerateOptions(max_new_tokens=2))


def test_shutdown_timeout_cancels_what_did_not_finish():
    svc = Service(fake_generator(delay_s=0.02, max_batch=1))
    handles = [svc.submit([5], GenerateOptions(max_new_tokens=40)) for _ in range(3)]
    svc.shutdown(cancel=False, timeout_s=0.1)
    assert [h.result(0).finish_reason for h in handles] == ["cancelled"] * 3


def test_backend_failure_fails_the_requests_in_flight_and_service_goes_on():
    gen = Generator(FailingBackend(fail_on=3), None, 1, EOS, 50)
    with Service(gen) as svc:
        bad = svc.submit([5, 6], GenerateOptions(max_new_tokens=10))
        with pytest.raises(RequestFailedError, match="injected backend failure"):
            bad.result(5)
        assert svc.generate([5, 6], GenerateOptions(max_new_tokens=10)).finish_reason == "length"
        assert svc.stats().finished["error"] == 1


def test_a_raising_listener_ends_only_its_own_request():
    def listener(ev):
        raise RuntimeError("client went away")
    with Service(fake_generator()) as svc:
        bad = svc.submit([5], GenerateOptions(max_new_tokens=10), listener=listener)
        good = svc.submit([6], GenerateOptions(max_new_tokens=10))
        with pytest.raises(RequestFailedError, match="client went away"):
            bad.result(5)
        assert good.result(5).finish_reason == "length"


@pytest.mark.parametrize("prompt, opts, message", [
    ([], GenerateOptions(max_new_tokens=2), "prompt 0 is empty"),
    ([5] * 60, GenerateOptions(max_new_tokens=10), "is above the model's limit of 64"),
    ([99], GenerateOptions(max_new_tokens=2), "token id 99 outside the vocabulary"),
])
def test_bad_requests_are_refused_at_submit(prompt, opts, message):
    with Service(fake_generator()) as svc, pytest.raises(InputError, match=message):
        svc.submit(prompt, opts)


# -- request parsing and stop strings (no server) ------------------------------------------------------------------
class CharCodec:
    """Token t -> chr(t): enough to test incremental text and stop strings."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    ts = TextStream(CharCodec(), ["END"])
    out = [ts.push(ord(c)) for c in "abcEXEN"]
    assert "".join(out) == "abcEX" and ts.text == "abcEX"  # "EN" may still become "END"
    assert ts.push(ord("D")) == "" and ts.stopped and ts.text == "abcEX"
    ts2 = TextStream(CharCodec(), ["END"])
    for c in "xyE":
        ts2.push(ord(c))
    assert ts2.flush() == "E" and ts2.text == "xyE"


def test_parse_completion_maps_fields_to_options():
    limits = ServerLimits(max_length=64, vocab_size=300, eos_token_id=2)
    req = parse_completion({"prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                            "speedup": 2, "stop": ["\n"], "stop_token_ids": [7], "stream": True, "user": "u"},
                           limits, CharCodec())
    assert req.prompt == (104, 105) and req.stream and req.stop == ("\n",)
    o = req.options
    assert (o.max_new_tokens, o.speedup, o.eos_token_id, o.stop_token_ids) == (5, 2, 2, (7,))
    assert o.sampling == SamplingParams(0.5, 0, 0.9, 3)
    req = parse_completion({"prompt": [1], "ignore_eos": True, "seed": None}, limits, None)
    assert req.options.eos_token_id is None and req.options.sampling.seed is None


# -- a tiny exported engine over HTTP --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from skipdecode.export.exporter import ExportConfig, export
    from skipdecode.export.random_models import build_random_opt
    ckpt = tmp_path_factory.mktemp("serving-ckpt")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(ckpt)
    out = tmp_path_factory.mktemp("serving-engines") / "tiny"
    export(ExportConfig(lossless_policy="default",
                        model=str(ckpt), out=out, speedups=(2.0, 3.0), max_batch=8), progress=False)
    return out


@pytest.fixture(scope="module")
def server(engine_dir):
    engine = Engine.load(engine_dir)
    service = Service(engine, ServiceConfig(max_queue=256))
    with serve_in_thread(create_app(engine, service, ServeConfig(model_name="tiny"))) as (url, _):
        yield url, engine


@pytest.mark.parametrize("strategy", ["gate", "group"])
def test_real_engine_batcher_equals_solo_runs(engine_dir, strategy):
    engine, ref = Engine.load(engine_dir), Engine.load(engine_dir)
    rng = np.random.default_rng(1)
    reqs = [([int(t) for t in rng.integers(3, 200, int(rng.integers(1, 16)))], OPTS[i % len(OPTS)])
            for i in range(16)]
    b = Batcher(engine.backend, SchedulerConfig(8, 8 * 128, None, strategy))
    out = {i: ([], [], None) for i in range(len(reqs))}
    for step in range(10_000):
        for i in range(len(reqs)):  # bursts of 3 every other step: batched prefills, rows join and leave
            if i // 3 * 2 == step:
                b.add(prepare_request(i, *reqs[i], engine.backend, engine.vocab_size))
        for ev in b.step().events:
            if isinstance(ev, TokenEvent):
                out[ev.request_id][0].append(ev.token)
                out[ev.request_id][1].append(ev.budget)
            elif isinstance(ev, FinishEvent):
                out[ev.request_id] = (*out[ev.request_id][:2], ev.reason)
        if step >= 2 * len(reqs) and b.idle:
            break
    assert all(out[i] == tuple(solo(ref, *reqs[i])) for i in range(len(reqs)))


def load_bodies(n=200, seed=0):
    bodies = mixed_bodies(n, seed)
    rng = np.random.default_rng(seed + 1)
    for i, body in enumerate(bodies):
        if i % 10 == 5:
            body["stop_token_ids"] = [int(rng.integers(3, 200))]
        if cancels(i):  # long enough to be still running when its client hangs up
            body.update(stream=True, max_tokens=100, ignore_eos=True)
    return bodies


def cancels(i):
    return i % 10 == 3


async def run_client(client, url, body, cancel_after):
    """-> (tokens, internal finish_reason or "client-cancelled")."""
    if not body["stream"]:
        r = await client.post(url, json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        return data["choices"][0]["tokens"], data["skipdecode"]["finish_reason"]
    tokens, reason = [], None
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if "token" in choice:
                tokens.append(choice["token"])
            reason = choice["finish_reason"] or reason
            if cancel_after is not None and len(tokens) >= cancel_after and reason is None:
                return tokens, "client-cancelled"  # leaving the block closes the connection mid-stream
    return tokens, reason


def test_load_200_concurrent_clients_with_cancellations(server, engine_dir):
    url, engine = server
    bodies = load_bodies()

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            jobs = [run_client(client, url + "/v1/completions", b, 2 if cancels(i) else None)
                    for i, b in enumerate(bodies)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=90)

    results = asyncio.run(main())
    ref = Engine.load(engine_dir)
    limits = ServerLimits(max_length=ref.backend.max_length, vocab_size=ref.vocab_size, eos_token_id=ref.eos_token_id)
    completed = 0
    for body, (tokens, reason) in zip(bodies, results, strict=True):
        if reason == "client-cancelled":
            continue
        completed += 1
        want = solo(ref, list(body["prompt"]), parse_completion(body, limits, None).options)
        assert (tokens, reason) == (want[0], want[2]), body
    assert completed == len(bodies) - sum(map(cancels, range(len(bodies))))
    stats = wait_for_idle(url)
    assert stats['skipdecode_requests_finished_total{outcome="cancelled"}'] >= 5  # hung up mid-stream
    assert stats["skipdecode_requests_submitted_total"] == sum(
        v for k, v in stats.items() if k.startswith("skipdecode_requests_finished_total"))  # none lost
    assert 1 <= stats["skipdecode_mean_layers_per_token"] < engine.backend.num_layers  # SkipDecode ran


def metrics(url):
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for_idle(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["skipdecode_running_requests"] == 0 and m["skipdecode_queue_depth"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still in flight: {m}"
        time.sleep(0.05)


BAD = [
    (b"{not json", 400, "invalid JSON body"),
    (b"[1, 2]", 400, "request body must be a JSON object, got list"),
    ({"prompt": [2, 3], "foo": 1}, 400, "unknown field 'foo'"),
    ({"prompt": [2, 3], "max_tokens": -1}, 400, "max_tokens=-1 is below the minimum 1"),
    ({"prompt": [2, 3], "max_tokens": 10**9}, 400, "max_tokens=1000000000 is above the maximum 126 for a 2-token"),
    ({"prompt": [5] * 200}, 400, "prompt has 200 tokens, above the limit of 127"),
    ({"prompt": [2, 3], "max_tokens": "5"}, 400, "max_tokens must be an integer, got '5'"),
    ({"prompt": [2, 3], "temperature": "hot"}, 400, "temperature must be a finite number, got 'hot'"),
    ({"prompt": [2, 3], "temperature": -1}, 400, "temperature=-1 must be a finite number >= 0"),
    ({"prompt": [2, 3], "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": 5}, 400, "prompt must be a string or a list of token ids, got 5"),
    ({"prompt": [[2, 3], [4]]}, 400, "batches of prompts are not supported"),
    ({"prompt": "hello"}, 400, "no tokenizer"),
    ({"prompt": [999]}, 400, "prompt token id 999 is outside the vocabulary [0, 211)"),
    ({"prompt": [2, 3], "speedup": 100}, 400, "speedup=100 is above the maximum 6"),
    ({"prompt": [2, 3], "n": 2}, 400, "n=2 is above the maximum 1"),
    ({"prompt": [2, 3], "stop": "x"}, 400, "stop strings need a tokenizer"),
    ({"prompt": [2, 3], "max_layers": 3}, 400, "must be given together"),
    (b'{"prompt": [' + b"2," * 600_000 + b'2]}', 413, "request body is above the limit of 1048576 bytes"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_a_4xx_naming_the_value_and_the_server_keeps_serving(server, body, status, message):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]["message"]
    assert message in err and "\n" not in err
    ok = httpx.post(url + "/v1/completions", json={"prompt": [2, 3], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["tokens"]) >= 1
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_overloaded_server_answers_503_and_recovers():
    gen = fake_generator(delay_s=0.01, max_batch=1)
    service = Service(gen, ServiceConfig(max_queue=1))
    with serve_in_thread(create_app(gen, service)) as (url, _):
        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*[client.post(url + "/v1/completions",
                                                          json={"prompt": [5], "max_tokens": 8}) for _ in range(8)])
        responses = asyncio.run(main())
        refused = [r for r in responses if r.status_code == 503]
        assert refused and len(refused) < len(responses) and {r.status_code for r in responses} == {200, 503}
        assert "queue limit is 1" in refused[0].json()["error"]["message"]
        assert refused[0].headers["retry-after"] == "1"
        assert httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 2}).status_code == 200


def test_client_hangup_cancels_a_non_streamed_request():
    gen = fake_generator(delay_s=0.01)
    service = Service(gen)
    with serve_in_thread(create_app(gen, service)) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 60, "ignore_eos": True},
                       timeout=0.2)
        deadline = time.monotonic() + 5
        while service.stats().finished.get("cancelled", 0) == 0:
            assert time.monotonic() < deadline, service.stats()
            time.sleep(0.02)
        assert service.stats().generated_tokens < 60


def test_graceful_shutdown_finishes_an_open_stream():
    gen = fake_generator(delay_s=0.01)
    service = Service(gen)
    got = []
    with serve_in_thread(create_app(gen, service)) as (url, server):
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": [5], "max_tokens": 40, "stream": True,
                                                                  "ignore_eos": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:])["choices"][0])
                    if len(got) == 3:
                        server.should_exit = True  # shut down while the stream is open
    assert len(got) == 41 and got[-1]["finish_reason"] == "length"
    assert service.closing


def test_serve_bench_and_serve_parser_smoke(engine_dir, tmp_path, capsys):
    import argparse

    from skipdecode.bench import serve_bench

    from skipdecode.serve_cli import add_serve_parser
    out = tmp_path / "bench.json"
    assert serve_bench.main(["--engine", str(engine_dir), "--requests", "6", "--rate", "200", "--speedups", "1,3",
                             "--prompt-lengths", "2", "10", "--new-tokens", "2", "12", "--micro-reps", "2",
                             "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["mode"], r["speedup"]) for r in data["medians"]} == {(m, s) for m in serve_bench.MODES for s in (1, 3)}
    assert "tokens/s" in capsys.readouterr().out
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    add_serve_parser(sub)
    args = sub.choices["serve"].parse_args(["--engine", "e", "--port", "9", "--strategy", "group"])
    assert (args.host, args.port, args.strategy, args.max_queue) == ("127.0.0.1", 9, "group", 64)
