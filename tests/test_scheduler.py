"""Scheduler (pure planning) and batcher (runner) on a fake numpy backend: no engine, no torch needed.

Checks: slot ownership, FIFO admission with max batch / tokens in flight / prefill budget (no starvation),
plans as data (graph of the deepest row, per-row gates, grouping), and that continuous batching reproduces each
request's solo run exactly (tokens, budgets, finish_reason) while never reading K/V a row's earlier tokens
skipped, with negative controls showing the checks can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skipdecode.runtime import batcher as batcher_mod
from skipdecode.runtime.batcher import Batcher, gate_row, prepare_request
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.kv import SlotsExhaustedError, SlotTable
from skipdecode.runtime.request import FinishEvent, GenerateOptions, TokenEvent
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.schedule import layers_for_budget
from skipdecode.runtime.scheduler import (
    Scheduler,
    SchedulerConfig,
    SchedulerError,
    SeqSpec,
)

from .serving_fakes import EOS, FakeSlotBackend, KVInvariantError, fake_generator, solo


def spec(rid, p=4, steps=(6, 6, 4)):
    return SeqSpec(rid, p, tuple(steps))


# -- slots ------------------------------------------------------------------------------------------------------
def test_slot_table_hands_out_lowest_free_and_refuses_misuse():
    a = SlotTable(3)
    assert a.allocate(2) == [0, 1] and a.allocate() == [2] and a.num_free == 0
    a.lengths[1] = 5
    a.free([1])
    assert a.lengths[1] == 0 and a.allocate() == [1]
    a.free([2])
    with pytest.raises(InputError, match="slot 2 is not allocated"):
        a.free([2])
    with pytest.raises(SlotsExhaustedError, match="2 KV slot\\(s\\) needed but 1 of 3 are free"):
        a.allocate(2)  # all or none
    assert a.num_free == 1
    with pytest.raises(InputError, match="slot 2 is not allocated"):
        a.check_taken([0, 2])


def sched(config, slots):
    return Scheduler(config, SlotTable(slots))


# -- admission ----------------------------------------------------------------------------------------------------
def test_admission_is_fifo_and_respects_max_batch():
    s = sched(SchedulerConfig(max_batch=2, max_tokens_in_flight=1000), 4)
    for rid in range(4):
        s.submit(spec(rid))
    plan = s.plan()
    assert [(a.request_id, a.slot) for a in plan.admits] == [(0, 0), (1, 1)] and not plan.calls
    s.commit(plan, finished=[0])
    plan = s.plan()
    assert [r.request_id for r in plan.rows] == [1]
    assert [(a.request_id, a.slot) for a in plan.admits] == [(2, 0)]  # slot 0 was freed and is reused


def test_head_of_line_blocks_overtaking_so_large_requests_do_not_starve():
    s = sched(SchedulerConfig(max_batch=4, max_tokens_in_flight=20), 4)
    s.submit(spec(0, p=4, steps=(6,) * 5))  # 10 tokens
    s.submit(spec(1, p=8, steps=(6,) * 7))  # 16 tokens: does not fit beside request 0
    s.submit(spec(2, p=1, steps=()))  # 2 tokens: would fit, but must not overtake request 1
    plan = s.plan()
    assert [a.request_id for a in plan.admits] == [0]
    s.commit(plan, finished=[])
    plan = s.plan()
    assert plan.admits == () and s.num_waiting == 2
    s.commit(plan, finished=[0])
    assert [a.request_id for a in s.plan().admits] == [1, 2]  # in order once the head fits


def test_prefill_budget_admits_an_oversized_head_alone():
    s = sched(SchedulerConfig(max_batch=4, max_tokens_in_flight=1000, max_prefill_tokens=6), 4)
    for rid, p in enumerate((9, 3, 3, 3)):
        s.submit(spec(rid, p=p))
    assert [a.request_id for a in s.plan().admits] == [0]
    assert [a.request_id for a in s.plan().admits] == [1, 2]


def test_a_request_that_can_never_fit_is_refused_up_front():
    s = sched(SchedulerConfig(max_batch=2, max_tokens_in_flight=10), 2)
    with pytest.raises(InputError, match="= 12 tokens is above max_tokens_in_flight 10"):
        s.submit(spec(0, p=8, steps=(6, 6, 6)))


@pytest.mark.parametrize("kw, message", [
    (dict(max_batch=0, max_tokens_in_flight=10), "max_batch=0 is below the minimum 1"),
    (dict(max_batch=2, max_tokens_in_flight=10, strategy="fastest"), "strategy='fastest' is not one of"),
])
def test_bad_scheduler_config(kw, message):
    with pytest.raises(InputError, match=message):
        SchedulerConfig(**kw)


# -- plans as data ----------------------------------------------------------------------------------------------
def running_scheduler(strategy):
    s = sched(SchedulerConfig(max_batch=4, max_tokens_in_flight=1000, strategy=strategy), 4)
    for rid, steps in enumerate([(6, 4), (3, 2), (4, 4)]):
        s.submit(spec(rid, p=3 + rid, steps=steps))
    s.commit(s.plan(), finished=[])
    return s


def test_gate_plan_runs_the_deepest_rows_graph_over_the_used_prefix():
    plan = running_scheduler("gate").plan()
    (call,) = plan.calls
    assert (call.bucket, call.num_rows) == (6, 3)
    assert [(r.slot, r.column, r.bucket) for r in call.rows] == [(0, 3, 6), (1, 4, 3), (2, 5, 4)]


def test_group_plan_has_one_call_per_bucket_deepest_first():
    plan = running_scheduler("group").plan()
    assert [(c.bucket, c.num_rows, [r.slot for r in c.rows]) for c in plan.calls] == [
        (6, 1, [0]), (4, 3, [2]), (3, 2, [1])]


def test_gates_select_exactly_the_rows_own_layers():
    L, w = 6, 1
    for graph in (2, 3, 4, 6):
        for row in range(1, graph + 1):
            on = [layer for layer, g in zip(layers_for_budget(L, graph, w), gate_row(L, w, graph, row), strict=True)
                  if g]
            assert on == list(layers_for_budget(L, row, w))


def test_runner_that_does_not_report_a_finished_request_is_caught():
    s = sched(SchedulerConfig(max_batch=2, max_tokens_in_flight=100), 2)
    s.submit(spec(0, steps=(6,)))
    s.commit(s.plan(), finished=[])
    with pytest.raises(SchedulerError, match="did not report it finished"):
        s.commit(s.plan(), finished=[])


# -- the runner against solo runs ------------------------------------------------------------------------------------
def run_continuous(backend, requests, strategy="gate", cancel_at=None, max_batch=None):
    """requests: [(arrival_step, prompt, opts)] -> (results by id, admission order, steps)."""
    gen = fake_generator()
    cfg = SchedulerConfig(max_batch or backend.max_batch, backend.max_batch * backend.max_length, None, strategy)
    b = Batcher(backend, cfg)
    out = {i: ([], [], None) for i in range(len(requests))}
    admitted, step = [], 0
    while step == 0 or not b.idle or any(a >= step for a, _, _ in requests):
        for i, (arrival, prompt, opts) in enumerate(requests):
            if arrival == step:
                b.add(prepare_request(i, prompt, opts, backend, gen.vocab_size))
        for i, at in (cancel_at or {}).items():
            if at == step and b.cancel(i):
                out[i] = (*out[i][:2], "cancelled")
        res = b.step()
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                out[ev.request_id][0].append(ev.token)
                out[ev.request_id][1].append(ev.budget)
                if ev.index == 0:
                    admitted.append(ev.request_id)
            elif isinstance(ev, FinishEvent):
                out[ev.request_id] = (*out[ev.request_id][:2], ev.reason)
        step += 1
        assert step < 10_000, "the batcher did not drain"
    return out, admitted, step


def mixed_requests(seed, n=12, max_length=64):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        p = int(rng.integers(1, 12))
        prompt = [int(t) for t in rng.integers(3, 50, size=p)]
        new = int(rng.integers(1, 24))
        speedup = [None, 2.0, 3.0][i % 3]
        sampling = SamplingParams(0.9, 10, 0.95, seed=i) if i % 2 else SamplingParams()
        opts = GenerateOptions(max_new_tokens=new, speedup=speedup, sampling=sampling,
                               eos_token_id=EOS if i % 4 else None, stop_token_ids=(7,) if i % 5 == 0 else ())
        reqs.append((int(rng.integers(0, 10)), prompt, opts))
    return reqs


@pytest.mark.parametrize("strategy", ["gate", "group"])
def test_every_request_equals_its_solo_run(strategy):
    reqs = mixed_requests(0)
    out, admitted, _ = run_continuous(FakeSlotBackend(), reqs, strategy)
    for i, (_, prompt, opts) in enumerate(reqs):
        assert out[i] == solo(prompt, opts), i
    reasons = {out[i][2] for i in out}
    assert {"length", "eos"} <= reasons  # the workload really mixes finish reasons
    assert len({b for i in out for b in out[i][1]}) >= 3  # ... and buckets


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), strategy=st.sampled_from(["gate", "group"]),
       max_batch=st.integers(1, 4), buckets=st.sampled_from([(2, 3, 4, 6), (3, 6), (1, 2, 3, 4, 5, 6)]))
def test_property_exact_and_fifo_under_random_arrivals(seed, strategy, max_batch, buckets):
    reqs = mixed_requests(seed, n=8)
    out, admitted, _ = run_continuous(FakeSlotBackend(buckets=buckets), reqs, strategy, max_batch=max_batch)
    for i, (_, prompt, opts) in enumerate(reqs):
        assert out[i] == solo(prompt, opts, buckets=buckets)
    by_arrival = sorted(range(len(reqs)), key=lambda i: (reqs[i][0], i))
    assert admitted == by_arrival  # FIFO: nobody is overtaken


def test_cancelled_requests_free_their_slot_and_leave_others_exact():
    reqs = mixed_requests(3)
    backend = FakeSlotBackend()
    out, _, _ = run_continuous(backend, reqs, cancel_at={0: 4, 5: 6})
    for i, (_, prompt, opts) in enumerate(reqs):
        if out[i][2] != "cancelled":
            assert out[i] == solo(prompt, opts)


# -- negative controls: the checks above can fail -------------------------------------------------------------------
def test_negative_control_running_the_graphs_full_layer_set_is_caught(monkeypatch):
    monkeypatch.setattr(batcher_mod, "gate_row", lambda L, w, graph, row: (True,) * graph)
    reqs = [(0, [5, 6, 7], GenerateOptions(max_new_tokens=20, speedup=3.0)),
            (8, [9, 10], GenerateOptions(max_new_tokens=20, speedup=3.0))]
    with pytest.raises(KVInvariantError, match="not K/V of this sequence"):
        run_continuous(FakeSlotBackend(), reqs)


def test_prefill_before_decode_is_exact_too(monkeypatch):
    # the slot table tracks every slot's length, so a decode call that covers a just-prefilled slot points it at its
    # next free column: the order of admits and calls within a step does not matter for exactness
    def step_prefill_first(self):
        plan = self.scheduler.plan()
        events, finished = [], set()
        if plan.prefills:
            self._prefill(plan.prefills, events, finished)
        for call in plan.calls:
            self._decode(call, events, finished)
        self.scheduler.commit(plan, finished)
        for rid in finished:
            del self._seqs[rid]
        return batcher_mod.StepResult(tuple(events), len(plan.rows), len(plan.admits), 0)

    monkeypatch.setattr(Batcher, "step", step_prefill_first)
    # 0 finishes first and frees slot 0 below 1, which keeps decoding; 2 is then admitted into slot 0
    reqs = [(0, [5, 6, 7, 8], GenerateOptions(max_new_tokens=2)), (0, [9, 10, 11], GenerateOptions(max_new_tokens=9)),
            (4, [12, 13], GenerateOptions(max_new_tokens=4))]
    out, _, _ = run_continuous(FakeSlotBackend(), reqs)
    for i, (_, prompt, opts) in enumerate(reqs):
        assert out[i] == solo(prompt, opts)


class OwnColumnScratch(FakeSlotBackend):
    """Points rows that a call does not advance at their own last real column instead of their next free one."""

    def _decode(self, token_ids, lengths, bucket, gates):
        off = ~gates.any(axis=1) & (lengths > 0)
        return super()._decode(token_ids, np.where(off, lengths - 1, lengths), bucket, gates)


def test_negative_control_scratch_at_the_rows_own_column_is_caught():
    # request 2 takes slot 0 (freed by 0) with a deep bucket below request 1, which is shallow by then: the
    # shallow call covers slot 0 after the deep call advanced it
    reqs = [(0, [5, 6, 7], GenerateOptions(max_new_tokens=2, speedup=3.0)),
            (0, [9, 10], GenerateOptions(max_new_tokens=30, speedup=3.0)),
            (12, [12, 13], GenerateOptions(max_new_tokens=10, speedup=3.0))]
    run_continuous(FakeSlotBackend(), reqs, strategy="group")  # the real backend's choice passes
    with pytest.raises(KVInvariantError, match="not K/V of this sequence"):
        run_continuous(OwnColumnScratch(), reqs, strategy="group")
