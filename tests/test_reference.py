"""The PyTorch reference: equals HF generate at full depth; cached == uncached under skipping (KV invariant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skipdecode.export.reference import TorchReference, recompute_logits
from skipdecode.export.torch_generator import TorchGenerator
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.schedule import Schedule, make_plan
from skipdecode.runtime.slot_backend import left_pad

from .conftest import PROMPTS
from .recorders import record


def generator(model):
    return TorchGenerator.from_model(model)


def test_full_depth_equals_hf_generate(tiny_model):
    _, model = tiny_model
    gen = generator(model)
    out = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=24))
    ids, mask = left_pad(PROMPTS, pad_id=1)
    hf = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1)
    hf_new = hf[:, ids.shape[1]:].tolist()
    assert [r.tokens for r in out] == hf_new
    assert all(r.budgets == [model.config.num_hidden_layers] * 24 for r in out)


def run_recorded(model, opts):
    gen = generator(model)
    rec = record(gen.backend)
    return gen.generate(PROMPTS, opts), rec


def uncached(model, sequence, layer_sets):
    """Recompute one whole sequence (prompt + generated) with the given per-column layer sets -> logits [S, V]."""
    ids = torch.tensor([sequence])
    with torch.inference_mode():
        return recompute_logits(model, ids, torch.ones_like(ids), layer_sets).numpy()[0]


@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_cached_skipping_equals_uncached_recomputation(tiny_model, speedup):
    _, model = tiny_model
    n = 32
    opts = GenerateOptions(max_new_tokens=n, speedup=speedup)
    results, rec = run_recorded(model, opts)
    for row, (prompt, r) in enumerate(zip(PROMPTS, results, strict=True)):
        p = len(prompt)  # every row has its own schedule: its own prompt length
        plan = make_plan(Schedule.for_speedup(model.config.num_hidden_layers, speedup), p, p + n)
        assert min(s.bucket for s in plan.steps) < model.config.num_hidden_layers  # layers really skipped
        assert r.budgets[1:] == [s.bucket for s in plan.steps]
        logits = uncached(model, prompt + r.tokens[:-1], plan.pass_layers())
        assert len(rec[row]) == n
        for i, cached in enumerate(rec[row]):
            np.testing.assert_allclose(cached, logits[p - 1 + i], atol=1e-5, rtol=0)
            assert np.argmax(logits[p - 1 + i]) == r.tokens[i]


def test_negative_control_non_monotone_layer_sets_disagree(tiny_model):
    """Growing budgets break the KV invariant: cached decoding then differs from recomputation."""
    _, model = tiny_model
    L = model.config.num_hidden_layers
    ref = TorchReference(model)
    prompt = PROMPTS[0]
    slots = ref.slots.allocate(1)
    logits = [ref.prefill_rows([prompt], slots)[0]]
    budgets = [2, L, 2, L, 2, L, 2]  # violates monotonicity
    tokens, sets = [int(np.argmax(logits[0]))], [tuple(range(L))] * len(prompt)
    for b in budgets:
        sets.append(Schedule(L, L, 1).layers(b))
        logits.append(ref.decode_rows(slots, np.array([tokens[-1]]), b, np.ones((1, b), bool))[0].copy())
        tokens.append(int(np.argmax(logits[-1])))
    rec = uncached(model, prompt + tokens[:-1], sets)
    p = len(prompt)
    worst = max(np.abs(logits[i] - rec[p - 1 + i]).max() for i in range(len(logits)))
    assert worst > 1e-3, f"non-monotone layer sets should break cached == uncached, worst diff {worst}"


def test_sampling_is_seeded_and_eos_stops(tiny_model):
    _, model = tiny_model
    gen = generator(model)
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=12, speedup=2.0, sampling=sampling))
    b = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=12, speedup=2.0, sampling=sampling))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    stop = a[0].tokens[3]
    c = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=12, speedup=2.0, sampling=sampling,
                                              eos_token_id=stop))
    assert c[0].tokens == a[0].tokens[: a[0].tokens.index(stop) + 1]
    assert c[0].finish_reason == "eos"
    d = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=12, speedup=2.0, sampling=sampling,
                                              stop_token_ids=(stop,)))
    assert d[0].finish_reason == "stop" and d[0].tokens[-1] == stop
