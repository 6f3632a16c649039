"""Properties of the SkipDecode schedule (pure; no backend)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skipdecode.runtime.errors import ScheduleError
from skipdecode.runtime.schedule import (
    Schedule,
    layers_for_budget,
    make_plan,
    round_half_up,
    schedule_for,
    select_bucket,
    solve_budgets,
)


@st.composite
def schedules(draw):
    L = draw(st.integers(1, 64))
    w = draw(st.integers(0, min(L, 4)))
    M = draw(st.integers(max(w, 1), L))
    m = draw(st.integers(max(w, 1), M))
    p = draw(st.integers(1, 64))
    T = draw(st.integers(p + 1, p + 200))
    return Schedule(L, M, m, w), p, T


@given(schedules())
@settings(max_examples=300, deadline=None)
def test_budgets_decay_and_layer_sets_nest(case):
    sched, p, T = case
    plan = make_plan(sched, p, T)
    budgets = [s.bucket for s in plan.steps]
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert all(sched.min_budget <= b <= sched.max_budget for b in budgets)
    sets = plan.pass_layers()
    assert len(sets) == T - 1
    # KV invariant: every layer a pass runs was run by every earlier pass.
    for earlier, later in zip(sets, sets[1:], strict=False):
        assert set(later) <= set(earlier)
    # prompt columns at full depth; warm-up layers always present
    assert all(s == tuple(range(sched.num_layers)) for s in sets[:p])
    assert all(set(range(sched.warmup)) <= set(s) for s in sets)
    assert all(len(s.layers) == s.bucket for s in plan.steps)


@given(schedules())
@settings(max_examples=200, deadline=None)
def test_first_decoded_column_gets_max_and_last_gets_min(case):
    sched, p, T = case
    if T - 1 - p >= 2:  # the first and the last decoded token are different columns
        assert sched.budget(p + 1, p, T) == sched.max_budget
        assert sched.budget(T - 1, p, T) == sched.min_budget


@given(schedules())
@settings(max_examples=300, deadline=None)
def test_realised_mean_is_the_target_for_any_length(case):
    # both ends of the decay are decoded tokens: the mean budget is (M + m) / 2 up to half-up rounding
    sched, p, T = case
    budgets = sched.decode_budgets(p, T)
    if budgets:
        assert abs(sum(budgets) / len(budgets) - (sched.max_budget + sched.min_budget) / 2) <= 0.5


def test_short_generations_realise_the_requested_speedup():
    # 3 decode steps at 2x on 12 layers: (9, 6, 3), not (7, 5, 3) = 2.4x
    plan = make_plan(schedule_for(12, speedup=2), 8, 12)
    assert [s.bucket for s in plan.steps] == [9, 6, 3]
    assert plan.realised_speedup == pytest.approx(2.0)
    # 2 new tokens at 3x: one decode step, which gets the mean budget (4 of 12), not M or m
    plan = make_plan(schedule_for(12, speedup=3), 8, 10)
    assert [s.bucket for s in plan.steps] == [4]
    assert plan.realised_speedup == pytest.approx(3.0)


@given(st.integers(1, 96), st.floats(1.0, 12.0), st.integers(0, 3))
@settings(max_examples=400, deadline=None)
def test_solver_hits_mean_within_rounding(L, S, w):
    floor = max(w, 1)
    if w > L or S > L / floor:
        with pytest.raises(ScheduleError):
            solve_budgets(L, S, w)
        return
    M, m = solve_budgets(L, S, w)
    assert floor <= m <= M <= L
    assert abs((M + m) / 2 - L / S) <= 0.5


def test_solver_examples():
    assert solve_budgets(24, 1.0) == (24, 24)
    assert solve_budgets(24, 2.0) == (18, 6)
    assert solve_budgets(24, 3.0) == (12, 4)
    assert solve_budgets(12, 1.2) == (12, 8)  # decay starts at full depth when 1.5 * L/S > L


@given(st.lists(st.integers(1, 48), min_size=1, max_size=10, unique=True), st.integers(1, 48))
def test_bucket_never_runs_fewer_layers(buckets, budget):
    buckets = sorted(set(buckets) | {48})
    chosen = select_bucket(budget, buckets)
    assert chosen >= budget and chosen in buckets
    assert not [b for b in buckets if budget <= b < chosen]


def test_plan_with_buckets_rounds_up_and_stays_monotone():
    sched = Schedule(24, 18, 6, 1)
    plan = make_plan(sched, 10, 60, buckets=[6, 12, 18, 24])
    assert all(s.bucket >= s.scheduled for s in plan.steps)
    assert [s.bucket for s in plan.steps] == sorted((s.bucket for s in plan.steps), reverse=True)
    with pytest.raises(ScheduleError, match="full-depth budget 24"):
        make_plan(sched, 10, 60, buckets=[6, 12])


def test_layers_for_budget_shape():
    assert layers_for_budget(12, 4, 1) == (0, 9, 10, 11)
    assert layers_for_budget(12, 4, 0) == (8, 9, 10, 11)
    assert layers_for_budget(12, 12, 2) == tuple(range(12))
    assert layers_for_budget(12, 2, 2) == (0, 1)


def test_round_half_up_is_not_bankers():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49)] == [1, 2, 3, 2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=12, max_budget=13, min_budget=4), "max_layers=13 is above the maximum 12"),
    (dict(num_layers=12, max_budget=6, min_budget=8), "min_layers=8 is above max_layers=6"),
    (dict(num_layers=12, max_budget=6, min_budget=1, warmup=2), "min_layers=1 is below the minimum 2"),
    (dict(num_layers=12, max_budget=6, min_budget=0, warmup=0), "min_layers=0 is below the minimum 1"),
    (dict(num_layers=0, max_budget=1, min_budget=1), "num_layers=0 is below the minimum 1"),
])
def test_invalid_schedules_name_value_and_limit(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(**kwargs)


@pytest.mark.parametrize("speedup, match", [(0.5, "speedup=0.5"), (float("nan"), "speedup=nan"),
                                            (13.0, "above the maximum 12")])
def test_invalid_speedup(speedup, match):
    with pytest.raises(ScheduleError, match=match):
        solve_budgets(12, speedup)


def test_lengths_validated():
    with pytest.raises(ScheduleError, match="max_length=5 is below the minimum 6"):
        Schedule.full_depth(4).decode_budgets(5, 5)
