"""Lossless mode (self-speculative decoding): shallow bucket graphs draft, the verify graph checks at full depth.

Greedy output must be token-identical to full-depth decoding whatever the draft depth, the draft length, the batch
and the other requests sharing the steps; sampled output must follow the full-depth distribution. The negative
controls show the checks can fail: without the verifier the output changes, and the draft's own distribution fails
the statistical test.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skipdecode.export.exporter import ExportConfig, export  # noqa: E402
from skipdecode.export.random_models import build_random_opt  # noqa: E402
from skipdecode.export.reference import TorchReference  # noqa: E402
from skipdecode.runtime import batcher as batcher_module  # noqa: E402
from skipdecode.runtime.engine import Engine  # noqa: E402
from skipdecode.runtime.errors import EngineError, InputError  # noqa: E402
from skipdecode.runtime.generator import Generator  # noqa: E402
from skipdecode.runtime.request import GenerateOptions, TokenEvent, draft_bucket  # noqa: E402
from skipdecode.runtime.sampling import SamplingParams  # noqa: E402
from skipdecode.runtime.scheduler import Draft, Scheduler, SchedulerConfig, SchedulerError, SeqSpec  # noqa: E402
from skipdecode.runtime.service import Service  # noqa: E402
from skipdecode.runtime.speculative import Acceptance  # noqa: E402

from .conftest import PROMPTS  # noqa: E402

KJV_PROMPTS = ["And God said unto Moses,", "In the beginning", "Blessed are the poor in spirit: for",
               "And it came to pass"]


def full_and_lossless(engine, prompts, max_new, **lossless):
    full = engine.generate(prompts, GenerateOptions(max_new_tokens=max_new))
    fast = engine.generate(prompts, GenerateOptions(max_new_tokens=max_new, lossless=True, **lossless))
    return full, fast


@pytest.mark.parametrize("draft_tokens,draft_speedup", [(1, 2.0), (3, 3.0), (4, 5.0), (7, 2.0), (15, 3.0)])
def test_greedy_is_token_identical_to_full_depth_on_random_models(engine_dir, draft_tokens, draft_speedup):
    style, _, out = engine_dir
    engine = Engine.load(out)
    full, fast = full_and_lossless(engine, PROMPTS, 20, draft_tokens=draft_tokens, draft_speedup=draft_speedup)
    for f, g in zip(full, fast, strict=True):
        assert g.tokens == f.tokens, style
        assert g.budgets == [engine.backend.num_layers] * len(g.tokens)  # every token from the full model
        assert g.finish_reason == f.finish_reason
        assert 0 <= g.accepted <= g.drafted and g.drafted > 0


@pytest.mark.parametrize("draft_tokens,draft_speedup", [(2, 2.0), (4, 3.0), (6, 5.0)])
def test_greedy_is_token_identical_on_the_skip_tuned_model(kjv_engine, draft_tokens, draft_speedup):
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS]
    full, fast = full_and_lossless(kjv_engine, prompts, 40, draft_tokens=draft_tokens, draft_speedup=draft_speedup)
    assert [g.tokens for g in fast] == [f.tokens for f in full]
    rates = [g.accepted / g.drafted for g in fast]
    assert all(0 < r < 1 for r in rates), rates  # rounds accepted some drafts and rejected others
    assert sum(g.accepted for g in fast) > 0


def test_the_static_stream_emits_every_accepted_token_in_order(kjv_engine):
    """A lossless round emits several tokens of a row at once: each is its own event, numbered in order."""
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS[:2]]
    opts = GenerateOptions(max_new_tokens=30, lossless=True, draft_tokens=4)
    rows: list[list[int]] = [[], []]
    finished = []
    for ev in kjv_engine.stream(prompts, opts):
        if isinstance(ev, TokenEvent):
            assert ev.index == len(rows[ev.request_id]) and ev.request_id not in finished
            rows[ev.request_id].append(ev.token)
        else:
            finished.append(ev.request_id)
            assert ev.reason == "length" and ev.accepted <= ev.drafted
    assert sorted(finished) == [0, 1]
    assert rows == [g.tokens for g in kjv_engine.generate(prompts, GenerateOptions(max_new_tokens=30))]


def test_negative_control_without_the_verifier_the_output_changes(kjv_engine, monkeypatch):
    """Accept every draft (no check): the output must differ from full depth, so the identity above means
    something."""
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS]

    def accept_all(drafts, probs, p, sampler):
        return Acceptance(tuple(drafts), int(np.argmax(p[len(drafts)])), True)

    monkeypatch.setattr(batcher_module, "speculative_accept", accept_all)
    full, fast = full_and_lossless(kjv_engine, prompts, 40, draft_tokens=4, draft_speedup=5.0)
    assert [g.tokens for g in fast] != [f.tokens for f in full]


def test_continuous_batching_mixes_lossless_skipdecode_and_full_depth_requests(kjv_engine):
    """Requests of all three kinds share steps (and slots) in one Service; each equals its solo generation."""
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS]
    kinds = [GenerateOptions(max_new_tokens=24, lossless=True, draft_tokens=3),
             GenerateOptions(max_new_tokens=17, speedup=2.0),
             GenerateOptions(max_new_tokens=31, lossless=True, draft_tokens=6, draft_speedup=5.0),
             GenerateOptions(max_new_tokens=12)]
    jobs = [(prompts[i % 4], kinds[(i * 3) % 4]) for i in range(10)]
    with Service(kjv_engine) as svc:
        handles = [svc.submit(p, o) for p, o in jobs]
        results = [h.result(60) for h in handles]
        stats = svc.stats()
    for (prompt, opts), res in zip(jobs, results, strict=True):
        solo = kjv_engine.generate([prompt], opts)[0]
        assert list(res.tokens) == solo.tokens
        if opts.lossless:
            assert res.drafted > 0 and 0 <= res.accepted <= res.drafted
            full = kjv_engine.generate([prompt], GenerateOptions(max_new_tokens=opts.max_new_tokens))[0]
            assert list(res.tokens) == full.tokens
    assert stats.draft_tokens == sum(r.drafted for r in results)
    assert stats.accepted_draft_tokens == sum(r.accepted for r in results)


def test_stop_tokens_and_length_limits_cut_a_round(kjv_engine):
    prompt = kjv_engine.encode(KJV_PROMPTS[0])
    full = kjv_engine.generate([prompt], GenerateOptions(max_new_tokens=40))[0]
    stop = full.tokens[9]  # a token the full model emits as its 10th
    first = full.tokens.index(stop)
    for n in (1, 2, 5, 13):
        opts = GenerateOptions(max_new_tokens=n, lossless=True, draft_tokens=6, stop_token_ids=(stop,))
        got = kjv_engine.generate([prompt], opts)[0]
        want = full.tokens[: min(n, first + 1)]
        assert got.tokens == want
        assert got.finish_reason == ("stop" if len(want) == first + 1 else "length")


def test_engine_logprobs_in_lossless_mode_are_the_full_models(kjv_engine):
    prompt = kjv_engine.encode(KJV_PROMPTS[1])
    with Service(kjv_engine) as svc:
        full = svc.generate(prompt, GenerateOptions(max_new_tokens=12, logprobs=2))
        fast = svc.generate(prompt, GenerateOptions(max_new_tokens=12, logprobs=2, lossless=True, draft_tokens=5))
    assert fast.tokens == full.tokens
    for a, b in zip(fast.logprobs, full.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


# -- sampling: the output distribution is the full model's --------------------------------------------------------

VOCAB = 6


@pytest.fixture(scope="module")
def small_vocab():
    """A 6-token model whose shallow buckets disagree with full depth (draft != target distribution)."""
    model = build_random_opt("tiny-preln", seed=3, init_std=0.08, vocab_size=VOCAB).eval()
    return model


def exact_pair_distribution(model, prompt, temperature):
    """P(token 2, token 3) of full-depth sampling (token 1 marginalised), from uncached forward passes."""
    def probs(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].double()
        return torch.softmax(logits / temperature, -1).numpy()

    p1 = probs(prompt)
    out = np.zeros((VOCAB, VOCAB))
    for a in range(VOCAB):
        p2 = probs(prompt + [a])
        for b in range(VOCAB):
            out[b] += p1[a] * p2[b] * probs(prompt + [a, b])  # out[b, c] = sum_a P(a) P(b | a) P(c | a, b)
    return out


def sampled_pairs(gen, prompt, opts, n):
    counts = np.zeros((VOCAB, VOCAB))
    batch = gen.backend.max_batch
    for start in range(0, n, batch):
        for g in gen.generate([prompt] * batch, replace(opts, sampling=SamplingParams(1.0, seed=start))):
            counts[g.tokens[1], g.tokens[2]] += 1
    return counts


def chi2_pvalue(counts, expected_p):
    from scipy.stats import chisquare
    n = counts.sum()
    keep = expected_p.reshape(-1) * n >= 5  # the usual validity condition; the rest pooled
    obs = np.append(counts.reshape(-1)[keep], counts.reshape(-1)[~keep].sum())
    exp = np.append(expected_p.reshape(-1)[keep] * n, expected_p.reshape(-1)[~keep].sum() * n)
    return chisquare(obs[exp > 0], exp[exp > 0]).pvalue


def test_speculative_sampling_matches_the_full_depth_distribution(small_vocab, tmp_path):
    """4000 sampled continuations (temperature 1) per mode, float and int8 drafts. Tokens 2 and 3 come from lossless
    rounds (token 1 is the prefill's). Their joint frequencies must fit the exact full-depth distribution:
    chi-square p-value above 1e-3 (a correct sampler fails this 1 time in 1000). The negative control, the draft
    model's own sampling, must fail it."""
    small_vocab.save_pretrained(tmp_path / "ckpt")
    export(ExportConfig(lossless_policy="default",
                        model=str(tmp_path / "ckpt"), out=tmp_path / "eng", speedups=(3.0,), max_batch=50,
                       max_length=16), progress=False)
    engine = Engine.load(tmp_path / "eng")
    prompt = [2, 4, 3]
    exact = exact_pair_distribution(small_vocab.float(), prompt, 1.0)
    assert exact.sum() == pytest.approx(1.0)
    # 4 tokens: the prefill's, then a round of 2 drafts covering tokens 2-4 (the pair is drawn inside one round)
    lossless = GenerateOptions(max_new_tokens=4, lossless=True, draft_tokens=2, draft_speedup=3.0)
    counts = sampled_pairs(engine, prompt, lossless, 4000)
    assert chi2_pvalue(counts, exact) > 1e-3
    # the engine's int8 drafts (sampled requests draft float unless asked: runtime/request.py draft_quantized)
    assert engine.backend.draft_buckets
    int8 = sampled_pairs(engine, prompt, replace(lossless, draft_weights="quantized"), 4000)
    assert chi2_pvalue(int8, exact) > 1e-3 and not np.array_equal(int8, counts)
    draft = draft_bucket(engine.backend.num_layers, engine.backend.buckets, 3.0)
    shallow = GenerateOptions(max_new_tokens=4, max_layers=draft, min_layers=draft)
    assert chi2_pvalue(sampled_pairs(engine, prompt, shallow, 4000), exact) < 1e-3


# -- the slot API, the scheduler and the options ------------------------------------------------------------------

def test_verify_rows_and_rewind_match_the_reference_and_check_their_input(engine_dir):
    style, _, out = engine_dir
    model = build_random_opt(style, seed=0, init_std=0.15)  # the engine's checkpoint (tests/conftest.py)
    backend = Engine.load(out).backend
    ref = TorchReference(model, max_batch=backend.max_batch)
    prompts = [[2, 5, 7, 9], [2, 3], [2, 4, 6, 8, 10, 12]]
    for be in (backend, ref):
        slots = be.slots.allocate(3)
        be.prefill_rows(prompts, slots)
        be.decode_rows([0, 2], np.array([5, 6]), 2, np.ones((2, 2), dtype=bool))  # a shallow draft column
        be.rewind([0, 2], [4, 6])
    tokens = np.array([[11, 12, 13], [21, 22, 23]])
    got = backend.verify_rows([0, 2], tokens)[[0, 2]]
    want = ref.verify_rows([0, 2], tokens)[[0, 2]]
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert backend.slots.lengths[:3].tolist() == [7, 2, 9]
    with pytest.raises(InputError, match="length of slot 0"):
        backend.rewind([0], [8])  # longer than it holds
    with pytest.raises(InputError, match="verify tokens per row"):
        backend.verify_rows([1], np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(InputError, match="one row per distinct slot"):
        backend.verify_rows([1, 1], np.zeros((2, 2), dtype=np.int64))


def test_lossless_options_are_checked():
    with pytest.raises(InputError, match="full depth"):
        GenerateOptions(max_new_tokens=4, lossless=True, speedup=2.0)
    with pytest.raises(InputError, match="lossless decoding only"):
        GenerateOptions(max_new_tokens=4, draft_tokens=3)
    with pytest.raises(InputError, match="draft_tokens"):
        GenerateOptions(max_new_tokens=4, lossless=True, draft_tokens=16)
    with pytest.raises(InputError, match="draft_speedup"):
        GenerateOptions(max_new_tokens=4, lossless=True, draft_speedup=1.0)
    with pytest.raises(InputError, match="exports only"):
        draft_bucket(12, (12,), 3.0)
    assert draft_bucket(12, (1, 2, 3, 4, 6, 12), 3.0) == 4
    assert draft_bucket(12, (1, 2, 3, 4, 6, 12), 5.0) == 3
    assert draft_bucket(12, (5, 12), 20.0) == 5  # the shallowest exported one


def test_scheduler_lossless_rounds_shrink_at_the_end_and_commit_checks_counts():
    from skipdecode.runtime.kv import SlotTable
    sched = Scheduler(SchedulerConfig(max_batch=2, max_tokens_in_flight=100), SlotTable(2))
    sched.submit(SeqSpec(7, 3, (12,) * 5, draft=Draft(4, 4, auto=False)))  # 6 tokens: the prefill's, 5 in rounds
    plan = sched.plan()
    sched.commit(plan, ())
    plan = sched.plan()
    (row,) = plan.speculative
    assert (row.drafts, row.column, row.draft_bucket) == (4, 3, 4)
    with pytest.raises(SchedulerError, match="emitted 6 tokens"):
        sched.commit(plan, (), {7: 6})
    sched.commit(plan, (), {7: 3})  # 3 of 5 left tokens: 2 remain, so at most 1 draft
    plan = sched.plan()
    assert plan.speculative[0].drafts == 1
    sched.commit(plan, (), {7: 1})
    plan = sched.plan()  # one token left: a plain full-depth decode row, no drafting
    assert not plan.speculative and plan.rows[0].bucket == 12


@pytest.mark.parametrize("limit, auto, shared, alone, together", [
    (1, True, True, 1, 0), (2, True, True, 1, 2), (0, True, True, 0, 0), (1, False, False, 1, 2),
    (1, True, False, 1, 2), (0, True, False, 1, 2)])
def test_automatic_drafting_only_in_steps_with_few_lossless_rows(limit, auto, shared, alone, together):
    """Without an explicit draft length, greedy lossless rows (`shared`) speculate only while a step has at most
    max_speculative_rows of them; the others decode at full depth (the same tokens, no verify pass). Sampled rows
    decide alone (their tokens depend on their rounds). `alone`, `together`: speculating rows with one lossless
    request running, then with two."""
    from skipdecode.runtime.kv import SlotTable
    sched = Scheduler(SchedulerConfig(max_batch=3, max_tokens_in_flight=100, max_speculative_rows=limit),
                      SlotTable(3))
    sched.submit(SeqSpec(1, 3, (12,) * 9, draft=Draft(4, 4, auto=auto, shared=shared)))
    sched.submit(SeqSpec(2, 3, (6,) * 9))  # a SkipDecode request
    sched.commit(sched.plan(), ())  # both prefilled
    plan = sched.plan()
    assert len(plan.speculative) == alone
    assert sorted(r.bucket for r in plan.rows) == ([6] if alone else [6, 12])
    sched.submit(SeqSpec(3, 3, (12,) * 9, draft=Draft(4, 4, auto=auto, shared=shared)))
    sched.commit(plan, (), {r.request_id: 2 for r in plan.speculative})  # one draft accepted: no backoff
    plan = sched.plan()  # request 3 is prefilled in this step
    sched.commit(plan, (), {r.request_id: 2 for r in plan.speculative})
    plan = sched.plan()
    assert len(plan.speculative) == together and len(plan.rows) == 3 - together


def test_a_batch_of_lossless_rows_without_a_draft_length_decodes_at_full_depth_speed_path(kjv_engine):
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS[:3]]
    auto = kjv_engine.generate(prompts, GenerateOptions(max_new_tokens=12, lossless=True))
    assert [g.drafted for g in auto] == [0, 0, 0]  # three lossless rows per step: no drafting by default
    full = kjv_engine.generate(prompts, GenerateOptions(max_new_tokens=12))
    assert [g.tokens for g in auto] == [g.tokens for g in full]
    alone = kjv_engine.generate(prompts[:1], GenerateOptions(max_new_tokens=12, lossless=True))[0]
    assert alone.drafted > 0 and alone.tokens == full[0].tokens


def test_an_engine_without_a_verify_graph_refuses_lossless_with_a_clear_error(kjv_engine, monkeypatch):
    monkeypatch.setattr(type(kjv_engine.manifest), "verify", lambda self: None)
    with pytest.raises(EngineError, match="no verify graph"):
        kjv_engine.generate([[2, 5]], GenerateOptions(max_new_tokens=4, lossless=True))
    assert kjv_engine.backend.slots.num_free == kjv_engine.backend.max_batch  # nothing leaked


def test_the_reference_backend_runs_lossless_mode_too(tiny_model):
    style, model = tiny_model
    ref = TorchReference(model, max_batch=3)
    gen = Generator(ref, None, 1, None, model.config.vocab_size)
    full = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=10))
    fast = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=10, lossless=True, draft_tokens=3))
    assert [g.tokens for g in fast] == [f.tokens for f in full], style


