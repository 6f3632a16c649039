"""Export parity: every graph of an engine directory against the PyTorch reference. Fails hard.

Both sides get identical inputs through the same slot API: prompts of different lengths prefilled into their
slots (the engine left-pads them into one batch, the reference runs each alone), then a few decode steps through
every bucket from the deepest to the shallowest (a monotone schedule, as at run time), feeding the reference's
greedy tokens to both. Compared per output: logits and K/V of every graph. Non-finite values fail: NaN compares
as "no difference" in max(), so it is checked for explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.engine import Engine
from ..runtime.errors import EngineError
from ..runtime.manifest import load_manifest
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
    finite = bool(np.isfinite(got).all() and np.isfinite(want).all())
    diff = float(np.abs(got - want).max()) if finite else float("inf")
    limit = tol.atol + tol.rtol * (float(np.abs(want).max()) if finite else 0.0)
    prev = report.get(key, {"max_abs_diff": 0.0, "limit": limit, "finite": True})
    report[key] = {"max_abs_diff": max(prev["max_abs_diff"], diff), "limit": max(prev["limit"], limit),
                   "finite": prev["finite"] and finite}


def check_parity(directory: Path, model, steps_per_bucket: int = 2, seed: int = 0) -> dict:
    """Return {output: {max_abs_diff, limit, finite}}; raise ParityError naming every output over its limit."""
    man = load_manifest(directory)
    n_prompts = min(3, man.max_batch)
    engine = Engine.load(directory, max_batch=n_prompts, verify=False)  # the exporter wrote it just now
    tols = TOLERANCES[man.dtype]
    ref = TorchReference(model, max_batch=n_prompts, warmup_layers=man.warmup_layers)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, man.model.vocab_size, size=n).tolist() for n in (5, 2, 8)[:n_prompts]]
    buckets = sorted(man.buckets, reverse=True)
    T = max(map(len, prompts)) + len(buckets) * steps_per_bucket + 1
    if T > engine.backend.max_length:
        raise EngineError(f"parity needs max_length >= {T} (prompt {max(map(len, prompts))} + {len(buckets)} buckets x "
                          f"{steps_per_bucket} steps); the export has max_length {engine.backend.max_length}")
    slots = engine.backend.slots.allocate(n_prompts)
    ref.slots.allocate(n_prompts)
    report: dict = {}
    want = ref.prefill_rows(prompts, slots)
    _record(report, "prefill.logits", engine.backend.prefill_rows(prompts, slots), want, tols["logits"])
    L = man.num_layers
    for layer in range(L):  # ragged slots: row b's prompt sits at columns [0, len_b), no padding
        keys, values = engine.backend.kv.read(layer)
        for b, slot in enumerate(slots):
            n = len(prompts[b])
            _record(report, "prefill.kv", keys[slot, :, :n], ref.cache[slot].keys[layer][0], tols["kv"])
            _record(report, "prefill.kv", values[slot, :, :n], ref.cache[slot].values[layer][0], tols["kv"])
    for bucket in buckets:
        layers = man.decode(bucket).layers
        for _ in range(steps_per_bucket):
            tokens = np.argmax(want[: n_prompts], axis=-1).astype(np.int64)
            columns = engine.backend.slots.lengths[slots].copy()
            gates = np.ones((n_prompts, bucket), dtype=bool)
            want = ref.decode_rows(slots, tokens, bucket, gates)[slots]
            got = engine.backend.decode_rows(slots, tokens, bucket, gates)[slots]
            _record(report, f"decode.{bucket}.logits", got, want, tols["logits"])
            for layer in layers:
                keys, values = engine.backend.kv.read(layer)
                for b, slot in enumerate(slots):
                    c = int(columns[b])
                    _record(report, f"decode.{bucket}.kv", keys[slot, :, c], ref.cache[slot].keys[layer][0, :, -1],
                            tols["kv"])
                    _record(report, f"decode.{bucket}.kv", values[slot, :, c],
                            ref.cache[slot].values[layer][0, :, -1], tols["kv"])
    engine.close()
    failed = {k: v for k, v in report.items() if not v["finite"] or v["max_abs_diff"] > v["limit"]}
    if failed:
        lines = ", ".join(f"{k}: {_describe(v)}" for k, v in failed.items())
        raise ParityError(f"parity check failed for {len(failed)} output(s) of {directory.name}: {lines}")
    return report


def _describe(entry: dict) -> str:
    if not entry["finite"]:
        return "non-finite values (NaN or inf)"
    return f"{entry['max_abs_diff']:.3g} > {entry['limit']:.3g}"
