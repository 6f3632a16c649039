"""The request model: a prompt with its options gives the same tokens alone, in a static batch, or served, and
generations that overlap on one backend never share KV slots. On the fake slot backend (no engine needed) plus
one check on a real engine and the PyTorch reference."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.kv import SlotsExhaustedError
from skipdecode.runtime.request import GenerateOptions, Generation, TokenEvent
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.schedule import make_plan, schedule_for
from skipdecode.runtime.service import Service

from .serving_fakes import FakeSlotBackend, fake_generator

ALL_BUCKETS = (1, 2, 3, 4, 5, 6)  # every budget exported: budgets are the schedule's exactly
SHORT, LONG = [5, 6, 7, 8, 9, 10, 11], [12 + i for i in range(18)]  # 7 and 18 tokens


def budgets_alone(prompt, opts, **kw):
    return fake_generator(**kw).generate([prompt], opts)[0]


def test_a_rows_schedule_does_not_depend_on_its_batch():
    # with max_length given, the batch's longest prompt used to set every row's decay (p = 18 instead of 7)
    opts = GenerateOptions(max_new_tokens=12, speedup=2.0, max_length=40)
    batch = fake_generator(buckets=ALL_BUCKETS).generate([SHORT, LONG], opts)
    alone = budgets_alone(SHORT, opts, buckets=ALL_BUCKETS)
    assert batch[0].budgets == alone.budgets and batch[0].tokens == alone.tokens
    plan = make_plan(schedule_for(6, speedup=2.0), len(SHORT), 40)
    assert alone.budgets[1:] == [s.bucket for s in plan.steps[:11]]
    assert batch[1].budgets == budgets_alone(LONG, opts, buckets=ALL_BUCKETS).budgets
    assert batch[0].budgets != batch[1].budgets  # the two rows really have different schedules


def test_rows_are_seeded_seed_plus_row_and_match_the_service():
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=11)
    opts = GenerateOptions(max_new_tokens=16, sampling=sampling)
    prompts = [SHORT, SHORT, LONG]
    batch = fake_generator().generate(prompts, opts)
    assert batch[0].tokens != batch[1].tokens  # same prompt, different rows: independent draws
    for row, prompt in enumerate(prompts):
        alone = fake_generator().generate([prompt], opts.for_row(row))[0]
        assert batch[row].tokens == alone.tokens, row
    # the same request served: seed 11 + 1 gives row 1's tokens
    gen = fake_generator()
    with Service(gen) as service:
        served = service.generate(SHORT, opts.for_row(1))
    assert list(served.tokens) == batch[1].tokens
    # a batch of one is row 0: the seed as given
    assert fake_generator().generate([LONG], opts)[0].tokens == budgets_alone(LONG, opts).tokens


def test_two_live_streams_on_one_backend_each_get_their_own_slots():
    gen = fake_generator(max_batch=4)
    opts_a = GenerateOptions(max_new_tokens=10, speedup=2.0)
    opts_b = GenerateOptions(max_new_tokens=14, speedup=3.0)
    a, b = gen.stream([SHORT, LONG], opts_a), gen.stream([LONG[:5]], opts_b)
    got_a, got_b = [Generation(), Generation()], [Generation()]
    for ev_a, ev_b in itertools.zip_longest(a, b):  # interleaved: an event of one, an event of the other
        if ev_a is not None:
            got_a[ev_a.request_id].add(ev_a)
        if ev_b is not None:
            got_b[ev_b.request_id].add(ev_b)
    want_a = fake_generator().generate([SHORT, LONG], opts_a)
    want_b = fake_generator().generate([LONG[:5]], opts_b)
    assert [g.tokens for g in got_a] == [w.tokens for w in want_a] and got_b[0].tokens == want_b[0].tokens
    assert [g.budgets for g in got_a] == [w.budgets for w in want_a]
    assert gen.backend.slots.num_free == 4  # both gave their slots back


def test_generate_while_a_stream_is_paused_and_slot_exhaustion():
    gen = fake_generator(max_batch=3)
    opts = GenerateOptions(max_new_tokens=8)
    stream = gen.stream([SHORT, LONG], opts)
    first = next(stream)  # the stream holds slots 0 and 1
    assert gen.generate([LONG], opts)[0].tokens == budgets_alone(LONG, opts).tokens
    # one slot free for two rows: they take turns in it, each still exactly its solo run
    assert [r.tokens for r in gen.generate([SHORT, LONG], opts)] == [budgets_alone(p, opts).tokens
                                                                     for p in (SHORT, LONG)]
    other = gen.stream([SHORT], opts)
    next(other)  # now every slot is held
    with pytest.raises(SlotsExhaustedError, match="other generations"):
        gen.generate([SHORT], opts)
    other.close()
    rest = [first] + list(stream)
    assert [ev.token for ev in rest if isinstance(ev, TokenEvent) and ev.request_id == 1] == \
        budgets_alone(LONG, opts).tokens
    stream.close()
    assert gen.backend.slots.num_free == 3


def test_closing_a_stream_early_gives_its_slots_back():
    gen = fake_generator(max_batch=2)
    stream = gen.stream([SHORT, LONG], GenerateOptions(max_new_tokens=8))
    next(stream)
    assert gen.backend.slots.num_free == 0
    stream.close()
    assert gen.backend.slots.num_free == 2


def test_a_stream_beside_a_service_on_one_backend():
    gen = fake_generator(max_batch=4, delay_s=0.002)
    opts = GenerateOptions(max_new_tokens=20, speedup=2.0)
    results = {}
    with Service(gen) as service:
        handles = [service.submit(p, opts) for p in (SHORT, LONG, LONG[:3])]

        def static():
            results["static"] = gen.generate([LONG[2:9]], opts)[0].tokens

        t = threading.Thread(target=static)
        t.start()
        t.join(30)
        served = [list(h.result(timeout=30).tokens) for h in handles]
    assert results["static"] == budgets_alone(LONG[2:9], opts).tokens
    assert served == [budgets_alone(p, opts).tokens for p in (SHORT, LONG, LONG[:3])]


def test_negative_control_a_stream_writing_into_foreign_slots_is_caught():
    """The exactness above can fail: a backend that does not protect slots outside a call gets wrong output."""
    from .serving_fakes import KVInvariantError

    class Clobbering(FakeSlotBackend):
        def _decode(self, token_ids, lengths, bucket, gates):  # rows outside the call at column 0, not their own
            return super()._decode(token_ids, np.where(gates.any(axis=1), lengths, 0), bucket, gates)

    gen = fake_generator()
    gen.backend = Clobbering()
    a = gen.stream([SHORT, LONG], GenerateOptions(max_new_tokens=6))
    b = gen.stream([LONG[:5]], GenerateOptions(max_new_tokens=6))
    with pytest.raises(KVInvariantError):
        for _ in zip(a, b, strict=False):  # b's calls cover a's slots 0 and 1 (b holds slot 2)
            pass


@pytest.mark.parametrize("temperature", [1e-320, 1e-308, 1e-9])
def test_tiny_temperatures_are_greedy(temperature):
    greedy = budgets_alone(LONG, GenerateOptions(max_new_tokens=12))
    tiny = budgets_alone(LONG, GenerateOptions(max_new_tokens=12, sampling=SamplingParams(temperature, seed=0)))
    assert tiny.tokens == greedy.tokens


@pytest.mark.parametrize("kw, message", [
    ({"temperature": True}, "temperature=True"), ({"top_p": True}, "top_p=True"), ({"top_k": True}, "top_k=True"),
    ({"temperature": float("nan")}, "temperature=nan"), ({"seed": -1}, "seed=-1"),
])
def test_sampling_values_are_checked(kw, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kw)


def test_engine_rows_equal_their_solo_runs(tiny_checkpoint, tmp_path):
    """On a real engine and on the PyTorch reference: each row of a mixed batch is its own solo run."""
    from skipdecode.export.exporter import ExportConfig, export
    from skipdecode.export.torch_generator import TorchGenerator
    from skipdecode.runtime.engine import Engine
    _, ckpt = tiny_checkpoint
    export(ExportConfig(lossless_policy="default",
                        model=str(ckpt), out=tmp_path / "e", speedups=(2.0, 3.0), max_batch=4), progress=False)
    opts = GenerateOptions(max_new_tokens=12, speedup=2.0, max_length=40,
                           sampling=SamplingParams(0.8, 20, 0.95, seed=5))
    prompts = [[2, 40, 41, 42, 43, 44, 45], [2] + list(range(50, 67))]
    with Engine.load(tmp_path / "e") as engine:
        batch = engine.generate(prompts, opts)
        for row, prompt in enumerate(prompts):
            alone = engine.generate([prompt], opts.for_row(row))[0]
            assert (batch[row].tokens, batch[row].budgets) == (alone.tokens, alone.budgets)
    want = TorchGenerator.load(str(ckpt)).generate(prompts, opts)
    assert [r.tokens for r in batch] == [r.tokens for r in want]
    with pytest.raises(Exception, match="closed"):
        engine.generate(prompts, opts)
