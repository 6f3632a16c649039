"""Chunked prefill: a long prompt is prefilled over several steps, at most `max_prefill_tokens` prompt tokens per
step, while running requests keep decoding.

Checks: the scheduler's chunk plans (budget, FIFO, short prompts never split, prompts in progress first); on a fake
backend that checks every K/V read, chunked runs equal solo runs (greedy, seeded sampling, SkipDecode, lossless) as a
property over random arrivals and budgets; running requests get a token in every step of a long prompt's prefill and
never wait for more than the budget's prompt tokens between two of their tokens (negative control: without chunking
the same check fails); on real engines of both OPT styles, chunked K/V and logits equal a one-call prefill's and a
service's tokens with chunking equal those without it and the PyTorch reference's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skipdecode.runtime.batcher import Batcher, prepare_request
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.kv import SlotTable
from skipdecode.runtime.request import FinishEvent, GenerateOptions, TokenEvent
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerError, SeqSpec
from skipdecode.runtime.service import DEFAULT_MAX_PREFILL_TOKENS, Service, ServiceConfig

from .serving_fakes import EOS, VOCAB, fake_generator, solo


def chunked(budget: int, max_batch: int = 4, tokens: int = 10_000) -> SchedulerConfig:
    return SchedulerConfig(max_batch, tokens, budget, chunked_prefill=True)


def chunks_of(plan):
    return [(c.request_id, c.start, c.stop) for c in plan.prefills]


# -- the plans --------------------------------------------------------------------------------------------------------
def test_a_long_prompt_is_split_into_budget_sized_chunks_while_running_rows_decode():
    s = Scheduler(chunked(8), SlotTable(4))
    s.submit(SeqSpec(0, 3, (6,) * 10))
    plan = s.plan()
    assert chunks_of(plan) == [(0, 0, 3)] and not plan.rows  # a short prompt: one chunk, the whole prompt
    s.commit(plan, finished=[])
    s.submit(SeqSpec(1, 20, (6,) * 4))
    seen = []
    for _ in range(3):
        plan = s.plan()
        assert [r.request_id for r in plan.rows] == [0]  # the running row decodes in every step of the prefill
        seen += chunks_of(plan)
        s.commit(plan, finished=[])
    assert seen == [(1, 0, 8), (1, 8, 16), (1, 16, 20)]
    assert [r.request_id for r in s.plan().rows] == [0, 1]  # prefilled: it decodes from the next step on


def test_prompts_in_progress_go_first_and_prompts_that_fit_a_step_are_never_split():
    s = Scheduler(chunked(8), SlotTable(4))
    for rid, p in enumerate((20, 5, 3)):
        s.submit(SeqSpec(rid, p, (6,) * 4))
    seen = []
    for _ in range(4):
        plan = s.plan()
        seen.append(chunks_of(plan))
        s.commit(plan, finished=[])
    # step 3 has 4 tokens left after request 0's last chunk: request 1 (5 tokens) waits for step 4 instead of being
    # split, and request 2 does not overtake it (FIFO)
    assert seen == [[(0, 0, 8)], [(0, 8, 16)], [(0, 16, 20)], [(1, 0, 5), (2, 0, 3)]]


def test_a_long_prompt_starts_with_what_is_left_of_a_step():
    s = Scheduler(chunked(8), SlotTable(4))
    s.submit(SeqSpec(0, 3, (6,)))
    s.submit(SeqSpec(1, 11, (6,)))
    plan = s.plan()
    assert chunks_of(plan) == [(0, 0, 3), (1, 0, 5)] and plan.prefill_tokens == 8


def test_chunk_plans_are_checked():
    with pytest.raises(InputError, match="chunked_prefill needs max_prefill_tokens"):
        SchedulerConfig(2, 100, None, chunked_prefill=True)
    s = Scheduler(chunked(4, max_batch=2), SlotTable(2))
    s.submit(SeqSpec(0, 10, (6,)))
    plan = s.plan()
    s.commit(plan, finished=[])
    with pytest.raises(SchedulerError, match="has 4 prompt tokens prefilled, plan fed \\[0, 4\\)"):
        s.commit(plan, finished=[])  # the same chunk twice


# -- the batcher on a fake backend that checks every K/V read ----------------------------------------------------------
def run(gen, cfg, requests):
    """requests: [(arrival step, prompt, opts)] -> ({id: (tokens, budgets, finish_reason)}, [StepResult])."""
    be, b = gen.backend, Batcher(gen.backend, cfg)
    out = {i: ([], [], None) for i in range(len(requests))}
    results, step = [], 0
    while step == 0 or not b.idle or any(a >= step for a, _, _ in requests):
        for i, (arrival, prompt, opts) in enumerate(requests):
            if arrival == step:
                b.add(prepare_request(i, prompt, opts, be, gen.vocab_size))
        res = b.step()
        results.append(res)
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                out[ev.request_id][0].append(ev.token)
                out[ev.request_id][1].append(ev.budget)
            elif isinstance(ev, FinishEvent):
                out[ev.request_id] = (*out[ev.request_id][:2], ev.reason)
        step += 1
        assert step < 10_000, "the batcher did not drain"
    return out, results


def solo_verify(prompt, opts, **kw):
    return solo(prompt, opts, verify=True, **kw)


def long_requests(seed, n=8, max_length=128):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        p = int(rng.integers(1, 90))
        new = int(rng.integers(1, min(24, max_length - p)))
        lossless = i % 4 == 3
        sampling = SamplingParams(0.9, 10, 0.95, seed=i) if i % 2 else SamplingParams()
        opts = GenerateOptions(max_new_tokens=new, speedup=None if lossless else [None, 2.0, 3.0][i % 3],
                               sampling=sampling, lossless=lossless, eos_token_id=EOS if i % 4 else None)
        reqs.append((int(rng.integers(0, 12)), [int(t) for t in rng.integers(3, VOCAB, p)], opts))
    return reqs


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 40), strategy=st.sampled_from(["gate", "group"]),
       max_batch=st.integers(1, 4))
def test_property_chunked_runs_equal_solo_runs(seed, budget, strategy, max_batch):
    reqs = long_requests(seed)
    cfg = SchedulerConfig(max_batch, 4 * 128, budget, strategy, chunked_prefill=True)
    out, results = run(fake_generator(verify=True, max_length=128), cfg, reqs)
    for i, (_, prompt, opts) in enumerate(reqs):
        assert out[i] == solo_verify(prompt, opts, max_length=128), i
    assert max(r.prefill_tokens for r in results) <= budget  # so prompts longer than the budget were chunked
    assert sum(r.prefill_tokens for r in results) == sum(len(p) for _, p, _ in reqs)


STREAM = GenerateOptions(max_new_tokens=80, eos_token_id=None)
LONG_PROMPT = list(range(3, 47)) * 2 + [5] * 12  # 100 tokens


def streams_during_a_long_prefill(budget: int | None, chunk: bool):
    """4 streams run; at step 3 a 100-token prompt arrives. -> (the steps from its arrival to its first token, as
    (stream tokens per request, prompt tokens fed), the backend's calls over those steps, every output)."""
    gen = fake_generator(verify=True, max_batch=5, max_length=128)
    reqs = [(0, [3 + i, 9, 4], STREAM) for i in range(4)] + [(3, LONG_PROMPT, GenerateOptions(max_new_tokens=8))]
    cfg = SchedulerConfig(5, 5 * 128, budget, chunked_prefill=chunk)
    out, results = run(gen, cfg, reqs)
    first = next(i for i, r in enumerate(results) if any(isinstance(e, TokenEvent) and e.request_id == 4
                                                         for e in r.events))
    steps = [({rid: sum(isinstance(e, TokenEvent) and e.request_id == rid for e in r.events) for rid in range(4)},
              r.prefill_tokens) for r in results[3: first + 1]]
    return steps, gen.backend.log, out, reqs


def check_call_log(log, budget: int, slots=range(4)) -> None:
    """In the backend's own call log, none of `slots` waits for more than `budget` prompt tokens (prefill and verify
    calls) between two of its decode calls, from its first decode call on."""
    between: dict[int, int] = {}
    for kind, what in log:
        if kind == "decode":
            for slot in what & set(slots):
                assert between.get(slot, 0) <= budget, f"slot {slot} waited for {between[slot]} prompt tokens"
                between[slot] = 0
        else:
            fed = what if kind == "prefill" else sum(what.values())
            between = {slot: n + fed for slot, n in between.items()}


def check_streams_keep_decoding(steps, log, budget: int) -> None:
    """While the long prompt is prefilled, every step gives every stream one token and prefills at most `budget`
    prompt tokens, and the call log agrees (`check_call_log`)."""
    assert len(steps) >= math.ceil(len(LONG_PROMPT) / budget), f"the prefill took {len(steps)} steps"
    for tokens, fed in steps:
        assert all(n == 1 for n in tokens.values()), tokens
        assert fed <= budget, f"a step prefilled {fed} prompt tokens"
    check_call_log(log, budget)


def test_running_requests_get_a_token_in_every_step_of_a_long_prefill():
    steps, log, out, reqs = streams_during_a_long_prefill(8, chunk=True)
    check_streams_keep_decoding(steps, log, 8)
    assert len(steps) == math.ceil(100 / 8)  # 12 steps of 8 tokens and one of 4
    for i, (_, prompt, opts) in enumerate(reqs):
        assert out[i] == solo_verify(prompt, opts, max_batch=5, max_length=128), i


@pytest.mark.parametrize("budget", [8, None])
def test_negative_control_without_chunking_the_streams_wait_for_the_whole_prefill(budget):
    # no chunking: the long prompt is admitted alone (budget 8) or with no limit, and prefilled in one call
    steps, log, out, _ = streams_during_a_long_prefill(budget, chunk=False)
    with pytest.raises(AssertionError, match="the prefill took 1 steps"):
        check_streams_keep_decoding(steps, log, 8)
    with pytest.raises(AssertionError, match="waited for 100 prompt tokens"):
        check_streams_keep_decoding([({}, 0)] * 13, log, 8)  # the call log alone catches it too


def test_the_service_chunks_by_default_where_the_backend_can():
    assert ServiceConfig().max_prefill_tokens == DEFAULT_MAX_PREFILL_TOKENS
    gen = fake_generator(verify=True, max_batch=5, max_length=128)
    with Service(gen, ServiceConfig(max_prefill_tokens=16)) as svc:
        assert svc._sched_config.chunked_prefill
        streams = [svc.submit([3 + i, 9, 4], STREAM) for i in range(4)]
        for h in streams:  # every stream is decoding before the long prompt comes
            next(iter(h))
        long = svc.submit(LONG_PROMPT, GenerateOptions(max_new_tokens=8))
        outs = [h.result(30) for h in (*streams, long)]
        assert svc.stats().prefill_tokens == 4 * 3 + len(LONG_PROMPT)
    check_call_log(gen.backend.log, 16)
    assert any(kind == "verify" for kind, _ in gen.backend.log)  # the prompt was chunked
    ref = fake_generator(verify=True, max_batch=5, max_length=128)
    for h, o in zip((*streams, long), outs, strict=True):
        r = ref.generate([list(h.prompt)], STREAM if h is not long else GenerateOptions(max_new_tokens=8))[0]
        assert list(o.tokens) == r.tokens
    # a backend without a verify pass prefills in one call (one decode step per prompt token would cost more)
    with Service(fake_generator(), ServiceConfig(max_prefill_tokens=16)) as svc:
        assert not svc._sched_config.chunked_prefill
    with Service(gen, ServiceConfig(max_prefill_tokens=None)) as svc:
        assert not svc._sched_config.chunked_prefill


def test_the_serve_option_defaults_to_the_service_and_0_means_no_limit():
    from skipdecode.serve.config import ServeConfig
    assert ServeConfig().max_prefill_tokens == DEFAULT_MAX_PREFILL_TOKENS
    assert ServeConfig(max_prefill_tokens=0).max_prefill_tokens == 0
    with pytest.raises(InputError, match="max_prefill_tokens=-1 is below the minimum 0"):
        ServeConfig(max_prefill_tokens=-1)
    with pytest.raises(InputError, match="max_prefill_tokens=0 is below the minimum 1"):
        ServiceConfig(max_prefill_tokens=0)


# -- real engines, both OPT styles -------------------------------------------------------------------------------------


def test_feeding_after_a_partial_prefill_equals_a_one_call_prefill(engine_dir):
    from skipdecode.runtime.engine import Engine
    style, _, out = engine_dir
    with Engine.load(out) as engine:
        be = engine.backend
        assert be.chunked_prefill
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, 90)]
        slots = be.slots.allocate(3)
        one = be.prefill_rows([prompt], [slots[0]])[0]
        be.prefill_rows([prompt[:20]], [slots[1]])
        got = be.feed(slots[1], prompt[20:])  # 70 tokens: five verify calls
        be.rewind([slots[1]], [40])
        np.testing.assert_allclose(be.feed(slots[1], prompt[40:], last_only=True), got[-1:], atol=1e-4)
        be.prefill_rows([prompt[:37]], [slots[2]])
        type(be).has_verify = property(lambda self: False)  # the per-token fallback of backends without verify
        try:
            assert not be.chunked_prefill
            fallback = be.feed(slots[2], prompt[37:])
        finally:
            del type(be).has_verify
        assert got.shape == (70, be.vocab_size) and be.slots.lengths[slots].tolist() == [90] * 3
        np.testing.assert_allclose(got[-1], one, atol=1e-4)
        np.testing.assert_allclose(fallback[-1], one, atol=1e-4)
        for layer in range(be.num_layers):
            k, v = be.kv.read(layer)
            for s in slots[1:]:
                np.testing.assert_allclose(k[s, :, :90], k[slots[0], :, :90], atol=1e-5, err_msg=style)
                np.testing.assert_allclose(v[s, :, :90], v[slots[0], :, :90], atol=1e-5, err_msg=style)
        with pytest.raises(InputError, match="tokens to feed=0"):
            be.feed(slots[0], [])
        be.lossless_refusal = "quantized"  # an engine whose verify pass rounds differently prefills in one call
        assert not be.chunked_prefill
        be.lossless_refusal = None
        graphs = be.manifest.graphs
        object.__setattr__(be.manifest, "graphs", [g for g in graphs if g.kind != "verify_row"])
        try:
            assert be.has_verify and not be.chunked_prefill  # matmul engines: no one-row in-place verify graph
        finally:
            object.__setattr__(be.manifest, "graphs", graphs)


