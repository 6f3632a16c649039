"""Train an OPT model with the SkipDecode layer sets applied per position (teacher forcing).

Every training chunk is `seq_len` tokens (`</s>` then text). A batch plays the role of one static inference
batch: it draws a target speedup `S` and a prompt length `p`, builds the schedule the runtime would use
(`Schedule.for_speedup(L, S, w)`, `make_plan(schedule, p, T=seq_len)`), and runs the pass over each column
with exactly `plan.pass_layers()[column]` through `recompute_logits` (prompt columns at full depth, later
columns with the decayed budgets). Input is `chunk[:, :-1]`, targets `chunk[:, 1:]`: the pass over column c
predicts token c + 1, the same column convention as generation.

Loss: by default on every position (`loss_on="all"`). Prompt positions run at full depth, so their loss
keeps the full-depth model (which writes the prompt K/V every skipped token attends to, and produces the
first generated token) from drifting; positions >= p - 1 train the skipped paths. `loss_on="generated"`
scores only positions >= p - 1 (the tokens a generation would produce).

Speedup mix: each batch draws `S` uniformly from `speedups` (skip-tuning default 2, 3, 5; pretraining 1).
Why per batch: budgets are batch-shared at inference, so a batch is exactly one inference schedule. Why a
mix instead of one S: a single checkpoint serves every `--speedup` chosen at run time, and the schedules are
nested (the top block always runs, deeper skipping removes more of the middle), so they share what they
learn. S = 1 is not drawn by default because every batch already trains the full-depth path on its prompt
positions (p ~ U[8, 64] of 127 columns, ~28% of the loss); measured on tiny-opt-kjv: 400 steps of
{2, 3, 5} moved full-depth held-out perplexity by +1.8% while 2x went from +77% to +4% over full depth.
`p` is drawn uniformly from `prompt_range`, so the decay starts at many different columns.

Data order, S and p of step k are pure functions of (seed, k), which makes `resume` reproduce an
uninterrupted run: checkpoints hold model, optimizer, LR schedule, step, loss history and RNG states.
`recompute_logits` puts the model in eval mode, so training runs without dropout (not needed for short
runs; the tiny model is configured with dropout 0).
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import OPTConfig, OPTForCausalLM

from ..export.models import load_model
from ..export.reference import recompute_logits
from ..runtime.errors import InputError, ModelError
from ..runtime.schedule import make_plan, schedule_for
from ..runtime.tokenizer import TextCodec
from .corpus import make_chunks, read_documents, token_stream

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 128  # T of the training schedule; chunks are this long
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100  # linear LR warm-up (not warm-up layers)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    speedups: tuple[float, ...] = (1.0,)
    prompt_range: tuple[int, int] = (8, 64)  # p ~ U[lo, hi]
    warmup_layers: int = 1  # w of the schedule: layers [0, w) always run
    loss_on: str = "all"  # "all" | "generated"
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    threads: int = 2  # torch intra-op threads; the 2-core build machine is shared

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")
        lo, hi = self.prompt_range
        if not 1 <= lo <= hi < self.seq_len - 1:
            raise InputError(f"prompt_range={self.prompt_range} must satisfy 1 <= lo <= hi < seq_len - 1 "
                             f"= {self.seq_len - 1}")
        if self.loss_on not in ("all", "generated"):
            raise InputError(f"loss_on={self.loss_on!r} must be 'all' or 'generated'")
        if not self.speedups or any(s < 1 for s in self.speedups):
            raise InputError(f"speedups={self.speedups} must be a non-empty list of numbers >= 1")


@dataclass(frozen=True)
class BatchPlan:
    """What step k trains on: chunk rows, target speedup, prompt length and the layer set of each column."""

    rows: np.ndarray
    speedup: float
    prompt_length: int
    layer_sets: list[tuple[int, ...]]


def batch_plan(step: int, num_chunks: int, num_layers: int, cfg: TrainConfig) -> BatchPlan:
    """Stateless: epoch-wise permutations of the chunks, S and p, all seeded by (seed, step)."""
    start = step * cfg.batch_size
    rows = [_epoch_order(i // num_chunks, num_chunks, cfg.seed)[i % num_chunks]
            for i in range(start, start + cfg.batch_size)]
    rng = np.random.default_rng([cfg.seed, step, 1])
    speedup = float(cfg.speedups[rng.integers(len(cfg.speedups))])
    p = int(rng.integers(cfg.prompt_range[0], cfg.prompt_range[1] + 1))
    return BatchPlan(np.array(rows), speedup, p, layer_sets(num_layers, speedup, p, cfg.seq_len, cfg.warmup_layers))


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def _epoch_order(epoch: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def layer_sets(num_layers: int, speedup: float, p: int, T: int, warmup: int = 1) -> list[tuple[int, ...]]:
    """Layer set of the pass over each column 0 .. T-2 of a T-token chunk: exactly what inference runs."""
    sched = schedule_for(num_layers, None if speedup == 1 else speedup, warmup=warmup)
    return make_plan(sched, p, T).pass_layers()


def chunk_loss(model: OPTForCausalLM, chunk: torch.Tensor, plan: BatchPlan, loss_on: str = "all") -> torch.Tensor:
    """Mean next-token cross-entropy of chunk [B, T] under the plan's layer sets."""
    ids, targets = chunk[:, :-1], chunk[:, 1:]
    logits = recompute_logits(model, ids, torch.ones_like(ids), plan.layer_sets)  # [B, T-1, V]
    if loss_on == "generated":  # the pass over column p-1 produces the first generated token
        logits, targets = logits[:, plan.prompt_length - 1:], targets[:, plan.prompt_length - 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    # no weight decay on biases and LayerNorm gains (1-D), as is standard for transformers
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


@dataclass
class TrainState:
    """Progress of a run; saved in every checkpoint so a resumed run continues the same history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # one per step
    elapsed_s: float = 0.0  # training wall time, summed over resumed runs


def train(model: OPTForCausalLM, chunks: np.ndarray, cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
          callback: Callable[[int, float], None] | None = None) -> TrainState:
    """Run (or continue) training; checkpoints go to out_dir/checkpoints. Returns the final state."""
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    L = model.config.num_hidden_layers
    for s in cfg.speedups:  # fail before training if a speedup cannot be scheduled on this depth
        layer_sets(L, s, cfg.prompt_range[0], cfg.seq_len, cfg.warmup_layers)
    opt, sched = make_optimizer(model, cfg)
    state = TrainState()
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise InputError(f"{out} already has checkpoint {latest.name}: pass --resume to continue it, or choose "
                         f"another output directory")
    if latest is not None:
        state = load_checkpoint(latest, model, opt, sched)
    else:
        _seed_everything(cfg.seed)
    data = torch.from_numpy(chunks)
    # in a log file (no TTY) a bar line every 30 s instead of a redraw per step
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True)
    t0 = time.perf_counter() - state.elapsed_s
    while state.step < cfg.steps:
        plan = batch_plan(state.step, len(chunks), L, cfg)
        loss = chunk_loss(model, data[plan.rows], plan, cfg.loss_on)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append(loss.item())
        state.elapsed_s = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{state.losses[-1]:.3f}", S=f"{plan.speedup:g}", p=plan.prompt_length)
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            save_checkpoint(out, model, opt, sched, state, cfg)
        if callback is not None:
            callback(state.step, state.losses[-1])
    bar.close()
    return state


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_checkpoint(out: Path, model, opt, sched, state: TrainState, cfg: TrainConfig) -> Path:
    """Atomic: written into a temporary directory, then renamed; older ones pruned only after the rename."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
                "step": state.step, "losses": state.losses, "elapsed_s": state.elapsed_s, "rng": _rng_state(),
                "config": asdict(cfg), "model_config": model.config.to_dict()}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(_checkpoints(out))[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def _checkpoints(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.pt").is_file()]


def latest_checkpoint(out: str | Path) -> Path | None:
    found = sorted(_checkpoints(Path(out)))  # zero-padded step numbers sort as integers
    return found[-1] if found else None


def load_checkpoint(path: Path, model, opt, sched) -> TrainState:
    ckpt = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    want = model.config.to_dict()
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "ffn_dim"):
        if ckpt["model_config"].get(key) != want.get(key):
            raise ModelError(f"checkpoint {path} has {key}={ckpt['model_config'].get(key)}, the model has "
                             f"{want.get(key)}: resume with the model it was started from")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["lr_schedule"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return TrainState(step=ckpt["step"], losses=list(ckpt["losses"]), elapsed_s=ckpt["elapsed_s"])


def model_from_config(path: str | Path, vocab_size: int) -> OPTForCausalLM:
    """A fresh OPT (pretraining from scratch) from a JSON of OPTConfig fields; OPT's special token ids."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model config {p} does not exist")
    fields = json.loads(p.read_text())
    if fields.pop("model_type", "opt") != "opt":
        raise ModelError(f"{p}: only OPT configs are supported")
    fields.setdefault("word_embed_proj_dim", fields.get("hidden_size"))
    cfg = OPTConfig(vocab_size=vocab_size, pad_token_id=1, bos_token_id=2, eos_token_id=2, **fields)
    return OPTForCausalLM._from_config(cfg, attn_implementation="sdpa")


@torch.no_grad()
def mean_loss(model: OPTForCausalLM, chunks: np.ndarray, batch_size: int = 16) -> float:
    """Full-depth next-token loss over every position of `chunks` (held-out evaluation)."""
    L = model.config.num_hidden_layers
    full = [tuple(range(L))] * (chunks.shape[1] - 1)
    plan = BatchPlan(np.arange(0), 1.0, 1, full)
    total, n = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        batch = torch.from_numpy(chunks[i: i + batch_size])
        total += chunk_loss(model, batch, plan).item() * len(batch)
        n += len(batch)
    return total / n


def save_final(model: OPTForCausalLM, out: Path, codec: TextCodec | None, summary: dict,
               dtype: torch.dtype = torch.float16) -> Path:
    """HF layout (`config.json`, `model.safetensors`) + `tokenizer.json` + `training.json` in `out`, which
    `skipdecode generate --backend torch --model OUT` and `skipdecode export --model OUT` load directly."""
    out.mkdir(parents=True, exist_ok=True)
    orig = next(model.parameters()).dtype
    model.to(dtype).save_pretrained(out)  # fp16 halves the committed size; eval loads it back as fp32
    model.to(orig)
    if codec is not None:
        codec.save(out / "tokenizer.json")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class FinetuneJob:
    """One training run: where to start (checkpoint or config), what data, where to write."""

    out: Path
    data: tuple[str, ...]
    train: TrainConfig
    model: str | None = None  # checkpoint to start from: local dir, hub id or short name
    config: str | None = None  # or: JSON of OPTConfig fields to pretrain from scratch (needs `tokenizer`)
    tokenizer: str | None = None  # tokenizer.json; default: the checkpoint's own
    heldout: tuple[str, ...] = ()
    save_dtype: str = "float16"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.config is None):
            raise InputError("give exactly one of a model to fine-tune (--model) or a config to pretrain from "
                             "scratch (--config)")
        if self.config is not None and self.tokenizer is None:
            raise InputError("pretraining from --config needs --tokenizer FILE (a tokenizer.json)")
        if self.save_dtype not in ("float16", "float32"):
            raise InputError(f"save_dtype={self.save_dtype!r} must be 'float16' or 'float32'")


def start_model(job: FinetuneJob) -> tuple[OPTForCausalLM, TextCodec]:
    codec = TextCodec.from_file(job.tokenizer) if job.tokenizer is not None else None
    if job.config is not None:
        torch.manual_seed(job.train.seed)  # deterministic initial weights
        return model_from_config(job.config, codec.tokenizer.get_vocab_size()), codec
    model, own = load_model(job.model, attn_implementation="sdpa")  # sdpa: ~1.2x faster training on CPU
    codec = codec or own
    if codec is None:
        raise ModelError(f"model {job.model!r} has no tokenizer: pass --tokenizer FILE")
    return model, codec


def load_chunks(paths: tuple[str, ...], codec: TextCodec, model: OPTForCausalLM, seq_len: int) -> np.ndarray:
    chunks = make_chunks(token_stream(codec.tokenizer, read_documents(paths)), seq_len)
    vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
    if chunks.max() >= vocab:
        raise ModelError(f"the tokenizer produced id {int(chunks.max())}, outside the model's vocabulary [0, {vocab})")
    if seq_len > limit:
        raise InputError(f"seq_len={seq_len} is above the model's limit of {limit} positions")
    return chunks


def run_job(job: FinetuneJob, resume: bool = False) -> dict:
    """Train, evaluate held-out loss at full depth, save the final model. Returns the summary it saved."""
    model, codec = start_model(job)
    chunks = load_chunks(job.data, codec, model, job.train.seq_len)
    held = load_chunks(job.heldout, codec, model, job.train.seq_len) if job.heldout else None
    state = train(model, chunks, job.train, job.out, resume)
    tail = state.losses[-50:]
    summary = {
        # names only: the summary is committed with the model and must not carry this machine's paths
        "start": {"model": job.model and (Path(job.model).name if Path(job.model).is_dir() else job.model),
                  "config": job.config and Path(job.config).name},
        "data": [Path(p).name for p in job.data], "train_chunks": len(chunks),
        "steps": state.step, "tokens_seen": state.step * job.train.batch_size * (job.train.seq_len - 1),
        "wall_time_s": round(state.elapsed_s, 1), "final_train_loss": sum(tail) / len(tail),
        "train_config": asdict(job.train), "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    if held is not None:
        loss = mean_loss(model, held)
        summary.update(heldout=[Path(p).name for p in job.heldout], heldout_chunks=len(held),
                       heldout_loss=loss, heldout_perplexity=math.exp(loss))
    save_final(model, job.out, codec, summary, getattr(torch, job.save_dtype))
    return summary