def test_draft_lengths_and_depths_all_agree_on_one_batch(kjv_engine):
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS[:3]]
    want = [g.tokens for g in kjv_engine.generate(prompts, GenerateOptions(max_new_tokens=20))]
    for k, s in itertools.product((1, 2, 8), (2.0, 5.0)):
        opts = GenerateOptions(max_new_tokens=20, lossless=True, draft_tokens=k, draft_speedup=s)
        assert [g.tokens for g in kjv_engine.generate(prompts, opts)] == want, (k, s)


# -- over HTTP -----------------------------------------------------------------------------------------------------

def test_http_lossless_requests_equal_full_depth_and_report_acceptance(kjv_engine):
    pytest.importorskip("starlette", reason="the HTTP server needs the serve extra")
    import httpx

    from skipdecode.serve.app import create_app
    from skipdecode.serve.config import ServeConfig

    from .serving_fakes import serve_in_thread

    def complete(url, **body):
        r = httpx.post(url + "/v1/completions", json={"prompt": KJV_PROMPTS[0], "max_tokens": 24, **body}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with Service(kjv_engine) as svc, serve_in_thread(
            create_app(kjv_engine, svc, ServeConfig(model_name="kjv"))) as (url, _):
        full = complete(url)
        fast = complete(url, lossless=True, draft_tokens=5, draft_speedup=3)
        bad = httpx.post(url + "/v1/completions", json={"prompt": "a", "lossless": True, "speedup": 2}, timeout=30)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        # a request ended by a stop string reports the drafting it did before it stopped
        stop = full["choices"][0]["text"][-12:-6]
        stopped = complete(url, lossless=True, draft_tokens=5, draft_speedup=3, stop=[stop])
    assert fast["choices"][0]["tokens"] == full["choices"][0]["tokens"]
    assert fast["choices"][0]["text"] == full["choices"][0]["text"]
    counts = fast["skipdecode"]["lossless"]
    assert counts["drafted"] > 0 and 0 <= counts["accepted"] <= counts["drafted"]
    assert "lossless" not in full["skipdecode"]
    assert bad.status_code == 400 and "full depth" in bad.json()["error"]["message"]
    assert f"skipdecode_draft_tokens_total {float(counts['drafted'])}" in metrics
    assert f"skipdecode_accepted_draft_tokens_total {float(counts['accepted'])}" in metrics
    assert stopped["choices"][0]["finish_reason"] == "stop" and stop not in stopped["choices"][0]["text"]
    assert stopped["skipdecode"]["lossless"]["drafted"] > 0


def test_automatic_drafting_backs_off_while_drafts_keep_failing():
    from skipdecode.runtime.kv import SlotTable
    from skipdecode.runtime.scheduler import BACKOFF_AFTER
    sched = Scheduler(SchedulerConfig(max_batch=1, max_tokens_in_flight=500), SlotTable(1))
    sched.submit(SeqSpec(1, 3, (12,) * 200, draft=Draft(4, 4, auto=True)))
    sched.commit(sched.plan(), ())
    pattern = []
    for _ in range(40):
        plan = sched.plan()
        pattern.append("d" if plan.speculative else ".")
        sched.commit(plan, (), {r.request_id: 1 for r in plan.speculative})  # every draft rejected
    # BACKOFF_AFTER failed rounds, then pauses of 2, 4, 8, ... full-depth steps between single tries
    want = "d" * BACKOFF_AFTER + ".." + "d" + "...." + "d" + "." * 8 + "d" + "." * 16 + "d" + "." * 32
    assert "".join(pattern) == want[:40]
    sched.commit(sched.plan(), (), {})  # a step at full depth or a try: either way it advances
    plan = sched.plan()
    while not plan.speculative:
        sched.commit(plan, ())
        plan = sched.plan()
    sched.commit(plan, (), {1: 3})  # a round that accepted drafts resets the backoff
    assert sched.plan().speculative


def test_random_weight_drafts_fall_back_to_full_depth(engine_dir):
    """On a random model the shallow graphs rarely agree with full depth: automatic drafting backs off, so most
    steps are plain full-depth decodes and the output is still full depth's."""
    _, _, out = engine_dir
    engine = Engine.load(out)
    prompt = [2, 17, 29, 41]
    full = engine.generate([prompt], GenerateOptions(max_new_tokens=60))[0]
    auto = engine.generate([prompt], GenerateOptions(max_new_tokens=60, lossless=True))[0]
    assert auto.tokens == full.tokens
    assert auto.drafted < 59 // 2  # far fewer drafts than one per token


# -- claims that hold exactly --------------------------------------------------------------------------------------

def _seeded(seed: int, **kw) -> GenerateOptions:
    return GenerateOptions(max_new_tokens=30, lossless=True, sampling=SamplingParams(temperature=0.8, seed=seed), **kw)


def test_seeded_lossless_sampling_is_the_same_alone_batched_and_served(kjv_engine, monkeypatch):
    """Row i of a batch samples with seed + i (GenerateOptions.for_row): it must equal the prompt alone with that
    seed, and the same request served next to other lossless requests. A sampled row's drafting choices depend on
    that row only; the negative control lets them depend on the other rows (as greedy rows may) and must differ."""
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS]
    alone = [kjv_engine.generate([p], _seeded(40 + i))[0].tokens for i, p in enumerate(prompts)]
    batched = [g.tokens for g in kjv_engine.generate(prompts, _seeded(40))]
    with Service(kjv_engine) as svc:
        handles = [svc.submit(p, _seeded(40 + i)) for i, p in enumerate(prompts)]
        served = [list(h.result(timeout=120).tokens) for h in handles]
    assert batched == alone and served == alone
    real = batcher_module.prepare_request

    def shared_by_every_row(*args, **kwargs):  # the automatic policy of greedy rows applied to sampled ones
        request = real(*args, **kwargs)
        return replace(request, spec=replace(request.spec, draft=replace(request.spec.draft, shared=True)))

    monkeypatch.setattr(batcher_module, "prepare_request", shared_by_every_row)
    monkeypatch.setattr("skipdecode.runtime.generator.prepare_request", shared_by_every_row)
    assert [g.tokens for g in kjv_engine.generate(prompts, _seeded(40))] != alone


