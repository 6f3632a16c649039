"""Export parity: every graph of an engine directory against the PyTorch reference. Fails hard.

Both sides get identical inputs: a batch of prompts of different lengths (left padding), the prefill, then a few
decode steps through every bucket from the deepest to the shallowest (a monotone schedule, as at run time),
feeding the reference's greedy tokens to both. Compared per output: logits and K/V of every graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.engine import Engine
from ..runtime.errors import EngineError
from ..runtime.generation import left_pad, position_ids
from ..runtime.manifest import load_manifest
from ..runtime.schedule import Step, layers_for_budget
from .reference import TorchReference


@dataclass(frozen=True)
class Tolerance:
    """Pass when max|engine - reference| <= atol + rtol * max|reference| (per output)."""

    atol: float
    rtol: float


TOLERANCES = {
    "float32": {"logits": Tolerance(1e-4, 1e-5), "kv": Tolerance(1e-4, 1e-5)},
    "float16": {"logits": Tolerance(5e-2, 1e-2), "kv": Tolerance(2e-2, 1e-2)},
}


class ParityError(EngineError):
    """An exported graph disagrees with the PyTorch reference beyond its tolerance."""


def _record(report: dict, key: str, got, want, tol: Tolerance) -> None:
    if hasattr(want, "numpy"):  # torch tensor from the reference
        want = want.float().numpy()
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    diff = float(np.abs(got - want).max())
    limit = tol.atol + tol.rtol * float(np.abs(want).max())
    prev = report.get(key, {"max_abs_diff": 0.0, "limit": limit})
    report[key] = {"max_abs_diff": max(prev["max_abs_diff"], diff), "limit": max(prev["limit"], limit)}


def check_parity(directory: Path, model, steps_per_bucket: int = 2, seed: int = 0) -> dict:
    """Return {output: {max_abs_diff, limit}}; raise ParityError naming every output over its limit."""
    man = load_manifest(directory)
    n_prompts = min(3, man.max_batch)
    engine = Engine.load(directory, max_batch=n_prompts)
    tols = TOLERANCES[man.dtype]
    ref = TorchReference(model)
    L, w = man.num_layers, man.warmup_layers
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, man.model["vocab_size"], size=n).tolist() for n in (5, 2, 8)[:n_prompts]]
    ids, prompt_mask = left_pad(prompts, man.model["pad_token_id"])
    B, p = ids.shape
    buckets = sorted(man.buckets, reverse=True)
    T = p + len(buckets) * steps_per_bucket + 1
    if T > engine.backend.max_length:
        raise EngineError(f"parity needs max_length >= {T} (prompt {p} + {len(buckets)} buckets x "
                          f"{steps_per_bucket} steps); the export has max_length {engine.backend.max_length}")
    mask = np.zeros((B, T), dtype=np.int64)
    mask[:, :p] = prompt_mask
    report: dict = {}
    pos = position_ids(prompt_mask)
    want = ref.prefill(ids, pos, mask)
    _record(report, "prefill.logits", engine.backend.prefill(ids, pos, mask), want, tols["logits"])
    arena = engine.backend.arena
    rows, lengths = np.arange(B), prompt_mask.sum(axis=1)
    for layer in range(L):  # ragged slots: row b's prompt sits at columns [0, len_b), no padding
        pairs = ((arena.keys[layer], ref.cache.keys[layer]), (arena.values[layer], ref.cache.values[layer]))
        for ours, theirs in pairs:
            for b in rows:
                _record(report, "prefill.kv", ours[b, :, : lengths[b]], theirs[b, :, p - lengths[b]:], tols["kv"])
    c = p
    for bucket in buckets:
        for _ in range(steps_per_bucket):
            tokens = np.argmax(want, axis=-1).astype(np.int64)
            mask[:, c] = 1
            pos_c = (mask[:, : c + 1].sum(axis=1) - 1).astype(np.int64)  # = tokens so far = the new column
            step = Step(column=c, scheduled=bucket, bucket=bucket, layers=layers_for_budget(L, bucket, w))
            want = ref.decode(tokens, pos_c, mask, step)
            got = engine.backend.decode(tokens, pos_c, mask, step)
            _record(report, f"decode.{bucket}.logits", got, want, tols["logits"])
            for layer in step.layers:
                _record(report, f"decode.{bucket}.kv", arena.keys[layer][rows, :, pos_c],
                        ref.cache.keys[layer][:, :, -1], tols["kv"])
                _record(report, f"decode.{bucket}.kv", arena.values[layer][rows, :, pos_c],
                        ref.cache.values[layer][:, :, -1], tols["kv"])
            c += 1
    failed = {k: v for k, v in report.items() if v["max_abs_diff"] > v["limit"]}
    if failed:
        lines = ", ".join(f"{k}: {v['max_abs_diff']:.3g} > {v['limit']:.3g}" for k, v in failed.items())
        raise ParityError(f"parity check failed for {len(failed)} output(s) of {directory.name}: {lines}")
    return report
