"""The HTTP server under hostile or unusual clients, on the fake backend (no engine needed).

Nothing blocks the event loop (`/health` answers in < 100 ms while slow tokenizing, big prompts and long stop
strings are in flight); malformed bodies get 400, never 500; stalled connections are closed within their timeouts
and a connection limit holds; API key, JSON content type and Host checks; a denormal temperature is greedy;
OpenAI compatibility (neutral values of fields we do not implement, one-prompt lists, /v1/models, JSON 404/405,
standard finish_reason values, no status that the openai client would re-submit for a request that timed out).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time

import pytest

for _module in ("httpx", "starlette", "uvicorn", "prometheus_client"):  # the `serve` extra
    pytest.importorskip(_module, reason="the HTTP server needs the serve extra: pip install -e .[serve]")

import httpx  # noqa: E402
from skipdecode.runtime.errors import InputError  # noqa: E402
from skipdecode.runtime.generator import Generator  # noqa: E402
from skipdecode.runtime.service import Service  # noqa: E402

from skipdecode.serve.app import create_app  # noqa: E402
from skipdecode.serve.config import ServeConfig  # noqa: E402
from skipdecode.serve.net import allowed_hosts, warn_if_exposed  # noqa: E402
from skipdecode.serve.protocol import ServerLimits, TextStream, parse_completion  # noqa: E402

from .serving_fakes import EOS, VOCAB, FakeSlotBackend, serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(120)

RETRIED = {408, 409, 429} | set(range(500, 600))  # statuses the official openai client re-submits


class LetterCodec:
    """Token t -> one letter; text -> one token per character (first `keep` characters), each call taking
    `delay_s` (a sleeping tokenizer: on the event loop it would stall every client)."""

    def __init__(self, delay_s: float = 0.0, keep: int = 8, letter: str | None = None) -> None:
        self.delay_s, self.keep, self.letter = delay_s, keep, letter
        self.longest_encoded = 0

    def encode(self, text):
        self.longest_encoded = max(self.longest_encoded, len(text))
        time.sleep(self.delay_s)
        return [3 + ord(c) % (VOCAB - 3) for c in text[: self.keep]]

    def decode(self, ids):
        time.sleep(self.delay_s / 100)
        return "".join(self.letter or chr(ord("a") + t % 26) for t in ids)


def fake_engine(codec=None, **kw) -> Generator:
    return Generator(FakeSlotBackend(**kw), codec, pad_token_id=1, eos_token_id=EOS, vocab_size=VOCAB)


def post(url, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url + "/v1/completions", content=content, headers=headers, timeout=30, **kw)


@pytest.fixture
def served():
    """-> (url, service, codec) of a fake engine with a letter codec."""
    codec = LetterCodec()
    gen = fake_engine(codec)
    service = Service(gen)
    with serve_in_thread(create_app(gen, service, ServeConfig(model_name="fake"))) as (url, _):
        yield url, service, codec


# -- the event loop stays free -------------------------------------------------------------------------------------
def test_health_answers_fast_while_big_prompts_slow_tokenizing_and_long_stop_strings_run():
    codec = LetterCodec(delay_s=0.3, letter="x")  # 0.3 s per encode, 3 ms per decode
    gen = fake_engine(codec, delay_s=0.002, max_batch=4)
    service = Service(gen)
    limits = ServerLimits(64, VOCAB, EOS)
    long_stops = ["x" * (limits.max_stop_chars - 1) + c for c in "yzvw"]  # held back at every token, never hit
    heavy = [{"prompt": "p" * 1_000_000}] * 4  # above the character limit: refused before tokenizing
    heavy += [{"prompt": "q" * limits.prompt_chars, "max_tokens": 40, "ignore_eos": True, "stop": long_stops,
               "stream": bool(i % 2)} for i in range(6)]

    async def main():
        async with httpx.AsyncClient(timeout=60, headers={"content-type": "application/json"}) as client:
            async def one(body):
                r = await client.post(url + "/v1/completions", content=json.dumps(body))
                return r.status_code, r.text

            jobs = [asyncio.create_task(one(b)) for b in heavy]
            await asyncio.sleep(0.05)
            latencies = []
            while not all(j.done() for j in jobs) or len(latencies) < 10:
                t0 = time.perf_counter()
                r = await client.get(url + "/health")
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                await asyncio.sleep(0.02)
            return latencies, await asyncio.gather(*jobs)

    with serve_in_thread(create_app(gen, service, ServeConfig(model_name="fake"))) as (url, _):
        latencies, results = asyncio.run(main())
    assert max(latencies) < 0.1, sorted(latencies)[-5:]
    assert [s for s, _ in results] == [400] * 4 + [200] * 6
    assert "prompt has 1000000 characters, above the limit of 2048" in results[0][1]
    assert codec.longest_encoded == limits.prompt_chars  # the megabyte prompts never reached the tokenizer
    text = json.loads(results[4][1])["choices"][0]["text"]
    assert text == "x" * 40  # held back while it could become a stop string, released at the end


def reference_stop(text, stops):
    """What a stream cut at the first stop string to complete releases."""
    for k in range(len(text) + 1):
        hits = [i for i in (text[:k].find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)]
    return text


class CharCodec:
    def decode(self, ids):
        return "".join(map(chr, ids))


class ByteCodec:
    """Token = one UTF-8 byte: characters span tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_equals_the_reference_cut_and_never_releases_a_partial_character():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 16)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 3))]
        ts, out = TextStream(CharCodec(), stops), []
        for c in text:
            out.append(ts.push(ord(c)))
            assert reference_stop(text, stops).startswith("".join(out)), (text, stops, out)
        out.append(ts.flush())
        assert "".join(out) == reference_stop(text, stops) == ts.text, (text, stops, out)
    for trial in range(1000):
        text = "".join(rng.choice("aé€😀") for _ in range(rng.randint(0, 8)))
        stops = [rng.choice(["é€", "😀a", "€😀é"])] if trial % 2 else []
        ts, out = TextStream(ByteCodec(), stops), []
        for b in text.encode():
            out.append(ts.push(b))
            assert "\ufffd" not in out[-1]
        out.append(ts.flush())
        assert "".join(out) == reference_stop(text, stops)