@pytest.mark.parametrize("k", [4, 8, 15])
def test_an_explicit_draft_length_drafts_that_many_tokens_every_round(kjv_engine, monkeypatch, k):
    """--draft-tokens K means K drafts per round (fewer only where the request has fewer tokens left); the
    automatic length stops at unsure drafts, so without K the rounds are shorter (the check can fail)."""
    rounds: list[int] = []
    expected: list[int] = []
    emitted = [1]  # the prefill's token
    real = batcher_module.speculative_accept

    def spy(drafts, *args):
        rounds.append(len(drafts))
        expected.append(min(k, 60 - emitted[0] - 1))  # a round emits at most drafts + 1 tokens
        out = real(drafts, *args)
        emitted[0] += len(out.tokens)
        return out

    monkeypatch.setattr(batcher_module, "speculative_accept", spy)
    prompt = kjv_engine.encode(KJV_PROMPTS[0])
    gen = kjv_engine.generate([prompt], GenerateOptions(max_new_tokens=60, lossless=True, draft_tokens=k))[0]
    assert rounds and rounds == expected and rounds[0] == k
    assert gen.drafted == sum(rounds)
    rounds.clear()
    kjv_engine.generate([prompt], GenerateOptions(max_new_tokens=60, lossless=True, draft_tokens=None))
    assert min(rounds) < 4  # the automatic policy stops early at an unsure draft


def test_lossless_on_a_quantized_engine_is_refused(tiny_checkpoint, tmp_path):
    """The int8 verify pass rounds activations differently from one-token steps: lossless decoding there would
    silently differ from the engine's own full depth, so it is a one-line input error instead."""
    _, ckpt = tiny_checkpoint
    export(ExportConfig(lossless_policy="default",
                        model=str(ckpt), out=tmp_path / "int8", speedups=(2.0,), max_batch=2, quantize="int8"),
           progress=False)
    with Engine.load(tmp_path / "int8") as engine:
        with pytest.raises(InputError, match="lossless decoding is not exact on this int8"):
            engine.generate([[2, 5, 7]], GenerateOptions(max_new_tokens=4, lossless=True))
        assert engine.generate([[2, 5, 7]], GenerateOptions(max_new_tokens=4))[0].tokens  # other modes still run
