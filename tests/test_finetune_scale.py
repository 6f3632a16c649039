"""Fine-tuning at scale: task JSONL batches, gradient accumulation and checkpointing, and data-parallel / sharded
runs under torchrun (2 ranks on gloo, CPU) that reproduce the single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.schedule import make_plan, schedule_for
from skipdecode.training.finetune import TrainConfig, step_batch, train
from skipdecode.training.taskdata import collate, encode_records, read_task_records
from skipdecode.training.tokenizer_train import train_tokenizer_file
from transformers import OPTConfig, OPTForCausalLM

from skipdecode.train_cli import main

from .train_helpers import VOCAB, synthetic_docs

SEQ = 48
# Measured on this 2-core CPU (fp32): 2 ranks vs 1 process differ by 3.7e-7 at most in the per-step loss (the
# order of the gradient sums changes; nothing else does). A run on half the global batch (what one rank sees
# alone) differs by 8.6e-2. 1e-4 sits ~100x above the first and ~100x below the second.
LOSS_TOL = 1e-4
SKIPDECODE = str(Path(sys.executable).with_name("skipdecode"))


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM._from_config(cfg, attn_implementation="sdpa")


def write_task(path: Path, docs: list[str]) -> Path:
    """Next-line prediction: prompt = one line of a document, completion = the next line."""
    pairs = [(a, b) for d in docs for a, b in zip(d.splitlines()[:-1], d.splitlines()[1:], strict=True)]
    rows = [{"prompt": a, "completion": " " + b} for a, b in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    """(model dir with tokenizer.json, task JSONL): a 4-layer random OPT and a next-line task."""
    root = tmp_path_factory.mktemp("scale")
    docs = synthetic_docs(40)
    (root / "docs.txt").write_text("\n\n".join(docs))
    model_dir = root / "model"
    model_dir.mkdir()
    train_tokenizer_file(docs, model_dir / "tokenizer.json", VOCAB)
    tiny_opt().save_pretrained(model_dir)
    return model_dir, write_task(root / "task.jsonl", docs)


def test_bad_task_records_name_file_and_line(tmp_path):
    cases = {'{"prompt": "a", "completion": "b"}\nnot json\n': "bad.jsonl:2 is not valid JSON",
             '{"prompt": "a"}\n': "bad.jsonl:1 has no non-empty string field 'completion'",
             '\n["a", "b"]\n': "bad.jsonl:2 is a JSON list",
             '{"prompt": "", "completion": "b"}\n': "bad.jsonl:1 has no non-empty string field 'prompt'"}
    for text, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(InputError, match=message):
            read_task_records([tmp_path / "bad.jsonl"])


def test_task_batch_is_a_static_inference_batch(task_setup):
    model_dir, task = task_setup
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    data = encode_records(read_task_records([task]), tok, SEQ)
    rows = [0, 5, 9]
    ids, attn, target, P = collate(data, rows)
    assert P == max(len(data.prompts[r]) for r in rows)
    for i, r in enumerate(rows):
        p, c = data.prompts[r], data.completions[r][: SEQ - P]  # cut where a generation of this batch stops
        assert p[0] == 2 and data.completions[r][-1] == 2  # </s> opens the prompt and closes the completion
        assert ids[i, P - len(p): P].tolist() == list(p) and attn[i, : P - len(p)].sum() == 0  # left padding
        assert ids[i, P: P + len(c)].tolist() == list(c)
        scored = np.flatnonzero(target[i])  # column c scores token c + 1: exactly the completion tokens
        assert ids[i, scored + 1].tolist() == list(c)
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=SEQ, speedups=(3.0,), prompt_range=(4, 10))
    batch = step_batch(0, data, 12, cfg)
    assert batch.plan.prompt_length == max(len(data.prompts[r]) for r in batch.plan.rows)
    # the layer sets are the runtime's plan for this batch's prompt length: what the tokens will decode with
    assert batch.plan.layer_sets == make_plan(schedule_for(12, 3.0), batch.plan.prompt_length, SEQ).pass_layers()
    with pytest.raises(InputError, match=r"task.jsonl:1: the prompt has \d+ tokens, above the limit"):
        encode_records(read_task_records([task]), tok, 6)


def test_accumulation_and_checkpointing_do_not_change_the_run(task_setup, tmp_path):
    model_dir, task = task_setup
    from tokenizers import Tokenizer
    data = encode_records(read_task_records([task]), Tokenizer.from_file(str(model_dir / "tokenizer.json")), SEQ)
    base = dict(steps=3, batch_size=8, seq_len=SEQ, lr=3e-3, warmup_steps=1, speedups=(2.0, 3.0),
                prompt_range=(4, 10), threads=1, device="cpu")
    ref = train(tiny_opt(), data, TrainConfig(**base), tmp_path / "a").losses
    acc = train(tiny_opt(), data, TrainConfig(**base, micro_batch_size=2, grad_checkpointing=True), tmp_path / "b")
    print(f"micro-batch 2 + checkpointing vs one forward: max |loss diff| = {max_diff(acc.losses, ref):.2e}")
    assert acc.losses == pytest.approx(ref, abs=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == acc.losses[-1]
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["peak_memory_mb"] > 0 and (tmp_path / "b" / "loss.png").is_file()
    with pytest.raises(InputError, match="not divisible by the 3 processes"):
        TrainConfig(**base).split(3)


def test_distillation_adds_a_kl_term_on_skipped_columns(task_setup, tmp_path):
    model_dir, task = task_setup
    from tokenizers import Tokenizer
    data = encode_records(read_task_records([task]), Tokenizer.from_file(str(model_dir / "tokenizer.json")), SEQ)
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=SEQ, lr=3e-3, warmup_steps=1, speedups=(1.0,),
                      prompt_range=(4, 10), threads=1, device="cpu", distill=1.0)
    train(tiny_opt(), data, cfg, tmp_path / "full")
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] == 0 for r in rows)  # full depth is its own teacher
    cfg = TrainConfig(**{**cfg.__dict__, "speedups": (3.0,)})
    train(tiny_opt(), data, cfg, tmp_path / "skip")
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 for r in rows)


# --- 2 ranks on gloo -----------------------------------------------------------------------------------------

def finetune_args(model_dir: Path, task: Path, out: Path, steps: int, batch: int = 8, seed: int = 0,
                  every: int = 100) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(task), "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--seq-len", str(SEQ), "--lr", "3e-3", "--warmup-steps", "1",
            "--speedups", "2,3", "--prompt-range", "4,10", "--device", "cpu", "--threads", "1",
            "--save-dtype", "float32", "--checkpoint-every", str(every), "--seed", str(seed)]


def torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           SKIPDECODE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process(task_setup, tmp_path_factory):
    """The reference: 1 process, global batch 8, 6 steps; and the negative control (global batch 4)."""
    model_dir, task = task_setup
    root = tmp_path_factory.mktemp("single")
    assert main(finetune_args(model_dir, task, root / "ref", 6)) == 0
    assert main(finetune_args(model_dir, task, root / "half", 6, batch=4)) == 0
    return losses(root / "ref"), losses(root / "half"), root / "ref"


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(task_setup, single_process, tmp_path, strategy):
    model_dir, task = task_setup
    ref, half, ref_dir = single_process
    proc = torchrun([*finetune_args(model_dir, task, tmp_path / strategy, 6), "--strategy", strategy])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    got = losses(tmp_path / strategy)
    print(f"{strategy}: max |loss(2 ranks) - loss(1 process)| = {max_diff(got, ref):.2e}; "
          f"negative control (global batch 4): {max_diff(half, ref):.2e}")
    assert max_diff(got, ref) < LOSS_TOL, (got, ref)
    assert max_diff(half, ref) > 100 * LOSS_TOL  # negative control: the check tells the global batch apart
    summary = json.loads((tmp_path / strategy / "training.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == strategy
    # the saved model (gathered from the shards under FSDP) is the single-process one
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / strategy / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(x.split("=", 1) for x in (d / "environ").read_text().split("\0") if "=" in x)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_job_and_the_checkpoint_resumes(task_setup, tmp_path):
    model_dir, task = task_setup
    steps = 40
    out = tmp_path / "run"
    args = finetune_args(model_dir, task, out, steps, every=2)
    proc = torchrun(args)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    pids = worker_pids(proc.pid)
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "rank: 1" in err or "local_rank: 1" in err, err[-3000:]  # torchrun's failure report names the rank
    done = json.loads((sorted((out / "checkpoints").glob("step-*"))[-1] / "trainer.json").read_text())["step"]
    assert 2 <= done < steps
    again = torchrun([*args, "--resume"])
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    ref = tmp_path / "ref"
    assert main(finetune_args(model_dir, task, ref, steps)) == 0  # uninterrupted, one process
    print(f"killed at checkpoint {done}, resumed on 2 ranks: max |loss - loss(1 process, uninterrupted)| = "
          f"{max_diff(losses(out), losses(ref)):.2e}")
    assert max_diff(losses(out), losses(ref)) < LOSS_TOL


def test_verse_task_and_report_table():
    from skipdecode.training.task_eval import markdown, schedules, text_scores, verse_task
    rows = verse_task(["In the beginning.\nAnd the earth.\nAnd God said.", "One.\n" + "x" * 200 + "\nTwo."])
    assert rows == [{"prompt": "In the beginning.", "completion": " And the earth."},
                    {"prompt": "And the earth.", "completion": " And God said."}]  # over-long verses left out
    # rouge-score lower-cases and drops punctuation; LCS "and god said" of 4 and 5 words: F1 = 2 * 3/4 * 3/5 / (27/20)
    rouge, bleu = text_scores(["And God SAID, Let"], ["and god said unto moses"])
    assert rouge == pytest.approx(2 * 0.75 * 0.6 / 1.35) and 0 <= bleu < 100
    assert text_scores(["the same words here"], ["the same words here"]) == (pytest.approx(1.0), pytest.approx(100.0))
    assert [s[0] for s in schedules([2, 3, 5], lossless=True)] == ["1x", "2x", "3x", "5x", "lossless"]
    report = [{"model": "m", "role": r, "schedule": s, "rouge_l": 0.5, "bleu": 12.0, "perplexity": 9.0,
               "realised_speedup": 1.0} for r in ("tuned", "control") for s in ("1x", "2x")]
    table = markdown(report).splitlines()
    assert table[0] == "| model | metric | 1x | 2x |" and len(table) == 2 + 2 * 4
    assert table[2] == "| m (tuned) | rouge_l | 0.500 | 0.500 |"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 autocast, fused AdamW)")
def test_cuda_bf16_checkpointed_steps_learn(task_setup, tmp_path):
    model_dir, task = task_setup
    from tokenizers import Tokenizer
    data = encode_records(read_task_records([task]), Tokenizer.from_file(str(model_dir / "tokenizer.json")), SEQ)
    cfg = TrainConfig(steps=20, batch_size=8, seq_len=SEQ, lr=3e-3, warmup_steps=2, speedups=(2.0, 3.0),
                      prompt_range=(4, 10), device="cuda", precision="bf16", grad_checkpointing=True,
                      micro_batch_size=4, distill=0.5)
    state = train(tiny_opt(), data, cfg, tmp_path)
    assert np.isfinite(state.losses).all() and np.mean(state.losses[-3:]) < np.mean(state.losses[:3])
    assert state.peak_memory_bytes > 0 and next(state.model.parameters()).dtype == torch.float32  # fp32 masters


def test_a_checkpoint_of_the_earlier_format_is_refused_not_silently_restarted(tmp_path):
    from skipdecode.runtime.errors import InputError
    from skipdecode.training.finetune import CHECKPOINTS, latest_checkpoint
    old = tmp_path / CHECKPOINTS / "step-000200"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"")
    with pytest.raises(InputError, match="earlier skipdecode version"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "empty") is None
