"""Teacher-forced perplexity measured through an engine's own graphs: what a quantized (or otherwise compiled)
engine really computes, activation quantization and kernels included, not what its float weights would.

Same chunks and scoring as the quality report (training/quality.py): each held-out chunk is a sequence with prompt
length p and schedule length T = seq_len; the prompt is prefilled at full depth, then the true tokens are fed one
decode step at a time through the scheduled bucket graphs, and the NLL of each true next token (columns p .. T-1)
is summed. Runs on any slot backend (runtime/slot_backend.py): an onnxruntime Engine or the PyTorch reference.
No torch needed for engines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..runtime.logprobs import log_softmax
from ..runtime.schedule import make_plan, schedule_for
from .quality import EvalConfig, eval_chunks


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    # logits [n, V] float32, targets [n] -> sum of -log softmax(logits)[target], in float64
    return -sum(float(log_softmax(row)[t]) for row, t in zip(logits, targets, strict=True))


def backend_perplexity(backend, chunks: np.ndarray, prompt_length: int, speedup: float | None,
                       batch: int = 8) -> float:
    """exp(mean NLL) of chunks[:, p:] given everything before it, under the schedule of `speedup` (None: full
    depth), every step through the bucket the runtime would pick."""
    N, T = chunks.shape
    p = prompt_length
    warmup = backend.warmup_layers if backend.warmup_layers is not None else 1
    plan = make_plan(schedule_for(backend.num_layers, speedup, warmup=warmup), p, T, backend.buckets)
    total = 0.0
    for i in range(0, N, batch):
        rows = chunks[i: i + batch]
        slots = backend.slots.allocate(len(rows))
        try:
            total += _nll(backend.prefill_rows(rows[:, :p].tolist(), slots), rows[:, p])
            for step in plan.steps:  # the pass over column c predicts token c + 1
                gates = np.ones((len(rows), step.bucket), dtype=bool)
                logits = backend.decode_rows(slots, rows[:, step.column], step.bucket, gates)[slots]
                total += _nll(logits, rows[:, step.column + 1])
        finally:
            backend.slots.free(slots)
    return math.exp(total / (N * (T - p)))


def engine_report(engines: Sequence[str | Path], data: Sequence[str], speedups: Sequence[float],
                  cfg: EvalConfig, verify: bool = True, every_kernel: bool = False) -> list[dict]:
    """Perplexity of each engine at each speedup on the same chunks (encoded with the first engine's tokenizer),
    with the change against the first engine at the same speedup (e.g. int8 vs fp32). `every_kernel`: a quantized
    engine is evaluated once per kernel form that passed its parity check (runtime/kernels.py), since the forms
    round activations differently (e.g. int8's `a4` and `dyn8`)."""
    from ..runtime.engine import Engine
    from ..runtime.kernels import candidates, parity_passed
    from ..runtime.manifest import load_manifest
    from .corpus import read_documents

    docs = read_documents(data)
    rows, chunks = [], None
    for directory in engines:
        man = load_manifest(directory)
        forms = [c.name for c in candidates(man) if parity_passed(man, c)] if every_kernel and man.quantization \
            else ["exported"]
        for form in forms:
            with Engine.load(directory, max_batch=8, verify=verify, kernel=form) as engine:
                if chunks is None:
                    chunks = eval_chunks(engine.codec.tokenizer, docs, cfg)
                scheme = engine.manifest.quantization.get("scheme", engine.manifest.dtype)
                kernel = engine.kernel_choice.name if engine.kernel_choice is not None else None
                for s in speedups:
                    ppl = backend_perplexity(engine.backend, chunks, cfg.prompt_length, None if s == 1 else s)
                    rows.append({"engine": str(directory), "weights": scheme, "kernel": kernel, "speedup": s,
                                 "perplexity": ppl})
    for r in rows:
        base = next(b for b in rows if b["speedup"] == r["speedup"])
        r["vs_first_engine"] = r["perplexity"] / base["perplexity"] - 1
    return rows


def write_json(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1))
