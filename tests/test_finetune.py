"""Fine-tuning: the training step runs exactly the inference layer sets, learns, resumes, and rejects bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.reference import TorchReference
from skipdecode.export.torch_generator import TorchGenerator
from skipdecode.runtime.errors import InputError, ModelError, ScheduleError
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.schedule import Schedule, make_plan
from skipdecode.runtime.tokenizer import TextCodec
from skipdecode.training.corpus import make_chunks, read_documents, token_stream
from skipdecode.training.finetune import (
    FinetuneJob,
    TrainConfig,
    batch_plan,
    chunk_loss,
    latest_checkpoint,
    layer_sets,
    run_job,
    train,
)
from skipdecode.training.tokenizer_train import train_bpe, train_tokenizer_file

from .train_helpers import VOCAB, synthetic_docs, write_config, write_corpus

SEQ = 24
CFG = TrainConfig(steps=8, batch_size=4, seq_len=SEQ, lr=3e-3, warmup_steps=2, speedups=(1.0, 2.0, 3.0),
                  prompt_range=(4, 10), checkpoint_every=3, seed=0, threads=1)


def pattern_chunks(n: int = 32, vocab: int = 211, seq: int = SEQ) -> np.ndarray:
    """Each row follows t -> (7 t + 3) mod vocab from a random start: learnable in a few dozen steps."""
    rng = np.random.default_rng(0)
    rows = np.empty((n, seq), dtype=np.int64)
    rows[:, 0] = rng.integers(4, vocab, size=n)
    for c in range(1, seq):
        rows[:, c] = (rows[:, c - 1] * 7 + 3) % vocab
    return rows


def cached_generated_loss(model, chunk: np.ndarray, schedule: Schedule, p: int) -> float:
    """Teacher-forced loss of the generated part through the *cached* inference path (TorchReference)."""
    B, T = chunk.shape
    ref = TorchReference(model, warmup_layers=schedule.warmup)
    slots = ref.slots.allocate(B)
    logits = [ref.prefill_rows(chunk[:, :p].tolist(), slots)]
    for step in make_plan(schedule, p, T).steps:
        gates = np.ones((B, step.bucket), dtype=bool)
        logits.append(ref.decode_rows(slots, chunk[:, step.column], step.bucket, gates)[slots].copy())
    lg = torch.from_numpy(np.stack(logits, 1))  # [B, T - p, V]: columns p-1 .. T-2
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), torch.from_numpy(chunk[:, p:]).reshape(-1))


def test_training_step_uses_the_inference_layer_sets(tiny_model):
    _, model = tiny_model
    L = model.config.num_hidden_layers
    chunk = np.random.default_rng(1).integers(4, 211, size=(3, SEQ))
    plans = [batch_plan(k, 32, L, CFG) for k in range(20)]
    plan = next(pl for pl in plans if pl.speedup == 3.0)
    assert {pl.speedup for pl in plans} == {1.0, 2.0, 3.0}
    assert all(4 <= pl.prompt_length <= 10 for pl in plans)
    with torch.no_grad():
        trained = chunk_loss(model, torch.from_numpy(chunk), plan, loss_on="generated").item()
    expected = cached_generated_loss(model, chunk, Schedule.for_speedup(L, 3.0), plan.prompt_length).item()
    assert trained == pytest.approx(expected, abs=1e-4)
    # negative control: the layer sets of another speedup give a different loss
    wrong = type(plan)(plan.rows, 2.0, plan.prompt_length, layer_sets(L, 2.0, plan.prompt_length, SEQ))
    with torch.no_grad():
        other = chunk_loss(model, torch.from_numpy(chunk), wrong, loss_on="generated").item()
    assert abs(other - expected) > 1e-3


def test_layer_sets_are_the_plan_of_each_column():
    sets = layer_sets(12, 3.0, p=5, T=20)
    assert len(sets) == 19 and sets[:5] == [tuple(range(12))] * 5
    assert sets[5:] == [s.layers for s in make_plan(Schedule.for_speedup(12, 3.0), 5, 20).steps]
    assert all(set(b) <= set(a) for a, b in zip(sets, sets[1:], strict=False))  # KV invariant


def test_batch_plan_is_a_pure_function_of_seed_and_step():
    a = [batch_plan(k, 10, 6, CFG) for k in range(6)]
    b = [batch_plan(k, 10, 6, CFG) for k in range(6)]
    assert [(x.rows.tolist(), x.speedup, x.prompt_length) for x in a] == \
           [(x.rows.tolist(), x.speedup, x.prompt_length) for x in b]
    seen = np.concatenate([x.rows for x in a[:5]])[:10]  # 4 rows/step: the first epoch covers every chunk once
    assert sorted(seen.tolist()) == list(range(10))


def test_short_run_lowers_loss(tmp_path):
    model = build_random_opt("tiny-preln", seed=0)
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=SEQ, lr=1e-2, warmup_steps=5, speedups=(1.0, 2.0, 3.0),
                      prompt_range=(4, 10), checkpoint_every=100, threads=1)
    state = train(model, pattern_chunks(), cfg, tmp_path)
    assert state.step == 40
    assert np.mean(state.losses[-5:]) < 0.6 * np.mean(state.losses[:3]), state.losses


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    chunks = pattern_chunks()
    full = build_random_opt("tiny-preln", seed=0)
    reference = train(full, chunks, CFG, tmp_path / "a")

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt
    part = build_random_opt("tiny-preln", seed=0)
    with pytest.raises(KeyboardInterrupt):
        train(part, chunks, CFG, tmp_path / "b", callback=crash)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    (tmp_path / "b" / "checkpoints" / ".tmp-step-00000006").mkdir()  # a write cut short: must be ignored
    with pytest.raises(InputError, match="--resume"):
        train(build_random_opt("tiny-preln", seed=0), chunks, CFG, tmp_path / "b")
    fresh = build_random_opt("tiny-preln", seed=7)  # other weights: resume must restore them
    resumed = train(fresh, chunks, CFG, tmp_path / "b", resume=True)
    assert resumed.step == 8 and resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    for (name, a), b in zip(full.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000006", "step-00000008"]  # keep_checkpoints=2


def test_tokenizer_has_opt_special_ids_and_prepends_bos():
    tok = train_bpe(synthetic_docs(), vocab_size=VOCAB)
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    codec = TextCodec(tok)
    ids = codec.encode("And the lord said unto Moses, go.")
    assert ids[0] == 2 and 2 not in ids[1:]
    assert codec.decode(ids) == "And the lord said unto Moses, go."
    with pytest.raises(InputError, match="vocab_size=100"):
        train_bpe(synthetic_docs(), vocab_size=100)


def test_job_from_config_saves_a_model_the_cli_loads(tmp_path):
    docs = synthetic_docs()
    data = write_corpus(tmp_path / "train.txt", docs)
    tok = train_tokenizer_file(docs, tmp_path / "tokenizer.json", vocab_size=VOCAB)
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, prompt_range=(4, 16), checkpoint_every=2, threads=1)
    job = FinetuneJob(out=tmp_path / "pre", data=(str(data),), heldout=(str(data),), train=cfg,
                      config=str(write_config(tmp_path / "arch.json")), tokenizer=str(tok))
    summary = run_job(job)
    assert summary["steps"] == 3 and summary["heldout_perplexity"] > 1
    from safetensors import safe_open
    with safe_open(str(tmp_path / "pre" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    gen = TorchGenerator.load(str(tmp_path / "pre"))
    out = gen.generate([gen.encode("And the lord")], GenerateOptions(max_new_tokens=6, speedup=2))
    assert len(out[0].tokens) >= 1 and isinstance(out[0].text, str)
    with pytest.raises(InputError, match="--resume"):  # a second run must not silently restart
        run_job(job)
    # skip-tune the result: --model takes the directory the first job wrote
    tuned = FinetuneJob(out=tmp_path / "tuned", data=(str(data),), model=str(tmp_path / "pre"),
                        train=TrainConfig(steps=2, batch_size=4, seq_len=32, prompt_range=(4, 16),
                                          speedups=(1.0, 2.0), threads=1))
    assert run_job(tuned)["steps"] == 2 and (tmp_path / "tuned" / "tokenizer.json").is_file()


def test_missing_and_empty_data_name_the_path(tmp_path):
    with pytest.raises(InputError, match="nope.txt does not exist"):
        read_documents([tmp_path / "nope.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(InputError, match="empty.txt is empty"):
        read_documents([empty])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        read_documents([bad])
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first doc"}\n\n{"text": "second"}\n')
    assert read_documents([good]) == ["first doc", "second"]
    with pytest.raises(InputError, match="fewer than one chunk"):
        make_chunks(np.arange(10), 32)


def test_non_opt_checkpoint_and_bad_speedup_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    data = write_corpus(tmp_path / "d.txt", synthetic_docs(4))
    job = FinetuneJob(out=tmp_path / "o", data=(str(data),), model=str(tmp_path / "gpt2"), train=CFG)
    with pytest.raises(ModelError, match="'gpt2' is not supported"):
        run_job(job)
    bad = TrainConfig(steps=1, seq_len=SEQ, prompt_range=(4, 10), speedups=(20.0,), threads=1)
    with pytest.raises(ScheduleError, match="speedup=20"):
        train(build_random_opt("tiny-preln"), pattern_chunks(), bad, tmp_path / "s")


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from skipdecode.train_cli import main
    rc = main(["finetune", "--model", str(tmp_path), "--data", str(tmp_path / "missing.txt"), "--out",
               str(tmp_path / "o"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("skipdecode finetune: error:")


def test_token_stream_joins_documents_with_eos():
    tok = train_bpe(synthetic_docs(), vocab_size=VOCAB)
    stream = token_stream(tok, ["and the", "lord"])
    one = tok.encode("and the", add_special_tokens=False).ids
    assert stream.tolist() == one + [2] + tok.encode("lord", add_special_tokens=False).ids
