"""fp16 prefill with left padding: the graph math in half precision must stay finite and equal each prompt run alone.

A crafted head makes every attention score strongly negative (-64): an additive mask of the fp16 minimum added to it
overflows to -inf, the padding rows' softmax is NaN and the NaN reaches the real rows of the padded prompt (negative
control). onnxruntime CPU upcasts and hides this; CUDA and TensorRT run the fp16 math natively.
"""

from __future__ import annotations

import pytest
import torch
from skipdecode.export import graphs
from skipdecode.export.graphs import PrefillGraph
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.reference import recompute_logits

PAD = 1
PROMPTS = [[2, 17, 29, 41, 53, 67, 71], [2, 101, 5]]


def crafted_model(style: str) -> torch.nn.Module:
    """Layer 0's queries and keys are constant vectors pointing in opposite directions: every score is
    -scaling * 4 * 4 * head_dim = -64 (head_dim 16), far below the -16 where fp16's minimum + score overflows."""
    model = build_random_opt(style, seed=0, init_std=0.15)
    attn = model.model.decoder.layers[0].self_attn
    with torch.no_grad():
        for proj, sign in ((attn.q_proj, 1.0), (attn.k_proj, -1.0)):
            proj.weight.zero_()
            proj.bias.fill_(4.0 * sign)
    return model.half()


def batch(prompts):
    S = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    return ids, (torch.cumsum(mask, 1) * mask - 1).clamp(min=0), mask


def prefill_logits(model, prompts) -> torch.Tensor:
    with torch.no_grad():
        return PrefillGraph(model)(*batch(prompts))[0]


def old_additive_mask(scores, allowed):
    return scores + (1.0 - allowed.to(scores.dtype)) * torch.finfo(scores.dtype).min


@pytest.mark.parametrize("style", ["tiny-preln", "tiny-postln"])
def test_fp16_left_padded_prefill_is_finite_and_equals_solo_runs(style):
    model = crafted_model(style)
    got = prefill_logits(model, PROMPTS)
    assert torch.isfinite(got).all()
    for row, prompt in enumerate(PROMPTS):
        alone = prefill_logits(model, [prompt])[0]
        torch.testing.assert_close(got[row], alone, atol=5e-2, rtol=1e-2)


def test_old_additive_mask_gives_nan_in_fp16(monkeypatch):
    """Negative control: the crafted head really overflows an additive fp16-minimum mask."""
    model = crafted_model("tiny-preln")
    monkeypatch.setattr(graphs, "masked", old_additive_mask)
    got = prefill_logits(model, PROMPTS)
    assert torch.isnan(got[1]).all()  # the left-padded prompt
    assert torch.isfinite(prefill_logits(model, [PROMPTS[1]])).all()  # alone (no padding) it is fine


def test_reference_recompute_is_finite_in_fp16_with_padding():
    model = crafted_model("tiny-preln")
    ids, _, mask = batch(PROMPTS)
    with torch.no_grad():
        logits = recompute_logits(model, ids, mask, [range(6)] * ids.shape[1])
    real = mask.bool()
    assert torch.isfinite(logits[real]).all()
