"""CTranslate2 benchmark peer (bench/ct2_peer.py): a converted tiny OPT decodes the HF model's greedy tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install -e .[peers])")
torch = pytest.importorskip("torch")

from skipdecode.export.random_models import build_random_opt  # noqa: E402


def _peer_module():
    try:
        from skipdecode.bench import ct2_peer
        return ct2_peer
    except ImportError:  # an install that predates the bench package: load the file itself
        path = Path(__file__).resolve().parents[1] / "bench" / "ct2_peer.py"
        spec = importlib.util.spec_from_file_location("_ct2_peer_under_test", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


ct2_peer = _peer_module()
PROMPTS = [[2, 17, 29, 41, 53, 67, 71], [2, 101, 5], [2, 7, 11, 13, 190]]
NEW = 6


@pytest.fixture(scope="module", params=["tiny-preln", "tiny-postln"])
def checkpoint(request, tmp_path_factory):
    # CTranslate2's OPT converter needs vocab_size % 8 == 0 (the test shapes have 211)
    model = build_random_opt(request.param, seed=0, init_std=0.15, vocab_size=216)
    out = tmp_path_factory.mktemp(f"ct2-{request.param}")
    model.save_pretrained(out)
    return model, out


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(NEW):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_fp32_greedy_tokens_match_hf(checkpoint, tmp_path):
    model, ckpt = checkpoint
    out = ct2_peer.convert(ckpt, tmp_path / "ct2", "float32")
    gen = ct2_peer.CT2Generator(out, threads=1)
    assert gen.generate(PROMPTS, NEW) == [_hf_greedy(model, p) for p in PROMPTS]
    timing = ct2_peer.time_generate(gen, PROMPTS, 4, repeats=2, warmup=0)
    assert timing.tokens_per_s > 0 and len(timing.seconds) == 2


def test_int8_converts_and_generates_exactly_n_tokens(checkpoint, tmp_path):
    _, ckpt = checkpoint
    gen = ct2_peer.CT2Generator(ct2_peer.convert(ckpt, tmp_path / "ct2", "int8"), threads=1)
    out = gen.generate(PROMPTS, NEW)
    assert [len(r) for r in out] == [NEW] * len(PROMPTS)
    assert all(0 <= t < 216 for r in out for t in r)


def test_vocab_not_multiple_of_8_is_refused_clearly(tmp_path):
    build_random_opt("tiny-preln", seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multiple of 8"):
        ct2_peer.convert(tmp_path, tmp_path / "ct2", "float32")


@pytest.mark.parametrize("vendor, env, library", [
    ("AuthenticAMD", {}, "onednn"),  # CTranslate2's own choice off Intel (the faster one measured on AMD EPYC)
    ("GenuineIntel", {}, "mkl"),
    ("AuthenticAMD", {"CT2_USE_MKL": "1"}, "mkl"),
    ("GenuineIntel", {"CT2_USE_MKL": "0"}, "onednn"),
])
def test_gemm_library_is_recorded(monkeypatch, vendor, env, library):
    from skipdecode.bench import ct2_peer

    for k in ct2_peer.GEMM_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(ct2_peer, "_cpu_vendor", lambda: vendor)
    assert ct2_peer.gemm_config() == {"library": library, "env": env}
