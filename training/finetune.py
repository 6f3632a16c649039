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

Task data (JSONL `{"prompt", "completion"}`, training/taskdata.py): a batch is a static inference batch of
left-padded prompts (p = the batch's longest prompt, as the runtime pads) and completions; the loss covers the
completion tokens only. S is still drawn per step; as the prompt carries no loss there, full depth is trained
only by S = 1 batches: include 1 in `speedups` for task data (docs/finetune.md, measured).

Data order, S and p of step k are pure functions of (seed, k), which makes `resume` reproduce an
uninterrupted run: checkpoints (torch.distributed.checkpoint) hold model and optimizer, the step and the loss
history; the LR is a function of the step. `recompute_logits` puts the model in eval mode, so training runs
without dropout (not needed for short runs; the tiny model is configured with dropout 0), hence no RNG state.

Scale (training/distributed.py): `batch_size` is the global batch. Under torchrun each of W processes takes its
contiguous B / W rows of the step's global batch, in micro-batches of `micro_batch_size` (gradient accumulation);
every micro-batch's summed loss is divided by the global batch's scored-token count (known to every rank from
the global batch) and multiplied by W, because DDP and FSDP average gradients over ranks: the step's gradient is
the global mean whatever W and the micro-batch size, so a run's trajectory does not depend on how many processes
ran it (tested: 2 ranks vs 1 process, DDP and FSDP). bf16 autocast on GPUs (fp32 master weights), gradient
checkpointing per layer, fused AdamW on CUDA (foreach elsewhere).

Self-distillation (`distill` > 0): the same weights at full depth (no gradient) are the teacher, and
`distill * KL(teacher || schedule)` is added on the scored columns that skip layers.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import OPTConfig, OPTForCausalLM

from ..export.models import load_model
from ..export.reference import recompute_logits
from ..runtime.errors import InputError, ModelError, SkipDecodeError
from ..runtime.schedule import make_plan, schedule_for
from ..runtime.tokenizer import TextCodec
from .corpus import make_chunks, read_documents, token_stream
from .distributed import (
    Runtime,
    all_reduce_sum,
    barrier,
    full_state_dict,
    load_state,
    make_adamw,
    no_sync,
    peak_memory_bytes,
    reset_peak_memory,
    save_state,
    setup,
    teardown,
    wrap,
)
from .taskdata import TaskData, bucketed_order, collate, encode_records, is_task_file, read_task_records

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16  # global batch: rows per optimizer step, whatever the number of processes
    seq_len: int = 128  # T of the training schedule; chunks (or task rows) are this long
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100  # linear LR warm-up (not warm-up layers)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    speedups: tuple[float, ...] = (1.0,)
    prompt_range: tuple[int, int] = (8, 64)  # p ~ U[lo, hi] (plain text; task rows use their own prompts)
    warmup_layers: int = 1  # w of the schedule: layers [0, w) always run
    loss_on: str = "all"  # "all" | "generated" (plain text; task rows score completions only)
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    threads: int = 2  # torch intra-op threads on CPU; the 2-core build machine is shared
    micro_batch_size: int | None = None  # rows per forward on one process; None: the whole per-process batch
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it) | fp32 | bf16
    strategy: str = "auto"  # auto (ddp when launched on several processes) | ddp | fsdp
    grad_checkpointing: bool = False
    distill: float = 0.0  # weight of the self-distillation term KL(full depth || schedule) on skipped columns

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
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise InputError(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if not self.distill >= 0:
            raise InputError(f"distill={self.distill} must be a weight >= 0")

    def split(self, world: int) -> tuple[int, int, int]:
        """-> (rows per process, rows per forward, forwards per step) for `world` processes."""
        if self.batch_size % world:
            raise InputError(f"batch_size={self.batch_size} (the global batch) is not divisible by the "
                             f"{world} processes: use a multiple of {world}")
        local = self.batch_size // world
        micro = min(self.micro_batch_size or local, local)
        if local % micro:
            raise InputError(f"micro_batch_size={micro} does not divide the {local} rows per process "
                             f"(batch_size={self.batch_size} over {world} processes)")
        return local, micro, local // micro


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
    speedup, p = _draw(step, cfg)
    return BatchPlan(np.array(rows), speedup, p, layer_sets(num_layers, speedup, p, cfg.seq_len, cfg.warmup_layers))


def _draw(step: int, cfg: TrainConfig) -> tuple[float, int]:
    rng = np.random.default_rng([cfg.seed, step, 1])
    speedup = float(cfg.speedups[rng.integers(len(cfg.speedups))])
    return speedup, int(rng.integers(cfg.prompt_range[0], cfg.prompt_range[1] + 1))


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def _epoch_order(epoch: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def layer_sets(num_layers: int, speedup: float, p: int, T: int, warmup: int = 1) -> list[tuple[int, ...]]:
    """Layer set of the pass over each column 0 .. T-2 of a T-token chunk: exactly what inference runs
    (`runtime.schedule`: the schedule the runtime solves for `speedup`, planned for prompt length p)."""
    sched = schedule_for(num_layers, None if speedup == 1 else speedup, warmup=warmup)
    return make_plan(sched, p, T).pass_layers()


@dataclass(frozen=True)
class StepBatch:
    """The global batch of one step: ids and attention [B, T], target mask [B, T - 1], and its plan."""

    ids: torch.Tensor
    attention: torch.Tensor
    target: torch.Tensor  # column c scores the prediction of token c + 1
    plan: BatchPlan

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids[lo:hi], self.attention[lo:hi], self.target[lo:hi]


def step_batch(step: int, data: np.ndarray | TaskData, num_layers: int, cfg: TrainConfig) -> StepBatch:
    """Step k's global batch: a pure function of (data, seed, k), identical on every rank."""
    if isinstance(data, TaskData):
        n, lengths = len(data), data.prompt_lengths
        rows = [bucketed_order(i // n, lengths, cfg.batch_size, cfg.seed)[i % n]
                for i in range(step * cfg.batch_size, (step + 1) * cfg.batch_size)]
        ids, attn, target, P = collate(data, rows)
        speedup, _ = _draw(step, cfg)
        plan = BatchPlan(np.array(rows), speedup, P, layer_sets(num_layers, speedup, P, data.seq_len,
                                                                 cfg.warmup_layers))
        return StepBatch(torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(target), plan)
    plan = batch_plan(step, len(data), num_layers, cfg)
    ids = torch.from_numpy(data[plan.rows])
    target = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    if cfg.loss_on == "generated":  # the pass over column p-1 produces the first generated token
        target[:, : plan.prompt_length - 1] = False
    return StepBatch(ids, torch.ones_like(ids), target, plan)


def chunk_loss(model: OPTForCausalLM, chunk: torch.Tensor, plan: BatchPlan, loss_on: str = "all") -> torch.Tensor:
    """Mean next-token cross-entropy of chunk [B, T] under the plan's layer sets."""
    ids, targets = chunk[:, :-1], chunk[:, 1:]
    logits = recompute_logits(model, ids, torch.ones_like(ids), plan.layer_sets)  # [B, T-1, V]
    if loss_on == "generated":  # the pass over column p-1 produces the first generated token
        logits, targets = logits[:, plan.prompt_length - 1:], targets[:, plan.prompt_length - 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class ScheduledLM(torch.nn.Module):
    """The module DDP / FSDP wrap: an OPT forward with one layer set per column (`recompute_logits`).

    Wrapping this (not the HF model) makes the scheduled forward the one the engines hook into: DDP's gradient
    reduction and FSDP's per-layer all-gathers run around exactly the layers each column executes."""

    def __init__(self, model: OPTForCausalLM, checkpointing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.checkpointing = checkpointing

    def forward(self, ids: torch.Tensor, attention: torch.Tensor, sets: list[tuple[int, ...]]) -> torch.Tensor:
        return recompute_logits(self.model, ids, attention, sets, checkpointing=self.checkpointing)


def micro_batch_loss(module: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, target: torch.Tensor,
                     plan: BatchPlan, distill: float, rt: Runtime) -> tuple[torch.Tensor, float, float]:
    """-> (summed objective, summed cross-entropy, summed KL) over the micro-batch's scored tokens.

    Self-distillation: the same weights at full depth (no gradient) are the teacher; KL(teacher || schedule) is
    added on the scored columns that skip layers (prompt columns run at full depth, their KL is zero)."""
    x, a, y = ids[:, :-1], attention[:, :-1], ids[:, 1:]
    with rt.autocast():
        logits = module(x, a, plan.layer_sets).float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    ce_sum = (ce * target).sum()
    if distill == 0:
        return ce_sum, ce_sum.item(), 0.0
    full = tuple(range(len(plan.layer_sets[0])))
    skipped = torch.tensor([s != full for s in plan.layer_sets], device=ids.device)
    with torch.no_grad(), rt.autocast():
        teacher = module(x, a, [full] * len(plan.layer_sets)).float().log_softmax(-1)
    student = logits.log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # [b, T-1]
    kl_sum = (kl * (target & skipped[None])).sum()
    return ce_sum + distill * kl_sum, ce_sum.item(), kl_sum.item()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> torch.optim.AdamW:
    # no weight decay on biases and LayerNorm gains (1-D), as is standard for transformers
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return make_adamw([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                      cfg.lr, (0.9, 0.95), rt)


@dataclass
class TrainState:
    """Progress of a run; saved in every checkpoint so a resumed run continues the same history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # one per step (global mean cross-entropy)
    elapsed_s: float = 0.0  # training wall time, summed over resumed runs
    peak_memory_bytes: int = 0
    model: OPTForCausalLM | None = field(default=None, repr=False)  # the trained model (rank 0; full weights)


def train(model: OPTForCausalLM, data: np.ndarray | TaskData, cfg: TrainConfig, out_dir: str | Path,
          resume: bool = False, callback: Callable[[int, float], None] | None = None,
          rt: Runtime | None = None) -> TrainState:
    """Run (or continue) training; checkpoints go to out_dir/checkpoints, the loss curve to out_dir/metrics.jsonl.

    `rt`: this process's runtime (default: `distributed.setup` from the config and torchrun's environment)."""
    rt = rt or setup(cfg.device, cfg.precision, cfg.strategy)
    if rt.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    L = model.config.num_hidden_layers
    for s in cfg.speedups:  # fail before training if a speedup cannot be scheduled on this depth
        layer_sets(L, s, cfg.prompt_range[0], cfg.seq_len, cfg.warmup_layers)
    local, micro, accum = cfg.split(rt.world)
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise InputError(f"{out} already has checkpoint {latest.name}: pass --resume to continue it, or choose "
                         f"another output directory")
    torch.manual_seed(cfg.seed)
    model.float()  # fp32 master weights; bf16 only inside autocast
    module = wrap(ScheduledLM(model, cfg.grad_checkpointing), model.model.decoder.layers, rt)
    opt = make_optimizer(module, cfg, rt)
    state = TrainState()
    if latest is not None:
        state = load_checkpoint(latest, module, opt, cfg, model.config.to_dict())
    metrics = MetricsLog(out / METRICS, state.step) if rt.is_main else None
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True, disable=not rt.is_main)
    reset_peak_memory(rt)
    t0 = time.perf_counter() - state.elapsed_s
    try:
        while state.step < cfg.steps:
            t_step = time.perf_counter()
            batch = step_batch(state.step, data, L, cfg)
            count = int(batch.target.sum())  # scored tokens of the global batch: every rank knows it
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(state.step, cfg)
            ce_total = kl_total = 0.0
            for i in range(accum):
                lo = rt.rank * local + i * micro
                ids, attn, target = (t.to(rt.device) for t in batch.rows(lo, lo + micro))
                with no_sync(module, rt, last_micro_batch=i == accum - 1):
                    obj, ce, kl = micro_batch_loss(module, ids, attn, target, batch.plan, cfg.distill, rt)
                    # engines average gradients over ranks: scale by world so the sum over ranks is the global mean
                    (obj * (rt.world / max(count, 1))).backward()
                ce_total, kl_total = ce_total + ce, kl_total + kl
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = all_reduce_sum(ce_total, rt) / max(count, 1)
            kl_mean = all_reduce_sum(kl_total, rt) / max(count, 1) if cfg.distill else None
            state.step += 1
            state.losses.append(loss)
            state.elapsed_s = time.perf_counter() - t0
            state.peak_memory_bytes = max(state.peak_memory_bytes, peak_memory_bytes(rt))
            tokens = int(batch.attention.sum())
            tok_s = tokens / max(time.perf_counter() - t_step, 1e-9)
            if metrics is not None:
                metrics.write(step=state.step, loss=loss, kl=kl_mean, lr=opt.param_groups[0]["lr"],
                              speedup=batch.plan.speedup, prompt_length=batch.plan.prompt_length, tokens=tokens,
                              tokens_per_s=round(tok_s, 1), elapsed_s=round(state.elapsed_s, 3),
                              peak_memory_mb=round(state.peak_memory_bytes / 2**20, 1))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", S=f"{batch.plan.speedup:g}",
                            p=batch.plan.prompt_length)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                save_checkpoint(out, module, opt, state, cfg, model.config.to_dict(), rt)
            if callback is not None:
                callback(state.step, state.losses[-1])
    except RuntimeError as exc:
        if rt.world == 1 or not _lost_peer(exc):
            raise
        last = latest_checkpoint(out)
        raise TrainingAborted(f"rank {rt.rank}/{rt.world}: a peer process failed or left at step {state.step + 1} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the last "
                              f"checkpoint is {last.name if last else 'none'}: rerun the same command with --resume "
                              f"to continue from it") from exc
    finally:
        bar.close()
    if metrics is not None:
        metrics.plot(out / "loss.png")
    state.model = final_model(module, model, rt)
    return state


def _lost_peer(exc: RuntimeError) -> bool:
    """A collective broken by another process's death (gloo: connection closed / reset; NCCL: a DistError)."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(k in text for k in ("connection", "peer", "gloo", "nccl"))


class TrainingAborted(SkipDecodeError):
    """A distributed run lost a process; the message names the checkpoint to resume from."""


def final_model(module: torch.nn.Module, model: OPTForCausalLM, rt: Runtime) -> OPTForCausalLM | None:
    """The trained weights as a plain HF model (rank 0). Collective under FSDP (the shards are gathered)."""
    if rt.strategy != "fsdp":
        return model if rt.is_main else None
    full = full_state_dict(module, rt)
    if not rt.is_main:
        return None
    plain = OPTForCausalLM._from_config(model.config, attn_implementation="sdpa")
    plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
    return plain.eval()


METRICS = "metrics.jsonl"


class MetricsLog:
    """One JSON line per step (rank 0). A resumed run keeps the lines up to its checkpoint and appends."""

    def __init__(self, path: Path, from_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [ln for ln in (path.read_text().splitlines() if path.is_file() else [])
                if ln.strip() and json.loads(ln)["step"] <= from_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, **row) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")

    def plot(self, png: Path) -> Path:
        return plot_metrics(self.path, png)


def plot_metrics(jsonl: Path, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on build machines
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=0.8, label="cross-entropy (scored tokens)")
    if any("kl" in r for r in rows):
        ax.plot(steps, [r.get("kl", float("nan")) for r in rows], lw=0.8, label="KL to full depth")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def save_checkpoint(out: Path, module, opt, state: TrainState, cfg: TrainConfig, model_config: dict,
                    rt: Runtime) -> Path:
    """Collective. Every rank writes its part into a temporary directory; rank 0 adds `trainer.json` and renames
    it, so a directory named step-* is complete. Older ones are pruned only after the rename."""
    root = out / CHECKPOINTS
    final = root / f"{_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(rt)
    save_state(str(tmp), module, opt)
    barrier(rt)
    if rt.is_main:
        (tmp / TRAINER_FILE).write_text(json.dumps({
            "step": state.step, "losses": state.losses, "elapsed_s": state.elapsed_s, "world": rt.world,
            "strategy": rt.strategy, "config": asdict(cfg), "model_config": model_config}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(_checkpoints(out))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    barrier(rt)
    return final


TRAINER_FILE = "trainer.json"


def _checkpoints(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / TRAINER_FILE).is_file()]


def latest_checkpoint(out: str | Path) -> Path | None:
    root = Path(out) / CHECKPOINTS
    older = [p for p in root.iterdir() if (p / "state.pt").is_file()] if root.is_dir() else []
    if older:  # a run of an earlier skipdecode: resuming must not silently start again from step 0
        raise InputError(f"{older[0]} is a checkpoint of an earlier skipdecode version (state.pt), which this one "
                         "cannot resume: finish that run with the version that started it, or start a new run in "
                         "another --out directory")
    found = sorted(_checkpoints(Path(out)))  # zero-padded step numbers sort as integers
    return found[-1] if found else None


def load_checkpoint(path: Path, module, opt, cfg: TrainConfig, model_config: dict) -> TrainState:
    """Collective. Refuses a checkpoint of another model shape or of a run with another global batch or seed
    (the resumed run would not continue the same data order)."""
    meta = json.loads((path / TRAINER_FILE).read_text())
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "ffn_dim"):
        if meta["model_config"].get(key) != model_config.get(key):
            raise ModelError(f"checkpoint {path} has {key}={meta['model_config'].get(key)}, the model has "
                             f"{model_config.get(key)}: resume with the model it was started from")
    for key in ("batch_size", "seed", "seq_len"):
        if meta["config"][key] != getattr(cfg, key):
            raise InputError(f"checkpoint {path} was trained with {key}={meta['config'][key]}, this run asks for "
                             f"{getattr(cfg, key)}: resume with the same value")
    load_state(str(path), module, opt)
    return TrainState(step=meta["step"], losses=list(meta["losses"]), elapsed_s=meta["elapsed_s"])


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


def load_data(paths: tuple[str, ...], codec: TextCodec, model: OPTForCausalLM, seq_len: int) -> np.ndarray | TaskData:
    """Task JSONL (`prompt` / `completion`) or plain text / `text` JSONL; one kind per run."""
    kinds = {is_task_file(p) for p in paths}
    if len(kinds) > 1:
        raise InputError(f"--data mixes task JSONL ({{prompt, completion}}) and plain text files: {', '.join(paths)}; "
                         "train on one kind per run")
    if kinds == {True}:
        limit = model.config.max_position_embeddings
        if seq_len > limit:
            raise InputError(f"seq_len={seq_len} is above the model's limit of {limit} positions")
        return encode_records(read_task_records(paths), codec.tokenizer, seq_len, model.config.vocab_size)
    return load_chunks(paths, codec, model, seq_len)


def run_job(job: FinetuneJob, resume: bool = False) -> dict:
    """Train (on every torchrun process), then on rank 0: held-out loss at full depth, the final model.
    Returns the summary it saved (rank 0; other ranks return an empty dict)."""
    rt = setup(job.train.device, job.train.precision, job.train.strategy)
    try:
        model, codec = start_model(job)
        data = load_data(job.data, codec, model, job.train.seq_len)
        state = train(model, data, job.train, job.out, resume, rt=rt)
        if not rt.is_main:
            return {}
        model = state.model
        tokens = int(data.target_tokens) if isinstance(data, TaskData) else None
        tail = state.losses[-50:]
        summary = {
            # names only: the summary is committed with the model and must not carry this machine's paths
            "start": {"model": job.model and (Path(job.model).name if Path(job.model).is_dir() else job.model),
                      "config": job.config and Path(job.config).name},
            "data": [Path(p).name for p in job.data], "train_rows": len(data),
            "task": isinstance(data, TaskData), "task_target_tokens": tokens,
            "steps": state.step, "tokens_seen": state.step * job.train.batch_size * (job.train.seq_len - 1),
            "wall_time_s": round(state.elapsed_s, 1), "final_train_loss": sum(tail) / len(tail),
            "train_config": asdict(job.train), "params": sum(p.numel() for p in model.parameters()),
            "processes": rt.world, "strategy": rt.strategy, "device": rt.device.type, "precision": rt.precision,
            "peak_memory_mb_rank0": round(state.peak_memory_bytes / 2**20, 1), "torch": torch.__version__,
        }
        if job.heldout:
            held = load_chunks(job.heldout, codec, model, job.train.seq_len)
            loss = mean_loss(model.to("cpu").eval(), held)
            summary.update(heldout=[Path(p).name for p in job.heldout], heldout_chunks=len(held),
                           heldout_loss=loss, heldout_perplexity=math.exp(loss))
        save_final(model.to("cpu"), job.out, codec, summary, getattr(torch, job.save_dtype))
        return summary
    finally:
        teardown(rt)
