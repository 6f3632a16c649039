"""The PyTorch reference: equals HF generate at full depth; cached == uncached under skipping (KV invariant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skipdecode.export.generator import TorchGenerator
from skipdecode.export.reference import TorchReference, recompute_logits
from skipdecode.runtime.generation import GenerateOptions, left_pad
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.schedule import Schedule, Step, make_plan

from .conftest import PROMPTS


class Recorder:
    """Wraps a backend and keeps every step's logits and plan step."""

    def __init__(self, backend):
        self.backend = backend
        self.logits, self.steps = [], []
        for name in ("num_layers", "buckets", "max_batch", "max_length", "warmup_layers"):
            setattr(self, name, getattr(backend, name))

    def prefill(self, *args):
        logits = self.backend.prefill(*args)
        self.logits.append(logits.copy())  # a backend's logits buffer is only valid until its next call
        return logits

    def decode(self, *args):
        self.steps.append(args[-1])
        logits = self.backend.decode(*args)
        self.logits.append(logits.copy())
        return logits


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
    rec = Recorder(gen.backend)
    gen.backend = rec
    return gen.generate(PROMPTS, opts), rec


def uncached(model, results, layer_sets):
    """Recompute whole sequences (prompt + generated) with the given per-column layer sets."""
    seqs = [p + r.tokens[:-1] for p, r in zip(PROMPTS, results, strict=True)]
    ids, mask = left_pad(seqs, pad_id=1)
    # left_pad right-aligns; all rows have the same number of generated tokens, so columns line up
    with torch.inference_mode():
        return recompute_logits(model, torch.from_numpy(ids), torch.from_numpy(mask), layer_sets).numpy()


@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_cached_skipping_equals_uncached_recomputation(tiny_model, speedup):
    _, model = tiny_model
    n = 32
    opts = GenerateOptions(max_new_tokens=n, speedup=speedup)
    results, rec = run_recorded(model, opts)
    p = max(map(len, PROMPTS))
    plan = make_plan(Schedule.for_speedup(model.config.num_hidden_layers, speedup), p, p + n)
    assert min(s.bucket for s in plan.steps) < model.config.num_hidden_layers  # layers really skipped
    logits = uncached(model, results, plan.pass_layers())
    for i, cached in enumerate(rec.logits):
        np.testing.assert_allclose(cached, logits[:, p - 1 + i], atol=1e-5, rtol=0)
        assert (np.argmax(logits[:, p - 1 + i], -1) == [r.tokens[i] for r in results]).all()
    assert [r.budgets[1:] for r in results] == [[s.bucket for s in plan.steps]] * 3


def test_negative_control_non_monotone_layer_sets_disagree(tiny_model):
    """Growing budgets break the KV invariant: cached decoding then differs from recomputation."""
    _, model = tiny_model
    L = model.config.num_hidden_layers
    ref = TorchReference(model)
    ids, mask = left_pad(PROMPTS, pad_id=1)
    B, p = ids.shape
    T = p + 8
    full = np.zeros((B, T), dtype=np.int64)
    full[:, :p] = mask
    logits = ref.prefill(ids, np.cumsum(mask, 1) * mask - 1, full)
    budgets = [2, L, 2, L, 2, L, 2]  # violates monotonicity
    tokens, seq_logits, sets = [np.argmax(logits, -1)], [logits], [tuple(range(L))] * p
    for i, b in enumerate(budgets):
        c = p + i
        full[:, c] = 1
        step = Step(column=c, scheduled=b, bucket=b, layers=Schedule(L, L, 1).layers(b))
        sets.append(step.layers)
        seq_logits.append(ref.decode(tokens[-1], full[:, : c + 1].sum(1) - 1, full, step))
        tokens.append(np.argmax(seq_logits[-1], -1))
    seqs = np.concatenate([ids, np.stack(tokens[:-1], 1)], 1)
    with torch.inference_mode():
        rec = recompute_logits(model, torch.from_numpy(seqs), torch.from_numpy(full[:, :-1]), sets).numpy()
    worst = max(np.abs(seq_logits[i] - rec[:, p - 1 + i]).max() for i in range(len(seq_logits)))
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
