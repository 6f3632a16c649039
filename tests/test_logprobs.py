"""Log-probabilities: of generated tokens (from the logits the sampler used, under each token's own schedule) and
of prompt tokens (teacher-forced at full depth). Fake backend: against its logits function; a tiny real engine:
against the PyTorch reference's logits."""

from __future__ import annotations

import numpy as np
import pytest
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.logprobs import log_softmax, score_prompt, token_logprob
from skipdecode.runtime.request import GenerateOptions
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


# -- a tiny real engine against the PyTorch reference ----------------------------------------------------------------
TOL = 1e-4  # absolute, on log-probabilities: fp32 onnxruntime vs fp32 PyTorch of the same weights (seen: ~2e-6)


def _ref_log_softmax(logits) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.log_softmax(torch.as_tensor(np.asarray(logits)).double(), -1).numpy()  # over the last axis


@pytest.mark.parametrize("speedup", [None, 2.0])
def test_real_engine_logprobs_equal_the_torch_reference(engine_dir, speedup):
    """Generated tokens (each under the bucket it was produced with) and echoed prompt tokens (full depth): the
    served log-probabilities equal the log-softmax of the PyTorch reference's logits within TOL. Negative controls:
    the reference one position off, and (at speedup 2) the full-depth reference, are far outside TOL."""
    torch = pytest.importorskip("torch")
    from skipdecode.export.reference import TorchReference
    from skipdecode.runtime.engine import Engine
    from transformers import OPTForCausalLM

    _, ckpt, out = engine_dir
    prompt, k = [2, 17, 29, 41, 53, 67, 71], 5
    with Engine.load(out) as engine:
        L, warmup = engine.backend.num_layers, engine.backend.warmup_layers
        with Service(engine) as svc:
            res = svc.generate(prompt, GenerateOptions(max_new_tokens=10, speedup=speedup, logprobs=k))
            scored = svc.score(prompt, k).result(60)
    assert (min(res.budgets) < L) == (speedup is not None)
    model = OPTForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    # generated tokens: the reference's slot API, fed the served tokens through the served buckets
    ref = TorchReference(model, max_batch=1, warmup_layers=warmup if warmup is not None else 1)
    slot = ref.slots.allocate(1)
    with torch.no_grad():
        steps = [_ref_log_softmax(ref.prefill_rows([prompt], slot)[0])]
        for tok, budget in zip(res.tokens[:-1], res.budgets[1:], strict=True):
            logits = ref.decode_rows(slot, np.array([tok]), budget, np.ones((1, budget), dtype=bool))
            steps.append(_ref_log_softmax(logits[slot[0]]))
        full = _ref_log_softmax(model(torch.tensor([prompt + list(res.tokens)])).logits[0])  # [positions, V]
    err = 0.0
    for tok, lp, ls in zip(res.tokens, res.logprobs, steps, strict=True):
        assert lp.token == tok and len(lp.top) == k
        err = max(err, abs(lp.logprob - ls[tok]), *(abs(v - ls[t]) for t, v in lp.top))
        assert lp.top[-1][1] >= np.sort(ls)[-k] - TOL  # the top k are the reference's k most likely
    assert err < TOL, err
    shifted = zip(res.tokens[1:], res.logprobs[1:], steps[:-1], strict=True)
    off = max(abs(lp.logprob - ls[tok]) for tok, lp, ls in shifted)
    assert off > 100 * TOL  # negative control: the reference one position off
    if speedup is not None:  # negative control: the full-depth reference, where layers were skipped
        skipped = [i for i, b in enumerate(res.budgets) if b < L]
        assert max(abs(res.logprobs[i].logprob - full[len(prompt) - 1 + i][res.tokens[i]]) for i in skipped) > 100 * TOL

    # echoed prompt tokens: the full-depth forward of the prompt
    assert len(scored) == len(prompt) - 1
    for i, e in enumerate(scored):
        ls = full[i]
        assert e.token == prompt[i + 1] and abs(e.logprob - ls[e.token]) < TOL
        assert max(abs(v - ls[t]) for t, v in e.top) < TOL
    assert max(abs(e.logprob - full[i + 1][e.token]) for i, e in enumerate(scored[:-1])) > 100 * TOL
