"""Every valid OPT config and KV window exports: the attention flavour is chosen automatically for head sizes
GroupQueryAttention refuses, parity fits any max_length, and what cannot work is refused before tracing."""

from __future__ import annotations

import json

import pytest
from skipdecode.export import exporter
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.parity import plan_parity
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.torch_generator import TorchGenerator
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError, SkipDecodeError
from skipdecode.runtime.request import GenerateOptions

from skipdecode.cli import main

from .conftest import PROMPTS

HEAD_12 = dict(num_hidden_layers=4, hidden_size=48, num_attention_heads=4, ffn_dim=96, vocab_size=211,
               max_position_embeddings=64)


@pytest.fixture(scope="module")
def head12_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("head12")
    build_random_opt(HEAD_12, seed=0, init_std=0.15).save_pretrained(out)
    return out


@pytest.fixture
def no_tracing(monkeypatch):
    monkeypatch.setattr(exporter, "trace", lambda *a, **k: pytest.fail("tracing started"))


def test_head_size_12_exports_with_matmul_by_default(head12_checkpoint, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", "--model", str(head12_checkpoint), "--out", str(out), "--speedups", "2",
                 "--lossless-policy", "default"]) == 0
    captured = capsys.readouterr()
    reason = "auto: head size 12 is not a multiple of 8, which GroupQueryAttention needs"
    assert f"attention matmul ({reason})" in captured.out  # the summary
    assert f"export: attention matmul ({reason})" in captured.err  # progress, before tracing
    man = json.loads((out / "manifest.json").read_text())
    assert (man["attention"], man["attention_reason"]) == ("matmul", reason)
    opts = GenerateOptions(max_new_tokens=12, speedup=2.0)
    got = Engine.load(out).generate(PROMPTS, opts)
    want = TorchGenerator.load(str(head12_checkpoint)).generate(PROMPTS, opts)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_explicit_gqa_with_head_size_12_is_refused_before_tracing(head12_checkpoint, tmp_path, no_tracing):
    with pytest.raises(EngineError, match="attention='gqa' needs a head size that is a multiple of 8 .* head size "
                                          "is 12"):
        export(ExportConfig(lossless_policy="default",
                            model=str(head12_checkpoint), out=tmp_path / "e", speedups=(2.0,), attention="gqa"),
               progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_attention_and_its_reason_are_recorded(engine_dir):
    assert Engine.load(engine_dir[2]).manifest.attention_reason == "auto: onnxruntime's in-place GroupQueryAttention"


@pytest.mark.parametrize("max_length", range(2, 41))
@pytest.mark.parametrize("n_buckets, n_prompts", [(1, 1), (5, 3), (12, 2)])
def test_parity_plan_fits_every_window_and_covers_every_bucket(max_length, n_buckets, n_prompts):
    buckets = tuple(range(1, n_buckets + 1))
    rounds = plan_parity(max_length, buckets, n_prompts)
    assert sorted(b for r in rounds for b in r.buckets) == list(buckets)
    for r in rounds:
        assert len(r.prompt_lengths) == n_prompts and min(r.prompt_lengths) >= 1 and r.steps >= 1
        assert max(r.prompt_lengths) + len(r.buckets) * r.steps <= max_length
        assert list(r.buckets) == sorted(r.buckets, reverse=True)  # monotone within a sequence
    if max_length >= 8 + 2 * n_buckets:
        assert len(rounds) == 1 and rounds[0].prompt_lengths == (5, 2, 8)[:n_prompts]


@pytest.mark.parametrize("max_length", [2, 5])
def test_short_kv_window_exports_and_checks_every_bucket(tiny_checkpoint, tmp_path, max_length):
    out = tmp_path / "e"
    man = export(ExportConfig(lossless_policy="default",
                              model=str(tiny_checkpoint[1]), out=out, max_length=max_length), progress=False)
    assert man.max_length == max_length and len(man.buckets) > 2
    assert {f"decode.{b}.logits" for b in man.buckets} <= set(man.parity)
    res = Engine.load(out).generate([[2]], GenerateOptions(max_new_tokens=max_length - 1, speedup=2.0))
    assert len(res[0].tokens) == max_length - 1


def test_impossible_max_length_is_refused_before_tracing(tiny_checkpoint, tmp_path, no_tracing):
    with pytest.raises(SkipDecodeError, match="max_length=1 is below the minimum 2"):
        export(ExportConfig(lossless_policy="default",
                            model=str(tiny_checkpoint[1]), out=tmp_path / "e", max_length=1), progress=False)
    with pytest.raises(SkipDecodeError, match="max_length=500 is above the maximum 128"):
        export(ExportConfig(lossless_policy="default",
                            model=str(tiny_checkpoint[1]), out=tmp_path / "e", max_length=500), progress=False)


def test_explicit_budgets_record_only_the_speedups_they_cover(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    man = export(ExportConfig(lossless_policy="default",
                              model=str(ckpt), out=tmp_path / "e", budgets=(2,), max_batch=2), progress=False)
    assert man.buckets == (2, man.num_layers)
    assert man.schedule_defaults["speedups"] == []  # the default 2, 3, 5 would need budgets that were not exported
    full = exporter.schedule_defaults(man.num_layers, ExportConfig(lossless_policy="default",
                                                                   model="m", out="o"), tuple(range(1, 13)))
    assert full["speedups"] == [2.0, 3.0, 5.0]  # every budget present: all recorded (the check can pass)