# -- malformed input: 400, bounded echo ----------------------------------------------------------------------------
MALFORMED = [
    (b'{"prompt": "caf\xe9"}', "request body is not valid UTF-8"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"prompt": [1' + b"1" * 5000 + b"]}", "a number has more than 4300 digits"),
    (b'{"prompt": "a\\ud800b"}', "prompt holds a lone surrogate ('\\ud800' at character 1)"),
    (b'{"prompt": "ab", "stop": "\\udfff"}', "stop holds a lone surrogate"),
    (b'{"prompt": "ab", "temperature": 1' + b"0" * 4000 + b"}", "temperature must be a finite number, got <integer"),
    (b'{"prompt": "ab", "temperature": 1e999}', "temperature must be a finite number, got inf"),
    ({"prompt": "ab", "stop": ["x" * 513]}, "has 513 characters, above the limit of 512"),
    ({"prompt": "ab", "stop": ["a", "b", "c", "d", "e"]}, "stop has 5 strings, above the maximum 4"),
    ({"prompt": "ab", "stop_token_ids": list(range(10_000))}, "must be a list of at most 256 token ids"),
    ({"prompt": "ab", "model": "m" * 100_000}, "model must be a string of at most 256 characters"),
    ({"prompt": "ab", "x" * 100_000: 1}, "unknown field 'xxx"),
    ({"prompt": [3, 10**4000]}, "prompt token id <integer of about 4000 digits> is outside"),
]


@pytest.mark.parametrize("body, message", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_bodies_get_400_with_a_bounded_message(served, body, message):
    url, _, _ = served
    r = post(url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    # bounded: the client's value is echoed at most 80 characters (the list of allowed fields is ours)
    assert message in err["message"] and len(err["message"]) < 512, err
    assert err["type"] == "invalid_request_error"
    assert post(url, {"prompt": "ab", "max_tokens": 2}).status_code == 200


# -- stalled connections -------------------------------------------------------------------------------------------
def closed_after(sock: socket.socket, limit: float = 5.0) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (EOF), and what it sent before."""
    sock.settimeout(limit)
    t0, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - t0, got


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("sent, status", [
    (b"", None),  # connects, sends nothing
    (b"POST /v1/completions HTTP/1.1\r\nHost: 12", None),  # partial head
    (HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ', b"408"),  # partial body
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /hea", b"200"),  # a full request, then a partial one
])
def test_stalled_connections_are_closed_within_their_timeouts(sent, status):
    gen = fake_engine(LetterCodec())
    with serve_in_thread(create_app(gen, Service(gen), ServeConfig(body_timeout=0.5)), header_timeout=0.5,
                         keep_alive_timeout=5) as (url, _):
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall(sent)
        waited, got = closed_after(sock)
        sock.close()
    assert 0.3 < waited < 2.0, waited
    assert (got.split(b" ")[1] if got else None) == status, got


def test_connection_limit_closes_the_connection_beyond_it_at_once():
    gen = fake_engine(LetterCodec())
    with serve_in_thread(create_app(gen, Service(gen)), header_timeout=1.0, max_connections=3) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.1)
        extra = socket.create_connection(("127.0.0.1", port))
        waited, got = closed_after(extra)
        assert waited < 0.5 and got == b""
        for s in held:
            assert closed_after(s)[0] < 2.0  # the header timeout frees the held ones
            s.close()
        assert httpx.get(url + "/health").status_code == 200


def test_one_client_cannot_take_every_connection():
    """Connections beyond a client's share are closed at once; another client (another address) still gets in."""
    gen = fake_engine(LetterCodec())
    with serve_in_thread(create_app(gen, Service(gen)), header_timeout=5.0, max_connections=10,
                         max_client_connections=3) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.1)
        extra = socket.create_connection(("127.0.0.1", port))
        waited, got = closed_after(extra)
        assert waited < 0.5 and got == b""  # the same client, over its share
        other = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        other.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        other.settimeout(5)
        assert other.recv(64).startswith(b"HTTP/1.1 200")
        other.close()
        for s in held:
            s.close()
        time.sleep(0.1)
        assert httpx.get(url + "/health").status_code == 200  # the share is given back as connections close


# -- access: API key, content type, Host --------------------------------------------------------------------------
def test_api_key_guards_every_route_but_health():
    gen = fake_engine(LetterCodec())
    with serve_in_thread(create_app(gen, Service(gen), ServeConfig(api_key="s3cret"))) as (url, _):
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "s3cret"}):
            r = post(url, {"prompt": "ab"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
            assert httpx.get(url + "/metrics", headers=headers).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        ok = {"authorization": "Bearer s3cret"}
        assert post(url, {"prompt": "ab", "max_tokens": 2}, headers=ok).status_code == 200
        assert httpx.get(url + "/v1/models", headers=ok).status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_must_be_json(served, content_type):
    url, service, _ = served
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "ab"}', headers=headers)
    assert r.status_code == 415 and "Content-Type must be application/json" in r.json()["error"]["message"]
    assert post(url, {"prompt": "ab"}, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    assert service.stats().submitted == 1


def test_host_header_must_be_allowed():
    gen = fake_engine(LetterCodec())
    with serve_in_thread(create_app(gen, Service(gen), ServeConfig(allowed_hosts="my.box"))) as (
            url, _):
        for host in ("evil.example", "evil.example:80", "127.0.0.2"):
            r = httpx.get(url + "/health", headers={"host": host})
            assert r.status_code == 421 and "is not served here" in r.json()["error"]["message"]
        for host in ("localhost", "LOCALHOST:9", "my.box:8000"):
            assert httpx.get(url + "/health", headers={"host": host}).status_code == 200
    assert allowed_hosts("0.0.0.0", "") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts("10.1.2.3", "a.b, c") == ("localhost", "127.0.0.1", "::1", "10.1.2.3", "a.b", "c")
    assert allowed_hosts("127.0.0.1", "*") is None


def test_binding_beyond_loopback_without_a_key_warns(capsys):
    warn_if_exposed("127.0.0.1", None)
    warn_if_exposed("0.0.0.0", "key")
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0", None)
    assert "WARNING" in capsys.readouterr().err


def test_api_key_from_the_environment(monkeypatch):
    import argparse

    monkeypatch.setenv("SKIPDECODE_API_KEY", "from-env")
    from skipdecode.serve.config import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--engine", "e"])
    assert args.api_key == "from-env" and (args.header_timeout, args.body_timeout) == (10.0, 30.0)
    assert p.parse_args(["--engine", "e", "--api-key", "k"]).api_key == "k"



def test_each_serve_flag_is_a_config_field_with_the_same_default(monkeypatch):
    """The flags derive from ServeConfig: parsing nothing but --engine gives the default config, every field has
    exactly one flag, and a bad value is refused by the config naming the value and the limit."""
    import argparse
    import dataclasses

    from skipdecode.serve.config import add_arguments
    monkeypatch.delenv("SKIPDECODE_API_KEY", raising=False)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--engine", "e"])
    assert ServeConfig.from_args(args) == ServeConfig(engine="e")
    assert sorted(vars(args)) == sorted(f.name for f in dataclasses.fields(ServeConfig))
    config = ServeConfig.from_args(p.parse_args(["--engine", "e", "--no-verify", "--ray", "--strategy", "group"]))
    assert (config.verify, config.ray, config.strategy) == (False, True, "group")
    for flags, message in ((["--max-queue", "0"], "max_queue=0 is below the minimum 1"),
                           (["--body-timeout", "0"], "body_timeout=0.0 must be a number > 0"),
                           (["--strategy", "fast"], "strategy='fast' is not one of ['gate', 'group']"),
                           (["--prepack", "some"], "prepack='some' is not one of ['shared', 'private', 'off']"),
                           (["--port", "70000"], "port=70000 is above the maximum 65535")):
        with pytest.raises(InputError, match=re.escape(message)):
            ServeConfig.from_args(p.parse_args(["--engine", "e", *flags]))


def test_every_error_carries_a_status_of_its_branch():
    """Request errors are 4xx, server errors 5xx; the HTTP server reports each with its own status."""
    from skipdecode.runtime import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SkipDecodeError)]
    assert len(classes) > 10
    for c in classes:
        if issubclass(c, errors.RequestError):
            assert 400 <= c.status < 500, c
        elif c is not errors.SkipDecodeError:
            assert issubclass(c, errors.ServerError) and 500 <= c.status < 600, c
    assert errors.RouteError("no route", 405, {"Allow": "GET"}).headers == {"Allow": "GET"}

# -- sampling ---------------------------------------------------------------------------------------------------------
def test_a_denormal_temperature_is_greedy(served):
    url, _, _ = served
    body = b'{"prompt": "hello", "max_tokens": 12, "ignore_eos": true, "temperature": %s}'
    greedy = post(url, body % b"0").json()["choices"][0]
    tiny = post(url, body % b"1e-320").json()["choices"][0]
    assert tiny["tokens"] == greedy["tokens"] and len(tiny["tokens"]) == 12 and tiny["finish_reason"] == "length"


# -- OpenAI compatibility --------------------------------------------------------------------------------------------
NEUTRAL = {"logprobs": None, "echo": False, "best_of": 1, "n": 1, "frequency_penalty": 0, "presence_penalty": 0.0,
           "logit_bias": {}, "suffix": None, "stream_options": None, "user": "u-1", "seed": None, "stop": None,
           "top_p": 1}


def test_neutral_values_of_fields_we_do_not_implement_are_accepted(served):
    url, _, _ = served
    plain = post(url, {"prompt": "hello", "max_tokens": 6}).json()["choices"][0]
    ids = [3 + ord(c) % (VOCAB - 3) for c in "hello"]
    for body in ({**NEUTRAL, "prompt": "hello"}, {"prompt": ["hello"]}, {"prompt": [ids]},
                 {"prompt": "hello", "stream_options": {"include_usage": False}, "suffix": ""}):
        r = post(url, {**body, "max_tokens": 6})
        assert r.status_code == 200, (body, r.text)
        assert r.json()["choices"][0]["tokens"] == plain["tokens"]


@pytest.mark.parametrize("field, value, message", [
    ("logprobs", 6, "logprobs=6 is above the maximum 5"),
    ("logprobs", -1, "logprobs=-1 is below the minimum 0"),
    ("echo", 1, "echo must be true or false, got 1"),
    ("max_tokens", 0, "max_tokens=0 is below the minimum 1"),  # 0 only with echo
    ("best_of", 2, "best_of=2 is above the maximum 1"),
    ("n", 3, "n=3 is above the maximum 1"),
    ("frequency_penalty", 0.5, "frequency_penalty=0.5 is not supported: only 0"),
    ("presence_penalty", -1, "presence_penalty=-1 is not supported"),
    ("logit_bias", {"5": 10}, "logit_bias={'5': 10} is not supported: only {}"),
    ("suffix", "end", "suffix='end' is not supported"),
    ("stream_options", {"include_usage": 1}, "stream_options={'include_usage': 1} must be null or"),
    ("stream_options", {"x": True}, "stream_options={'x': True} must be null or"),
    ("prompt", ["a", "b"], "batches of prompts are not supported"),
])
def test_values_that_would_change_the_result_are_refused(field, value, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_completion({"prompt": "hello", field: value}, ServerLimits(64, VOCAB, EOS), LetterCodec())


def test_models_routes_and_json_404_405(served):
    url, _, _ = served
    listing = httpx.get(url + "/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["fake"]
    model = httpx.get(url + "/v1/models/fake").json()
    assert model == listing["data"][0] and model["object"] == "model" and model["owned_by"] == "skipdecode"
    r = httpx.get(url + "/v1/models/" + "nope" * 100)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.json()["error"]["message"]) < 200
    r = httpx.get(url + "/v2/anything")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"].startswith("method GET is not allowed")
    assert "POST" in r.headers["allow"]
    assert post(url, {"prompt": "ab", "model": "anything"}).json()["model"] == "fake"


def test_finish_reasons_are_openai_values_with_ours_under_skipdecode():
    gen = fake_engine(LetterCodec(), delay_s=0.02)
    with serve_in_thread(create_app(gen, Service(gen), ServeConfig(model_name="fake"))) as (url, _):
        rng = random.Random(1)
        for _ in range(20):  # a prompt whose greedy run ends with EOS
            prompt = [rng.randrange(3, VOCAB) for _ in range(3)]
            data = post(url, {"prompt": prompt, "max_tokens": 50, "timeout": 10}).json()
            if data["skipdecode"]["finish_reason"] == "eos":
                assert data["choices"][0]["finish_reason"] == "stop"
                break
        else:
            pytest.fail("no prompt ended with EOS")
        r = post(url, {"prompt": "ab", "max_tokens": 60, "ignore_eos": True, "timeout": 0.2})
        assert r.status_code == 400 and r.status_code not in RETRIED
        assert r.json()["error"]["type"] == "timeout_error" and r.headers["x-should-retry"] == "false"
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "prompt": "ab", "max_tokens": 60, "ignore_eos": True, "timeout": 0.2, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["skipdecode"]["finish_reason"] == "timeout"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_a_backend_failure_mid_stream_is_an_error_event():
    from .serving_fakes import FailingBackend

    gen = Generator(FailingBackend(fail_on=3), LetterCodec(), pad_token_id=1, eos_token_id=EOS, vocab_size=VOCAB)
    with serve_in_thread(create_app(gen, Service(gen), ServeConfig(model_name="fake"))) as (url, _):
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "prompt": "ab", "max_tokens": 20, "ignore_eos": True, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    failure = json.loads(events[-2])
    assert failure["error"]["type"] == "server_error" and "injected backend failure" in failure["error"]["message"]


def test_a_client_hanging_up_mid_body_is_counted_not_logged_as_a_server_error(served, caplog):
    url, service, _ = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "abc", "max_tokens": 4}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (len(body) + 500) + body)  # 500 bytes short
        time.sleep(0.2)  # the server is reading the body now
    deadline = time.monotonic() + 10
    counter = re.compile(r"^skipdecode_client_disconnects_before_body_total (\S+)$", re.M)
    while time.monotonic() < deadline:
        m = counter.search(httpx.get(url + "/metrics", timeout=10).text)
        if m and float(m.group(1)) == 1.0:
            break
        time.sleep(0.05)
    assert m and float(m.group(1)) == 1.0  # the hang-up reached the app (the check below means something)
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()], caplog.text
    assert service.stats().submitted == 0
    assert post(url, {"prompt": "abc", "max_tokens": 2}).status_code == 200  # the server serves on
