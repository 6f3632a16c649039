"""The SkipDecode schedule: pure functions of (L, M, m, w, p, T). No backend, no torch, no numpy.

Column convention (used everywhere in this package):

* Column ``t`` of a static batch holds token ``t``. Columns ``[0, p)`` are the (left-padded) prompt.
* The token at column ``t`` (``p <= t < T``) is *produced* by the forward pass over column ``t - 1``.
  That pass runs ``layers(budget(t))`` and writes K/V for column ``t - 1`` in exactly those layers.
* The token at column ``p`` is produced by the prefill, which runs all ``L`` layers (prompt at full depth).
  Decode steps therefore produce columns ``p + 1 .. T - 1`` (``n = T - 1 - p`` of them); their budgets decay
  linearly from ``M`` (the first decoded token) to ``m`` (the last possible one, column ``T - 1``).

Budget formula (docs/DESIGN.md §1)::

    frac(t)   = clamp((t - p - 1) / (n - 1), 0, 1)      for n >= 2;  frac = 1/2 when n == 1
    budget(t) = round_half_up((1 - frac(t)) * M + frac(t) * m)
    layers(b) = [0, w) ∪ [L - (b - w), L)

Both ends of the decay are decoded positions, so the mean budget over the decode steps is (M + m) / 2 up to
rounding for every generation length; the single step of a two-token generation gets that mean. (Indexing the
decay from the prefill column instead never ran M layers and overshot the target on short generations: 3
decode steps at 2x on 12 layers realised 2.4x.)

Rounding is half-up (``floor(x + 0.5)``), not Python's banker's rounding, so a budget never depends on
whether an intermediate value is an even integer. Budgets are non-increasing in ``t``, hence every layer
set is a subset of all earlier ones: the KV invariant (each layer's cache is a contiguous prefix of columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ScheduleError, check_int

# Decay shape of the solver: the linear decay runs from 1.5 x mean to 0.5 x mean (max/min = 3) unless
# clipped by L or by the warm-up floor. Early tokens get more layers than late ones (as in the paper),
# and the last tokens keep half the mean budget instead of collapsing onto the warm-up block.
SOLVER_SPREAD = 0.5


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Schedule:
    """Budgets for one model depth: decay from `max_budget` to `min_budget`, `warmup` layers always run."""

    num_layers: int
    max_budget: int
    min_budget: int
    warmup: int = 1

    def __post_init__(self) -> None:
        L = check_int("num_layers", self.num_layers, lo=1, error=ScheduleError)
        w = check_int("warmup_layers", self.warmup, lo=0, hi=L, error=ScheduleError)
        M = check_int("max_layers", self.max_budget, lo=1, hi=L, error=ScheduleError)
        m = check_int("min_layers", self.min_budget, lo=max(w, 1), error=ScheduleError)
        if m > M:
            raise ScheduleError(f"min_layers={m} is above max_layers={M}; budgets must decay (min <= max)")

    @classmethod
    def full_depth(cls, num_layers: int, warmup: int = 1) -> Schedule:
        return cls(num_layers, num_layers, num_layers, min(warmup, num_layers))

    @classmethod
    def for_speedup(cls, num_layers: int, speedup: float, warmup: int = 1) -> Schedule:
        M, m = solve_budgets(num_layers, speedup, warmup)
        return cls(num_layers, M, m, warmup)

    def budget(self, t: int, prompt_length: int, max_length: int) -> int:
        """Layers executed for the token at column `t` (see module docstring)."""
        n = max_length - 1 - prompt_length  # decode steps
        frac = 0.5 if n == 1 else min(max((t - prompt_length - 1) / max(n - 1, 1), 0.0), 1.0)
        return round_half_up((1.0 - frac) * self.max_budget + frac * self.min_budget)

    def decode_budgets(self, prompt_length: int, max_length: int) -> list[int]:
        """Budgets of the decode steps, i.e. of columns p+1 .. T-1 (column p comes from the prefill)."""
        check_lengths(prompt_length, max_length)
        return [self.budget(t, prompt_length, max_length) for t in range(prompt_length + 1, max_length)]

    def layers(self, budget: int) -> tuple[int, ...]:
        return layers_for_budget(self.num_layers, budget, self.warmup)


def schedule_for(num_layers: int, speedup: float | None = None, max_layers: int | None = None,
                 min_layers: int | None = None, warmup: int = 1) -> Schedule:
    """The schedule a user asked for: explicit budgets, a target speedup, or (neither) full depth."""
    if speedup is not None and (max_layers is not None or min_layers is not None):
        raise ScheduleError(f"give either speedup={speedup} or max_layers/min_layers, not both")
    if (max_layers is None) != (min_layers is None):
        raise ScheduleError(f"max_layers={max_layers} and min_layers={min_layers} must be given together")
    if max_layers is not None:
        return Schedule(num_layers, max_layers, min_layers, warmup)
    if speedup is None or speedup == 1:
        return Schedule.full_depth(num_layers, warmup)
    return Schedule.for_speedup(num_layers, speedup, warmup)


def check_lengths(prompt_length: int, max_length: int) -> None:
    check_int("prompt_length", prompt_length, lo=1, error=ScheduleError)
    check_int("max_length", max_length, lo=prompt_length + 1, error=ScheduleError)


def layers_for_budget(num_layers: int, budget: int, warmup: int) -> tuple[int, ...]:
    """[0, w) ∪ [L - (b - w), L): the warm-up block plus the top block; the middle is skipped."""
    check_int("budget", budget, lo=max(warmup, 1), hi=num_layers, error=ScheduleError)
    top = budget - warmup
    return tuple(range(warmup)) + tuple(range(num_layers - top, num_layers))


def mean_budget(budgets: Sequence[int], num_layers: int) -> float:
    """Mean layers per decode step; a run without decode steps counts as full depth."""
    return sum(budgets) / len(budgets) if budgets else float(num_layers)


def solve_budgets(num_layers: int, speedup: float, warmup: int = 1) -> tuple[int, int]:
    """Map a target speedup S to (max_budget, min_budget) with (M + m) / 2 ≈ L / S.

    Rule: the continuous target is M* = 1.5 B, m* = 0.5 B with B = L / S (see SOLVER_SPREAD); if M* > L the
    decay starts at full depth (M* = L, m* = 2B - L); if m* is below the floor max(w, 1) it is raised to the
    floor and M* = 2B - floor. Among integer pairs floor <= m <= M <= L the solver picks the one whose mean
    (M + m) / 2 is closest to B, breaking ties by distance to (M*, m*). The result is independent of prompt and
    generation lengths, so the budgets an engine exports are exactly the ones the runtime schedules; because the
    decay runs from the first to the last decoded token, the realised mean is (M + m) / 2 up to rounding for any
    length (property-tested).
    """
    L = check_int("num_layers", num_layers, lo=1, error=ScheduleError)
    w = check_int("warmup_layers", warmup, lo=0, hi=L, error=ScheduleError)
    floor = max(w, 1)
    if not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup < 1.0:
        raise ScheduleError(f"speedup={speedup!r} must be a finite number >= 1")
    if speedup > L / floor:
        raise ScheduleError(
            f"speedup={speedup} is above the maximum {L / floor:g} for {L} layers with {w} warm-up layers "
            f"(every token runs at least {floor} layer(s))")
    B = L / speedup
    M_star, m_star = (1 + SOLVER_SPREAD) * B, (1 - SOLVER_SPREAD) * B
    if M_star > L:
        M_star, m_star = float(L), 2 * B - L
    if m_star < floor:
        M_star, m_star = 2 * B - floor, float(floor)
    pairs = ((M, m) for M in range(floor, L + 1) for m in range(floor, M + 1))
    return min(pairs, key=lambda pm: (abs((pm[0] + pm[1]) / 2 - B), abs(pm[0] - M_star) + abs(pm[1] - m_star)))


def select_bucket(budget: int, buckets: Sequence[int]) -> int:
    """Smallest exported budget >= `budget`: never fewer layers than scheduled, still monotone in t."""
    candidates = [b for b in buckets if b >= budget]
    if not candidates:
        raise ScheduleError(f"budget={budget} is above every exported bucket (largest {max(buckets)})")
    return min(candidates)


@dataclass(frozen=True)
class Step:
    """One decode step of a plan: the pass over column `column` producing the token at `column + 1`."""

    column: int
    scheduled: int  # budget the schedule asks for
    bucket: int  # budget of the graph that runs (>= scheduled)
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """Every decode step of a static batch with prompt length p and max length T, as plain data."""

    schedule: Schedule
    prompt_length: int
    max_length: int
    steps: tuple[Step, ...]

    @property
    def mean_layers(self) -> float:
        return mean_budget([s.bucket for s in self.steps], self.schedule.num_layers)

    @property
    def realised_speedup(self) -> float:
        return self.schedule.num_layers / self.mean_layers

    def pass_layers(self) -> list[tuple[int, ...]]:
        """Layer set of the forward pass over each column 0 .. T-2: the prompt at full depth, then the steps."""
        full = tuple(range(self.schedule.num_layers))
        return [full] * self.prompt_length + [s.layers for s in self.steps]


def make_plan(schedule: Schedule, prompt_length: int, max_length: int,
              buckets: Sequence[int] | None = None) -> Plan:
    """Plan all decode steps; with `buckets`, each step runs the smallest exported budget >= scheduled."""
    L = schedule.num_layers
    if buckets is not None and L not in buckets:
        raise ScheduleError(f"buckets {sorted(buckets)} lack the full-depth budget {L}")
    steps = []
    budgets = schedule.decode_budgets(prompt_length, max_length)
    for t, b in enumerate(budgets, start=prompt_length + 1):
        run = b if buckets is None else select_bucket(b, buckets)
        steps.append(Step(column=t - 1, scheduled=b, bucket=run, layers=schedule.layers(run)))
    return Plan(schedule, prompt_length, max_length, tuple(steps))