def test_a_quantized_engine_prefills_in_one_call():
    from .serving_fakes import FakeVerifyBackend
    be = FakeVerifyBackend()
    assert be.chunked_prefill
    be.lossless_refusal = "int8 rounds differently"
    assert not be.chunked_prefill


OPTIONS = [GenerateOptions(max_new_tokens=14),
           GenerateOptions(max_new_tokens=12, sampling=SamplingParams(0.9, 20, 0.95, seed=4)),
           GenerateOptions(max_new_tokens=16, speedup=2.0),
           GenerateOptions(max_new_tokens=12, speedup=3.0, sampling=SamplingParams(0.8, 0, 0.9, seed=7)),
           GenerateOptions(max_new_tokens=14, lossless=True),
           GenerateOptions(max_new_tokens=12, lossless=True, sampling=SamplingParams(0.9, 0, 1.0, seed=2))]


def serve_all(generator, budget, prompts):
    """Streams first, then the long prompts among them; -> [(tokens, budgets, finish_reason)] and the feeds made."""
    be, fed = generator.backend, []
    feed = be.feed

    def counting_feed(slot, tokens, **kw):
        fed.append(len(tokens))
        return feed(slot, tokens, **kw)

    be.feed = counting_feed
    try:
        with Service(generator, ServiceConfig(max_prefill_tokens=budget)) as svc:
            handles = [svc.submit(p, OPTIONS[i % len(OPTIONS)]) for i, p in enumerate(prompts)]
            out = [h.result(120) for h in handles]
    finally:
        del be.feed
    return [(list(o.tokens), list(o.budgets), o.finish_reason) for o in out], fed


