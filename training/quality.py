"""Quality report: what SkipDecode costs in quality at each speedup, for a skip-tuned model and its untuned base.

Setup, shared by every metric: held-out text is cut into `seq_len`-token chunks (`</s>` + text); a seeded
choice of `chunks` of them is scored. Each chunk is one static batch row with prompt length p =
`prompt_length` and schedule length T = `seq_len`: columns < p at full depth, then the decayed budgets.

Teacher-forced (torch, `recompute_logits` with the inference layer sets; the pass over column c predicts
token c + 1; scored: the T - p tokens a generation would produce, i.e. columns p - 1 .. T - 2):
  perplexity  exp(mean NLL) of the reference tokens under the schedule;
  agreement   fraction of scored positions where argmax(schedule logits) == argmax(full-depth logits).
Generation (any `Generator`: `.generate(prompts, opts)`; greedy, EOS ignored so every row has T - p tokens):
  rouge_l_*   LCS-based ROUGE-L F1 on token ids, against the reference continuation (`_ref`) and against the
              model's own full-depth greedy continuation (`_full`);
  overlap_*   multiset unigram F1 of token ids (order-free), against the same two;
  mean_layers realised layers per generated token, from the `budgets` the generator reports (the first
              token comes from the full-depth prefill, as at inference).
The continuation metrics take a `Generator`, so an onnxruntime `Engine` built from the same model (same
tokenizer) can be passed in place of the torch reference; perplexity and agreement need the torch model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..export.models import load_model
from ..export.reference import recompute_logits
from ..export.torch_generator import TorchGenerator
from ..runtime.errors import InputError
from ..runtime.request import GenerateOptions, Generation
from ..runtime.schedule import Schedule, make_plan, schedule_for
from .corpus import make_chunks, read_documents, token_stream


@dataclass(frozen=True)
class EvalPoint:
    """One schedule to evaluate: a target speedup (1 = full depth) or explicit budgets (M, m)."""

    speedup: float | None = None
    max_layers: int | None = None
    min_layers: int | None = None

    @property
    def label(self) -> str:
        return f"M{self.max_layers}-m{self.min_layers}" if self.max_layers is not None else f"{self.speedup:g}x"

    def schedule(self, num_layers: int, warmup: int) -> Schedule:
        s = None if self.speedup in (None, 1) else self.speedup
        return schedule_for(num_layers, s, self.max_layers, self.min_layers, warmup)

    def options(self, max_new_tokens: int, max_length: int, warmup: int) -> GenerateOptions:
        s = None if self.speedup in (None, 1) else self.speedup
        return GenerateOptions(max_new_tokens=max_new_tokens, speedup=s, max_layers=self.max_layers,
                               min_layers=self.min_layers, warmup_layers=warmup, max_length=max_length,
                               eos_token_id=None)  # fixed-length continuations: comparable layers and ROUGE


@dataclass(frozen=True)
class EvalConfig:
    speedups: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    budgets: tuple[tuple[int, int], ...] = ()  # explicit (max_layers, min_layers) pairs
    chunks: int = 96  # 96 x 96 scored tokens: ppl differences of a few % are well above chunk-sampling noise
    gen_prompts: int = 16
    prompt_length: int = 32
    seq_len: int = 128
    warmup_layers: int = 1
    batch_size: int = 16  # teacher-forced rows per forward
    gen_batch: int = 8  # prompts per generate() call: the exporter's default max batch, so engines take it
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_length < self.seq_len - 1:
            raise InputError(f"prompt_length={self.prompt_length} must be in [1, seq_len - 1) = "
                             f"[1, {self.seq_len - 1})")
        if min(self.chunks, self.gen_prompts, self.batch_size, self.gen_batch) < 1:
            raise InputError(f"chunks={self.chunks}, gen_prompts={self.gen_prompts}, batch_size={self.batch_size} "
                             f"and gen_batch={self.gen_batch} must be >= 1")

    def points(self) -> list[EvalPoint]:
        pts = [EvalPoint(speedup=1.0)] + [EvalPoint(speedup=s) for s in self.speedups if s != 1]
        return pts + [EvalPoint(max_layers=M, min_layers=m) for M, m in self.budgets]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1: longest common subsequence length over candidate and reference lengths."""
    if not candidate or not reference:
        return 0.0
    prev = [0] * (len(reference) + 1)
    for a in candidate:  # one DP row at a time: O(len(reference)) memory
        cur = [0]
        for j, b in enumerate(reference):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def token_overlap(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Order-free unigram F1 over token ids (multiset intersection)."""
    common = sum((Counter(candidate) & Counter(reference)).values())
    if common == 0:
        return 0.0
    p, r = common / len(candidate), common / len(reference)
    return 2 * p * r / (p + r)


def eval_chunks(tokenizer, docs: Sequence[str], cfg: EvalConfig) -> np.ndarray:
    """A seeded, sorted choice of `cfg.chunks` chunks of `cfg.seq_len` tokens. -> int64 [N, T]."""
    all_chunks = make_chunks(token_stream(tokenizer, docs), cfg.seq_len)
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(all_chunks), size=min(cfg.chunks, len(all_chunks)), replace=False))
    return all_chunks[pick]


@torch.no_grad()
def teacher_forced(model, chunks: np.ndarray, schedule: Schedule, cfg: EvalConfig) -> tuple[float, torch.Tensor]:
    """-> (mean NLL of the scored tokens, argmax predictions [N, T - p]) under `schedule`."""
    p, T = cfg.prompt_length, cfg.seq_len
    sets = make_plan(schedule, p, T).pass_layers()  # columns 0 .. T-2
    nll, preds = 0.0, []
    for i in range(0, len(chunks), cfg.batch_size):
        batch = torch.from_numpy(chunks[i: i + cfg.batch_size])
        ids = batch[:, :-1]
        logits = recompute_logits(model, ids, torch.ones_like(ids), sets)[:, p - 1:].float()  # [B, T-p, V]
        targets = batch[:, p:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        preds.append(logits.argmax(-1))
    return nll / (len(chunks) * (T - p)), torch.cat(preds)


def continuations(generator, prompts: Sequence[Sequence[int]], point: EvalPoint, cfg: EvalConfig,
                  num_layers: int) -> list[Generation]:
    """Greedy continuations of T - p tokens from any `Generator` (torch reference or compiled engine)."""
    opts = point.options(cfg.seq_len - cfg.prompt_length, cfg.seq_len, cfg.warmup_layers)
    opts.schedule(num_layers)  # validate before running
    rows = [list(map(int, x)) for x in prompts]
    return [g for i in range(0, len(rows), cfg.gen_batch) for g in generator.generate(rows[i: i + cfg.gen_batch], opts)]


def generation_metrics(results: Sequence[Generation], references: np.ndarray,
                       full: Sequence[Generation]) -> dict:
    def mean(xs):
        return float(np.mean(xs))
    refs = [list(map(int, r)) for r in references]
    return {
        "rouge_l_ref": mean([rouge_l(g.tokens, r) for g, r in zip(results, refs, strict=True)]),
        "rouge_l_full": mean([rouge_l(g.tokens, f.tokens) for g, f in zip(results, full, strict=True)]),
        "overlap_ref": mean([token_overlap(g.tokens, r) for g, r in zip(results, refs, strict=True)]),
        "overlap_full": mean([token_overlap(g.tokens, f.tokens) for g, f in zip(results, full, strict=True)]),
        "mean_layers": mean([b for g in results for b in g.budgets]),
    }


def evaluate_model(name: str, model, chunks: np.ndarray, cfg: EvalConfig, generator=None) -> list[dict]:
    """One row per evaluation point. `generator` (default: the torch reference of `model`) makes the
    continuations; it must use the same tokenizer as `chunks`."""
    torch.set_num_threads(cfg.threads)
    L = model.config.num_hidden_layers
    generator = generator or TorchGenerator.from_model(model)
    p = cfg.prompt_length
    prompts, refs = chunks[: cfg.gen_prompts, :p], chunks[: cfg.gen_prompts, p:]
    rows, full_pred, full_gen, full_ppl = [], None, None, None
    for point in cfg.points():
        sched = point.schedule(L, cfg.warmup_layers)
        nll, pred = teacher_forced(model, chunks, sched, cfg)
        gens = continuations(generator, prompts, point, cfg, L)
        if full_pred is None:  # the first point is always full depth
            full_pred, full_gen, full_ppl = pred, gens, math.exp(nll)
        plan = make_plan(sched, p, cfg.seq_len)
        planned = np.mean([L] + [s.bucket for s in plan.steps])  # per generated token, prefill token first
        row = {"model": name, "label": point.label,
               "speedup": point.speedup if point.speedup is not None else round(float(L / planned), 3),
               "max_layers": sched.max_budget, "min_layers": sched.min_budget, "num_layers": L,
               "nll": nll, "perplexity": math.exp(nll), "ppl_ratio": math.exp(nll) / full_ppl,
               "agreement": float((pred == full_pred).float().mean()), "planned_mean_layers": float(planned),
               **generation_metrics(gens, refs, full_gen),
               "prompt_length": p, "seq_len": cfg.seq_len, "scored_tokens": int(pred.numel())}
        row["realised_speedup"] = L / row["mean_layers"]
        rows.append(row)
    return rows


def run_report(model_dir: str, base_dir: str | None, data: Sequence[str], cfg: EvalConfig,
               json_path: str | Path, out_dir: str | Path | None = None, engine_dir: str | None = None) -> list[dict]:
    """Evaluate the model (and the base, for the ablation) on held-out `data`; write JSON (+ table, plot).

    `engine_dir`: an engine exported from `model_dir`; its onnxruntime `Engine` then produces the model's
    continuations (and realised layers, with its buckets), the torch model the teacher-forced metrics."""
    docs = read_documents(data)
    rows = []
    for role, path in (("tuned", model_dir), ("base", base_dir)):
        if path is None:
            continue
        model, codec = load_model(path)
        if codec is None:
            raise InputError(f"model {path} has no tokenizer.json: the report needs one to encode {data[0]}")
        chunks = eval_chunks(codec.tokenizer, docs, cfg)
        gen = TorchGenerator.from_model(model, codec)
        if role == "tuned" and engine_dir is not None:
            from ..runtime.engine import Engine  # onnxruntime only when asked for
            gen = Engine.load(engine_dir, threads=cfg.threads)
        for row in evaluate_model(Path(path).name, model, chunks, cfg, gen):
            rows.append({"role": role, "generator": type(gen).__name__, **row})
    write_json(rows, json_path)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.md").write_text(markdown_table(rows))
        plot(rows, out / "quality.png")
    return rows


def write_json(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def markdown_table(rows: Sequence[dict]) -> str:
    head = ("| model | schedule | M/m | speedup | mean layers | perplexity | vs 1x | agreement | ROUGE-L ref "
            "| ROUGE-L full | overlap ref | overlap full |\n|" + "---|" * 12 + "\n")
    lines = [f"| {r['model']} | {r['label']} | {r['max_layers']}/{r['min_layers']} | {r['speedup']:g} "
             f"| {r['mean_layers']:.2f} | {r['perplexity']:.2f} | {100 * (r['ppl_ratio'] - 1):+.1f}% "
             f"| {r['agreement']:.3f} | {r['rouge_l_ref']:.3f} | {r['rouge_l_full']:.3f} | {r['overlap_ref']:.3f} "
             f"| {r['overlap_full']:.3f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _series(row: dict) -> str:
    return f"{row['model']} ({row['role']})" if "role" in row else row["model"]


def plot(rows: Sequence[dict], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on build machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    metrics = (("perplexity", "held-out perplexity"), ("agreement", "next-token agreement with 1x"),
               ("rouge_l_full", "ROUGE-L vs 1x continuation"))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for name in dict.fromkeys(_series(r) for r in rows):
            mine = sorted((r for r in rows if _series(r) == name), key=lambda r: r["speedup"])
            line = [r for r in mine if r["label"].endswith("x")]  # target speedups: a curve
            (h,) = ax.plot([r["speedup"] for r in line], [r[key] for r in line], "o-", label=name)
            extra = [r for r in mine if not r["label"].endswith("x")]  # explicit budgets: markers
            ax.plot([r["speedup"] for r in extra], [r[key] for r in extra], "s", color=h.get_color())
        ax.set_xlabel("target speedup (L / mean layers)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return save_figure(fig, axes, path)


def save_figure(fig, axes, path: str | Path) -> Path:
    """The quality reports' figures: a legend on the first panel, tight layout, PNG at 110 dpi, closed."""
    import matplotlib.pyplot as plt

    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
