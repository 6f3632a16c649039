"""Log-probabilities: of generated tokens (from the logits the sampler used, under each token's own schedule) and
of prompt tokens (teacher-forced at full depth). Fake backend: against its logits function; a tiny real engine:
against the PyTorch reference's logits."""

from __future__ import annotations

import numpy as np
import pytest
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.generation import GenerateOptions
from skipdecode.runtime.logprobs import log_softmax, score_prompt, token_logprob
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.schedule import layers_for_budget
from skipdecode.runtime.service import Service

from .serving_fakes import EOS, fake_generator

pytestmark = pytest.mark.timeout(300)


def test_log_softmax_and_top_k():
    logits = np.array([[1.0, 3.0, 3.0, -2.0]], dtype=np.float32)
    ls = log_softmax(logits)
    assert ls.dtype == np.float64 and abs(np.exp(ls).sum() - 1) < 1e-12
    e = token_logprob(logits, 3, 2)
    assert e.token == 3 and e.logprob == pytest.approx(ls[3]) and [t for t, _ in e.top] == [1, 2]  # ties: lower id
    assert token_logprob(logits, 0, 0).top == ()


@pytest.mark.parametrize("k", [-1, 6, True, 1.5])
def test_logprobs_option_is_validated(k):
    with pytest.raises(InputError, match="logprobs"):
        GenerateOptions(max_new_tokens=2, logprobs=k)


@pytest.mark.parametrize("speedup, sampling", [(None, SamplingParams()), (3.0, SamplingParams(0.9, 0, 0.9, seed=4))])
def test_generated_logprobs_are_the_log_softmax_of_the_logits_each_token_came_from(speedup, sampling):
    gen = fake_generator()
    be, L, w = gen.backend, gen.backend.num_layers, gen.backend.warmup_layers
    prompt, opts = [5, 9, 11], GenerateOptions(max_new_tokens=12, speedup=speedup, sampling=sampling, logprobs=4)
    with Service(gen) as svc:
        res = svc.generate(prompt, opts)
        plain = svc.generate(prompt, GenerateOptions(max_new_tokens=12, speedup=speedup, sampling=sampling))
    assert plain.tokens == res.tokens and plain.logprobs is None  # asking for logprobs changes nothing else
    assert len(res.logprobs) == len(res.tokens) and (min(res.budgets) < L) == (speedup is not None)
    for i, (tok, budget, lp) in enumerate(zip(res.tokens, res.budgets, res.logprobs, strict=True)):
        ls = log_softmax(be.logits(prompt + list(res.tokens[:i]), list(layers_for_budget(L, budget, w))))
        assert lp.token == tok and lp.logprob == pytest.approx(ls[tok], abs=1e-9)
        assert [t for t, _ in lp.top] == list(np.argsort(-ls, kind="stable")[:4])
        assert [v for _, v in lp.top] == pytest.approx(list(np.sort(ls)[::-1][:4]), abs=1e-9)
        if budget < L:  # negative control: the full-depth logits give other values
            full = log_softmax(be.logits(prompt + list(res.tokens[:i]), list(range(L))))
            assert abs(full[tok] - lp.logprob) > 1e-3


def test_prompt_scoring_is_teacher_forced_at_full_depth_and_frees_its_slot():
    gen = fake_generator()
    be, L = gen.backend, gen.backend.num_layers
    prompt = [3, 8, 13, 21, 34, EOS, 7]
    with Service(gen) as svc:
        busy = svc.submit([4, 4], GenerateOptions(max_new_tokens=30))  # scoring runs between its steps
        scored = svc.score(prompt, 2).result(30)
        busy.result(30)
        assert svc.score([5], 1).result(30) == []  # one token: nothing to score
    assert [e.token for e in scored] == prompt[1:]
    for i, e in enumerate(scored):
        ls = log_softmax(be.logits(prompt[: i + 1], list(range(L))))
        assert e.logprob == pytest.approx(ls[prompt[i + 1]], abs=1e-9) and len(e.top) == 2
    assert be.slots.num_free == be.max_batch
    direct = score_prompt(be, prompt, 2)  # the same without a service
    assert [e.logprob for e in direct] == [e.logprob for e in scored]