def test_served_tokens_are_the_same_with_and_without_chunking_and_equal_the_reference(engine_dir):
    from skipdecode.export.torch_generator import TorchGenerator
    from skipdecode.runtime.engine import Engine
    style, ckpt, out = engine_dir
    rng = np.random.default_rng(3)
    lengths = [5, 100, 9, 90, 3, 110]  # short streams and long prompts, every kind of request above
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in lengths]
    with Engine.load(out) as engine:
        chunked_out, fed = serve_all(engine, 20, prompts)  # 20: a 16-column verify call and a 4-column one
        whole_out, fed_whole = serve_all(engine, None, prompts)
    assert fed and max(fed) == 20 and not fed_whole  # chunks really ran, and only with chunking
    assert chunked_out == whole_out, style
    ref = TorchGenerator.load(str(ckpt))
    for i, p in enumerate(prompts):
        r = ref.generate([p], OPTIONS[i % len(OPTIONS)])[0]
        assert chunked_out[i] == (r.tokens, r.budgets, r.finish_reason), (style, i)


def test_prefill_bench_smoke(engine_dir, tmp_path):
    import json

    from skipdecode.bench import prefill_bench
    out = tmp_path / "prefill.json"
    assert prefill_bench.main(["--engine", str(engine_dir[2]), "--budgets", "0,16", "--rounds", "1", "--streams", "2",
                               "--stream-new-tokens", "60", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["medians"]
    assert [r["budget"] for r in rows] == [0, 16] and all(r["itl_max_ms"] > 0 for r in rows)
    assert rows[1]["stream_tokens"] >= 120 // 16  # the streams kept decoding through the chunks
