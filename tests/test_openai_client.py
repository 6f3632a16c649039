"""The official `openai` Python client against the server (a fake engine with a letter codec, on loopback):
plain and streamed completions, logprobs, echo with max_tokens 0, stream_options.include_usage, the models list.
The client never retries (max_retries=0), so every answer is the server's first."""

from __future__ import annotations

import math

import pytest

for _module in ("openai", "httpx", "starlette", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module, reason="needs the dev and serve extras: pip install -e .[dev,serve]")

import openai  # noqa: E402
from skipdecode.runtime.generator import Generator  # noqa: E402
from skipdecode.runtime.logprobs import log_softmax  # noqa: E402
from skipdecode.runtime.service import Service  # noqa: E402

from skipdecode.serve.app import create_app  # noqa: E402
from skipdecode.serve.config import ServeConfig  # noqa: E402

from .serving_fakes import EOS, VOCAB, FakeSlotBackend, serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class Letters:
    """Token t -> one letter; each character of a text -> one token."""

    def encode(self, text):
        return [3 + ord(c) % (VOCAB - 3) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.fixture(scope="module")
def client():
    backend = FakeSlotBackend()
    gen = Generator(backend, Letters(), pad_token_id=1, eos_token_id=EOS, vocab_size=VOCAB)
    with Service(gen) as service, serve_in_thread(create_app(gen, service, ServeConfig(model_name="fake"))) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30), backend


def test_plain_and_streamed_completions_agree(client):
    c, _ = client
    plain = c.completions.create(model="fake", prompt="hello", max_tokens=8, extra_body={"ignore_eos": True})
    assert plain.object == "text_completion" and len(plain.choices) == 1
    assert plain.choices[0].finish_reason == "length" and len(plain.choices[0].text) == 8
    assert plain.usage.prompt_tokens == 5 and plain.usage.completion_tokens == 8 and plain.usage.total_tokens == 13
    chunks = list(c.completions.create(model="fake", prompt="hello", max_tokens=8, stream=True,
                                       extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.total_tokens == 13
    assert all(ch.usage is None for ch in chunks[:-1])
    no_usage = list(c.completions.create(model="fake", prompt="hello", max_tokens=3, stream=True))
    assert all(ch.choices for ch in no_usage)


def test_logprobs_of_generated_tokens(client):
    c, backend = client
    r = c.completions.create(model="fake", prompt="hey", max_tokens=6, logprobs=3, extra_body={"ignore_eos": True})
    lp, prompt = r.choices[0].logprobs, Letters().encode("hey")
    ids = r.choices[0].model_extra["tokens"]
    assert lp.tokens == list(r.choices[0].text) and len(lp.token_logprobs) == 6
    assert lp.text_offset == list(range(3, 9))  # counted from the start of the prompt
    for i, tok in enumerate(ids):  # full depth: the fake's full-depth logits
        ls = log_softmax(backend.logits(prompt + ids[:i], list(range(backend.num_layers))))
        assert math.isclose(lp.token_logprobs[i], ls[tok], abs_tol=1e-9)
        assert len(lp.top_logprobs[i]) <= 3 and max(lp.top_logprobs[i].values()) == pytest.approx(ls.max())
    streamed = list(c.completions.create(model="fake", prompt="hey", max_tokens=6, logprobs=3, stream=True,
                                         extra_body={"ignore_eos": True}))
    blocks = [ch.choices[0].logprobs for ch in streamed if ch.choices[0].logprobs is not None]  # one per token
    assert [x for b in blocks for x in b.token_logprobs] == lp.token_logprobs
    assert [x for b in blocks for x in b.text_offset] == lp.text_offset


def test_echo_with_max_tokens_0_returns_the_scored_prompt(client):
    c, backend = client
    r = c.completions.create(model="fake", prompt="scored", max_tokens=0, echo=True, logprobs=1)
    prompt, lp = Letters().encode("scored"), r.choices[0].logprobs
    assert r.choices[0].text == "scored" and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == 6
    assert lp.text_offset == list(range(6))
    for i in range(1, 6):
        ls = log_softmax(backend.logits(prompt[:i], list(range(backend.num_layers))))
        assert math.isclose(lp.token_logprobs[i], ls[prompt[i]], abs_tol=1e-9)
    both = c.completions.create(model="fake", prompt="scored", max_tokens=4, echo=True, logprobs=0,
                                extra_body={"ignore_eos": True})
    assert both.choices[0].text.startswith("scored") and len(both.choices[0].text) == 10
    assert both.choices[0].logprobs.token_logprobs[:6] == lp.token_logprobs
    assert len(both.choices[0].logprobs.tokens) == 10 and both.choices[0].logprobs.top_logprobs[7] == {}
    echoed = list(c.completions.create(model="fake", prompt="scored", max_tokens=0, echo=True, stream=True,
                                       stream_options={"include_usage": True}))
    assert echoed[0].choices[0].text == "scored" and echoed[-1].usage.total_tokens == 6
    text_only = c.completions.create(model="fake", prompt="abc", max_tokens=0, echo=True)
    assert text_only.choices[0].text == "abc" and text_only.choices[0].logprobs is None


def test_models_list_and_errors_are_not_retried(client):
    c, _ = client
    assert [m.id for m in c.models.list()] == ["fake"]
    with pytest.raises(openai.BadRequestError, match="logprobs=9 is above the maximum 5"):
        c.completions.create(model="fake", prompt="x", max_tokens=2, logprobs=9)
    with pytest.raises(openai.BadRequestError, match="max_tokens=0 is below the minimum 1"):
        c.completions.create(model="fake", prompt="x", max_tokens=0)
