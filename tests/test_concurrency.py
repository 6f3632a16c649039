"""Several threads generating on one engine: every generation's tokens are its own, equal to its solo run.

The slot API serializes graph calls with a lock, but logits must not be shared after the lock is released: a thread
sampling from a buffer that another thread's call has already overwritten gets that thread's tokens, with no error.
"""

from __future__ import annotations

import threading

import pytest
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.request import GenerateOptions, SamplingParams, TokenEvent
from skipdecode.runtime.service import Service, ServiceConfig

THREADS = 3
GENERATIONS = 6


def _prompts(worker: int) -> list[list[int]]:
    return [[2, 11 + 17 * worker + 5 * g, 3 + 29 * g % 200, 40 + worker] for g in range(GENERATIONS)]


def _options(g: int) -> GenerateOptions:
    # seeded sampling (every token depends on the whole logits row), at full depth, 2x and greedy at 3x
    sampling = SamplingParams(temperature=1.0, seed=100 + g)
    if g % 3 == 0:
        return GenerateOptions(max_new_tokens=24, sampling=sampling)
    if g % 3 == 1:
        return GenerateOptions(max_new_tokens=24, speedup=2, sampling=sampling)
    return GenerateOptions(max_new_tokens=24, speedup=3)


def _run_threads(engine, work, n: int) -> list:
    results: list = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


@pytest.mark.parametrize("prepack", ["shared", "off"])
def test_threads_on_one_engine_get_their_own_tokens(engine_dir, prepack):
    _, _, directory = engine_dir
    with Engine.load(directory, prepack=prepack) as engine:
        solo = [[engine.generate([p], _options(g))[0].tokens for g, p in enumerate(_prompts(w))]
                for w in range(THREADS)]
        # the workers' expected outputs differ, so tokens taken from another generation cannot pass by accident
        assert len({tuple(t) for row in solo for t in row}) >= THREADS * GENERATIONS - 2

        def work(w: int) -> list[list[int]]:
            return [engine.generate([p], _options(g))[0].tokens for g, p in enumerate(_prompts(w))]

        assert _run_threads(engine, work, THREADS) == solo


def test_streams_beside_a_live_service_get_their_own_tokens(engine_dir):
    _, _, directory = engine_dir
    with Engine.load(directory) as engine:
        prompts = _prompts(0)
        solo = [engine.generate([p], _options(g))[0].tokens for g, p in enumerate(prompts)]
        svc = Service(engine, ServiceConfig(max_batch=2))
        try:
            handles = [svc.submit(p, _options(g)) for g, p in enumerate(prompts)]

            def work(w: int) -> list[list[int]]:  # streams on the two slots the service leaves free
                out = []
                for g, p in enumerate(prompts):
                    tokens = [ev.token for ev in engine.stream([p], _options(g)) if isinstance(ev, TokenEvent)]
                    out.append(tokens)
                return out

            streamed = _run_threads(engine, work, 2)
            served = [list(h.result(timeout=120).tokens) for h in handles]
        finally:
            svc.shutdown()
        assert served == solo
        assert streamed == [solo, solo]
