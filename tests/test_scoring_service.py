"""Prompt scoring (echo + logprobs) is ordinary service work: bounded by the queue, interleaved with decode steps a
chunk at a time, timed, cancelled when its caller gives up, and visible in the service's counts."""

from __future__ import annotations

import threading
import time

import pytest
from skipdecode.runtime.errors import OverloadedError, RequestTimeoutError
from skipdecode.runtime.logprobs import SCORE_CHUNK, log_softmax, score_prompt, top_k
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.service import Service, ServiceConfig

from .serving_fakes import fake_generator

LONG = [3 + (i * 7) % 40 for i in range(60)]  # 60 tokens: 1 prefill + 59 decode steps on the fake (no verify graph)


def test_a_request_gets_its_first_token_while_a_long_prompt_is_scored():
    """The scoring job advances one chunk per worker step: a request submitted while it runs gets its first token
    long before the scoring ends (it used to wait for the whole prompt)."""
    gen = fake_generator(delay_s=0.002)
    order: list[str] = []
    with Service(gen) as svc:
        future = svc.score(LONG, 1)
        future.add_done_callback(lambda f: order.append("scored"))
        while svc.stats().running == 0:  # the scoring job holds its slot
            time.sleep(0.001)
        handle = svc.submit([4, 4], GenerateOptions(max_new_tokens=3))
        next(iter(handle))
        order.append("first token")
        future.result(60)
        handle.result(60)
    assert order == ["first token", "scored"]


def test_scoring_counts_against_the_queue_limit_and_in_the_stats():
    gen = fake_generator(delay_s=0.005)
    with Service(gen, ServiceConfig(max_queue=2)) as svc:
        jobs = [svc.score(LONG, 0)]
        while svc.stats().running == 0:  # being scored: no longer waiting
            time.sleep(0.001)
        jobs += [svc.score(LONG, 0) for _ in range(2)]  # two waiting: the queue is full
        time.sleep(0.05)
        stats = svc.stats()
        assert stats.running >= 1 and stats.queue_depth == 2
        with pytest.raises(OverloadedError, match="the queue limit is 2"):
            svc.score(LONG, 0)
        with pytest.raises(OverloadedError):
            svc.submit([4, 4], GenerateOptions(max_new_tokens=2))  # requests and scoring share the one queue
        assert all(len(j.result(60)) == len(LONG) - 1 for j in jobs)
        assert svc.stats().queue_depth == 0 and svc.stats().running == 0


def test_scoring_past_its_timeout_fails_and_frees_its_slot():
    gen = fake_generator(delay_s=0.01)
    with Service(gen) as svc:
        with pytest.raises(RequestTimeoutError, match="timeout"):
            svc.score(LONG, 0, timeout_s=0.05).result(30)
        assert gen.backend.slots.num_free == gen.backend.max_batch


def test_a_cancelled_scoring_job_stops_and_frees_its_slot():
    """A client that hangs up cancels the Future (asyncio.wrap_future does): the job stops at its next chunk."""
    gen = fake_generator(delay_s=0.01)
    calls = []
    real = gen.backend.decode_rows

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    gen.backend.decode_rows = counting
    with Service(gen) as svc:
        future = svc.score(LONG, 0)
        while not calls:
            time.sleep(0.001)
        assert future.cancel()
        deadline = time.monotonic() + 30
        while gen.backend.slots.num_free < gen.backend.max_batch:  # dropped at its next chunk: slot given back
            assert time.monotonic() < deadline
            time.sleep(0.01)
        done = len(calls)
        time.sleep(0.3)
        assert len(calls) == done < len(LONG) - 2  # stopped early, and nothing runs any more


def test_scores_are_the_same_through_the_service_and_direct():
    gen = fake_generator()
    with Service(gen) as svc:
        threads_out = []
        t = threading.Thread(target=lambda: threads_out.append(svc.score(LONG, 3).result(60)))
        t.start()
        t.join(60)
    direct = score_prompt(gen.backend, LONG, 3)
    assert [(e.token, e.logprob, e.top) for e in threads_out[0]] == [(e.token, e.logprob, e.top) for e in direct]


def test_top_k_without_a_vocabulary_sort_keeps_order_and_ties():
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = log_softmax(rng.integers(0, 6, size=97).astype(np.float32))  # many ties
        k = int(rng.integers(1, 8))
        want = np.argsort(-x, kind="stable")[:k]  # largest first, ties by lower id
        assert top_k(x, k).tolist() == want.tolist()
    assert top_k(x, 0).tolist() == []


def test_chunks_cover_the_prompt_on_an_engine_with_a_verify_graph(engine_dir):
    """Engines with a verify graph score SCORE_CHUNK tokens per call; the result equals token-by-token decode
    steps (the fallback) within fp32 rounding."""
    from skipdecode.runtime.engine import Engine
    _, _, directory = engine_dir
    prompt = [2] + [5 + (i * 11) % 200 for i in range(2 * SCORE_CHUNK + 5)]
    with Engine.load(directory) as engine:
        be = engine.backend
        assert be.has_verify
        chunked = score_prompt(be, prompt, 2)
        type(be).has_verify = property(lambda self: False)  # the per-token fallback, as on engines without one
        try:
            stepped = score_prompt(be, prompt, 2)
        finally:
            del type(be).has_verify
    assert [e.token for e in chunked] == prompt[1:] == [e.token for e in stepped]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(chunked, stepped, strict=True)) < 1e-4


def test_scoring_bench_smoke(engine_dir, tmp_path):
    """The bench's ordinary request gets its first token while the scoring jobs are still running (steps shared)."""
    import json

    from skipdecode.bench import scoring_bench
    out = tmp_path / "scoring.json"
    assert scoring_bench.main(["--engine", str(engine_dir[2]), "--scorers", "2", "--score-prompt", "60",
                               "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert all(report["medians"][k] > 0 for k in ("idle_ttft_ms", "chunk_ms", "loaded_ttft_ms"))
    assert report["rounds"][0]["scoring_jobs_pending"] >= 1
