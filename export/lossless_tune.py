"""Lossless mode's automatic drafting policy, measured on the model when it is exported.

Whether drafting pays, and how many tokens a round should draft, depends on what a draft step costs next to the
full-depth verify pass (the model's size against the CPU's caches, the draft weights' format, per-call overhead)
and on how often the shallow graphs agree with full depth. No fixed rule fits both of this repository's skip-tuned
models (2-core AVX2 EPYC, batch 1): the 27 MiB embedded model, bound by compute and per-call overhead, decodes
slower than full depth with any drafting (0.87-0.92x), while the 98 MiB small model, bound by reading weights,
gains most from short rounds without an early stop (2 drafts: 1.55x, against 1.21x for the earlier fixed policy of
4 drafts ending at a draft token below 0.6), and the best length moved from 4 to 2 as its skip-tuning went on. So
the export times candidate policies and records the fastest in the manifest (`lossless`), as a compiler's
autotuner records the kernels it timed; `--lossless-policy` sets one instead.

How: batch-1 greedy generations of the model's own typical text (short prompts through its tokenizer, or its BOS
token), full depth and each candidate in interleaved rounds in one warm process, each candidate's time over full
depth's within a round, median over rounds. Greedy lossless output is full depth's under any policy: the tokens
are compared, and a difference fails the export. The fastest candidate is kept if it beats full depth by at least
MIN_GAIN; otherwise the policy is "no automatic drafting" (tokens 0: lossless requests decode at full depth unless
they ask for a draft length). Timings are of the exporting machine; export on the serving machine's kind of CPU,
or set the policy. The choice only moves speed: every policy gives full depth's output.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ..runtime.errors import EngineError
from ..runtime.request import GenerateOptions, draft_bucket
from ..runtime.speculative import DEFAULT_DRAFT_SPEEDUP, DraftPolicy

MIN_GAIN = 1.03  # below this a policy's gain is within the noise of the rounds: keep decoding at full depth
ROUNDS = 3
MAX_NEW_TOKENS = 48
PROMPTS = ("The", "In the beginning")
# (tokens, stop_below) tried at the default draft depth; the best is then tried at the other depths
SHAPES = ((2, None), (3, None), (4, None), (6, None), (4, 0.6), (8, 0.6))
OTHER_SPEEDUPS = (2.0, 4.0)


def candidates_at(speedup: float) -> list[DraftPolicy]:
    return [DraftPolicy(speedup, k, stop) for k, stop in SHAPES]


def tune(directory: str | Path, threads: int | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Time the candidates on the engine in `directory` -> the manifest's `lossless` section."""
    from ..runtime.engine import Engine

    with Engine.load(directory, threads=threads) as engine:
        backend = engine.backend
        prompts = _prompts(engine)
        L = backend.num_layers
        n = min(MAX_NEW_TOKENS, backend.max_length - max(len(p) for p in prompts) - 1)
        if n < 8:
            raise EngineError(f"max_length {backend.max_length} leaves {n} tokens to time lossless drafting with; "
                              "pass --lossless-policy TOKENS:SPEEDUP, or a longer --max-length")
        full_opts = GenerateOptions(max_new_tokens=n, eos_token_id=None)
        auto = GenerateOptions(max_new_tokens=n, eos_token_id=None, lossless=True)
        reference = [engine.generate([p], full_opts)[0].tokens for p in prompts]

        def timed(policy: DraftPolicy | None) -> tuple[float, int, int]:
            """(seconds, drafted, accepted) of the prompts' generations under `policy` (None: full depth)."""
            backend.draft_policy = policy or DraftPolicy()
            t, drafted, accepted = 0.0, 0, 0
            for p, want in zip(prompts, reference, strict=True):
                t0 = time.perf_counter()
                gen = engine.generate([p], auto if policy else full_opts)[0]
                t += time.perf_counter() - t0
                if gen.tokens != want:
                    raise EngineError(f"lossless drafting with {policy} gave other tokens than full depth: the "
                                      "engine's verify graph does not reproduce its decode graphs")
                drafted, accepted = drafted + gen.drafted, accepted + gen.accepted
            return t, drafted, accepted

        def measure(policies: list[DraftPolicy]) -> list[dict]:
            for policy in [None, *policies]:  # warm-up: every graph a candidate runs
                timed(policy)
            ratios: list[list[float]] = [[] for _ in policies]
            counts = [(0, 0)] * len(policies)
            for r in range(ROUNDS):
                order = [None, *policies]
                order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
                times = {}
                for policy in order:
                    times[policy], d, a = timed(policy)
                    if policy is not None:
                        counts[policies.index(policy)] = (d, a)
                for i, policy in enumerate(policies):
                    ratios[i].append(times[None] / times[policy])
            rows = []
            for policy, rs, (d, a) in zip(policies, ratios, counts, strict=True):
                rows.append(policy.as_dict() | {"draft_bucket": draft_bucket(L, backend.buckets,
                                                                             policy.draft_speedup),
                                                "speedup": round(statistics.median(rs), 3),
                                                "acceptance": round(a / d, 3) if d else 0.0})
                log(f"lossless policy {policy.tokens} tokens from {policy.draft_speedup:g}x, stop "
                    f"{policy.stop_below}: {rows[-1]['speedup']:.2f}x full depth, {rows[-1]['acceptance']:.0%} "
                    "of drafts accepted")
            return rows

        t0 = time.perf_counter()
        rows = measure(candidates_at(DEFAULT_DRAFT_SPEEDUP))
        best = max(rows, key=lambda r: r["speedup"])
        seen = {draft_bucket(L, backend.buckets, DEFAULT_DRAFT_SPEEDUP)}
        others = []
        for s in OTHER_SPEEDUPS:
            bucket = draft_bucket(L, backend.buckets, s)
            if bucket not in seen:
                seen.add(bucket)
                others.append(DraftPolicy(s, best["draft_tokens"], best["stop_below"]))
        if others:
            rows += measure(others)
        best = max(rows, key=lambda r: r["speedup"])
        draws = best["speedup"] >= MIN_GAIN
        policy = DraftPolicy(best["draft_speedup"], best["draft_tokens"] if draws else 0, best["stop_below"])
        measured = {"candidates": rows, "threads": threads, "new_tokens": n, "prompts": len(prompts), "rounds": ROUNDS,
                    "seconds": round(time.perf_counter() - t0, 1)}
    return policy.as_dict() | {"measured": measured}


def _prompts(engine) -> list[list[int]]:
    if engine.codec is not None:
        return [list(engine.encode(t)) for t in PROMPTS]
    bos = engine.backend.pad_token_id if engine.eos_token_id is None else engine.eos_token_id
    return [[bos]]

