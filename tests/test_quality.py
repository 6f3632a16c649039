"""Quality report: metric definitions, reproducibility, the Generator seam, outputs, and the committed model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.torch_generator import TorchGenerator
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.request import GenerateOptions, Generation
from skipdecode.training.quality import EvalConfig, evaluate_model, rouge_l, run_report, token_overlap
from skipdecode.training.tokenizer_train import train_tokenizer_file

from .train_helpers import VOCAB, synthetic_docs, write_corpus

TINY_KJV = Path(__file__).resolve().parents[1] / "models" / "tiny-opt-kjv"
CFG = EvalConfig(speedups=(1.0, 2.0, 3.0), budgets=((4, 2),), chunks=6, gen_prompts=3, prompt_length=8,
                 seq_len=24, batch_size=4, threads=1)


@pytest.fixture(scope="module")
def model():
    return build_random_opt("tiny-preln", seed=0, init_std=0.15)


def random_chunks(n: int = 12, seed: int = 0) -> np.ndarray:
    chunks = np.random.default_rng(seed).integers(4, 211, size=(n, CFG.seq_len))
    chunks[:, 0] = 2
    return chunks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny OPT with a tokenizer.json (vocabulary 300) and a held-out text file."""
    out = tmp_path_factory.mktemp("ckpt")
    build_random_opt("tiny-preln", seed=0, init_std=0.15, vocab_size=VOCAB).save_pretrained(out / "model")
    train_tokenizer_file(synthetic_docs(), out / "model" / "tokenizer.json", vocab_size=VOCAB)
    write_corpus(out / "heldout.txt", synthetic_docs(20, seed=1))
    return out


def test_rouge_l_and_overlap_values():
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # LCS 1,3,4
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0 and rouge_l([1, 2], [3, 4]) == 0.0 and rouge_l([], [1]) == 0.0
    assert rouge_l([3, 2, 1], [1, 2, 3]) == pytest.approx(1 / 3)  # order matters for ROUGE-L ...
    assert token_overlap([3, 2, 1], [1, 2, 3]) == 1.0  # ... not for overlap
    assert token_overlap([1, 1, 2], [1, 2, 2, 5]) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_rows_are_reproducible_and_seed_dependent(model):
    a = evaluate_model("m", model, random_chunks(), CFG)
    b = evaluate_model("m", model, random_chunks(), CFG)
    assert a == b
    c = evaluate_model("m", model, random_chunks(seed=1), CFG)
    assert [r["perplexity"] for r in c] != [r["perplexity"] for r in a]


def test_full_depth_row_and_skip_rows(model):
    rows = {r["label"]: r for r in evaluate_model("m", model, random_chunks(), CFG)}
    assert list(rows) == ["1x", "2x", "3x", "M4-m2"]
    full = rows["1x"]
    assert full["agreement"] == 1.0 and full["rouge_l_full"] == 1.0 and full["mean_layers"] == 6.0
    assert full["ppl_ratio"] == 1.0 and full["scored_tokens"] == 12 * (24 - 8)
    for label in ("2x", "3x", "M4-m2"):
        r = rows[label]
        assert r["mean_layers"] == pytest.approx(r["planned_mean_layers"]) and r["mean_layers"] < 6
        assert r["agreement"] < 1.0  # random weights: skipping layers changes predictions
    assert rows["3x"]["mean_layers"] < rows["2x"]["mean_layers"]
    assert (rows["M4-m2"]["max_layers"], rows["M4-m2"]["min_layers"]) == (4, 2)


def test_full_depth_perplexity_equals_hf_loss(model):
    chunks = random_chunks()
    rows = evaluate_model("m", model, chunks, CFG)
    ids = torch.from_numpy(chunks)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits[:, CFG.prompt_length - 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            ids[:, CFG.prompt_length:].reshape(-1))
    assert rows[0]["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


class EchoReference:
    """A stand-in `Generator` (e.g. an onnxruntime Engine): returns the reference continuation."""

    def __init__(self, chunks: np.ndarray, p: int) -> None:
        self.by_prompt = {tuple(c[:p].tolist()): c[p:].tolist() for c in chunks}
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def generate(self, prompts, opts: GenerateOptions) -> list[Generation]:
        self.calls += 1
        return [Generation(tokens=self.by_prompt[tuple(p)], budgets=[5] * opts.max_new_tokens) for p in prompts]


def test_continuation_metrics_come_from_the_given_generator(model):
    chunks = random_chunks()
    echo = EchoReference(chunks, CFG.prompt_length)
    rows = evaluate_model("m", model, chunks, CFG, generator=echo)
    assert echo.calls == len(rows)  # 3 prompts fit one generate() call of gen_batch=8
    assert all(r["rouge_l_ref"] == 1.0 and r["overlap_ref"] == 1.0 and r["mean_layers"] == 5 for r in rows)
    torch_rows = evaluate_model("m", model, chunks, CFG)
    assert torch_rows[0]["rouge_l_ref"] < 1.0  # negative control: the torch reference does not echo
    assert [r["perplexity"] for r in rows] == [r["perplexity"] for r in torch_rows]  # teacher-forced: torch


def test_run_report_writes_json_table_and_plot(checkpoint, tmp_path):
    model_dir = str(checkpoint / "model")
    cfg = EvalConfig(speedups=(1.0, 2.0), chunks=4, gen_prompts=2, prompt_length=8, seq_len=24, threads=1)
    rows = run_report(model_dir, model_dir, [str(checkpoint / "heldout.txt")], cfg, tmp_path / "q.json", tmp_path)
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved == rows and [r["role"] for r in saved] == ["tuned"] * 2 + ["base"] * 2
    for key in ("model", "speedup", "perplexity", "mean_layers", "agreement", "rouge_l_ref", "rouge_l_full"):
        assert all(key in r for r in saved), key
    table = (tmp_path / "quality.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| model | schedule |")
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_eval_input_errors(checkpoint, tmp_path):
    from skipdecode.train_cli import main
    with pytest.raises(InputError, match="prompt_length=30"):
        EvalConfig(prompt_length=30, seq_len=24)
    assert main(["eval", "--model", str(checkpoint / "model"), "--max-layers", "4", "--json", "x.json"]) == 2
    with pytest.raises(InputError, match="missing.txt does not exist"):
        run_report(str(checkpoint / "model"), None, [str(tmp_path / "missing.txt")], CFG, tmp_path / "q.json")


def test_committed_model_loads_offline_and_generates():
    gen = TorchGenerator.load(str(TINY_KJV / "skip-tuned"))
    assert gen.backend.num_layers >= 12
    prompt = gen.encode("And God said, Let there be")
    (out,) = gen.generate([prompt], GenerateOptions(max_new_tokens=16, speedup=2, eos_token_id=None))
    assert len(out.tokens) == 16 and out.budgets[0] == gen.backend.num_layers
    assert out.budgets == sorted(out.budgets, reverse=True) and np.mean(out.budgets) < gen.backend.num_layers
    words = out.text.split()
    assert len(words) >= 5 and sum(w.strip(",.;:").isalpha() for w in words) >= 0.8 * len(words), out.text


def test_committed_model_is_trained():
    """Held-out perplexity far below chance (vocabulary 8192): the weights are the trained ones."""
    from skipdecode.export.models import load_model
    from skipdecode.training.corpus import read_documents
    from skipdecode.training.quality import eval_chunks
    model, codec = load_model(str(TINY_KJV / "skip-tuned"))
    cfg = EvalConfig(speedups=(1.0, 2.0), chunks=8, gen_prompts=1, threads=1)
    chunks = eval_chunks(codec.tokenizer, read_documents([TINY_KJV / "heldout.txt"]), cfg)
    full, half = evaluate_model("skip-tuned", model, chunks, cfg)
    assert full["perplexity"] < 60 and half["perplexity"] < 1.3 * full["perplexity"], (full, half)


def test_onnxruntime_engine_plugs_into_the_continuation_metrics(checkpoint, tmp_path):
    """The `Generator` seam with the real compiled runtime: same greedy continuations as the torch reference."""
    pytest.importorskip("onnxruntime")
    from skipdecode.export.exporter import ExportConfig, export
    from skipdecode.export.models import load_model
    from skipdecode.runtime.engine import Engine
    from skipdecode.training.corpus import read_documents
    from skipdecode.training.quality import eval_chunks
    export(ExportConfig(lossless_policy="default",
                        model=str(checkpoint / "model"), out=tmp_path / "engine", speedups=(2.0,), max_batch=4),
           progress=False)
    model, codec = load_model(str(checkpoint / "model"))
    cfg = EvalConfig(speedups=(1.0, 2.0), chunks=4, gen_prompts=3, prompt_length=8, seq_len=24, threads=1)
    chunks = eval_chunks(codec.tokenizer, read_documents([checkpoint / "heldout.txt"]), cfg)
    ort_rows = evaluate_model("m", model, chunks, cfg, generator=Engine.load(tmp_path / "engine", threads=1))
    torch_rows = evaluate_model("m", model, chunks, cfg)
    for a, b in zip(ort_rows, torch_rows, strict=True):
        assert a["mean_layers"] == b["mean_layers"]  # every 2x budget is an exported bucket: exact schedule
        assert a["rouge_l_ref"] == pytest.approx(b["rouge_l_ref"])
        assert a["rouge_l_full"] == pytest.approx(b["rouge_l_full"])
