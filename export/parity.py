"""Export parity: every graph of an engine directory against the PyTorch reference. Fails hard.

Both sides get identical inputs through the same slot API: prompts of different lengths prefilled into their
slots (the engine left-pads them into one batch, the reference runs each alone), then a few decode steps through
every bucket from the deepest to the shallowest (a monotone schedule, as at run time), feeding the reference's
greedy tokens to both. A KV window too short for all buckets in one sequence is covered in several rounds on fresh
slots (`plan_parity`), so any max_length >= 2 can be checked. Compared per output: logits and K/V of every
graph. Non-finite values fail: NaN compares as "no difference" in max(), so it is checked for explicitly.
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
    # Quantized weights (--quantize), against the reference carrying the dequantized weights: MatMulNBits at
    # accuracy level 4 also quantizes each block of activations to int8 at run time, which the float reference
    # does not. Measured worst differences on random-weight tiny models: ~2-4% of max|logit| at 8 bits.
    "int8": {"logits": Tolerance(1e-3, 5e-2), "kv": Tolerance(1e-3, 5e-2)},
    "int4": {"logits": Tolerance(1e-3, 1.5e-1), "kv": Tolerance(1e-3, 1.5e-1)},
}


def tolerances(man) -> dict:
    """Per-output tolerances of an engine: by its weight quantization, else by its dtype."""
    bits = man.quantization.get("bits")
    return TOLERANCES[f"int{bits}"] if bits else TOLERANCES[man.dtype]


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


@dataclass(frozen=True)
class ParityRound:
    """Prompts of `prompt_lengths` prefilled into fresh slots, then `steps` decode steps through each of `buckets`
    (deepest first: a monotone schedule)."""

    prompt_lengths: tuple[int, ...]
    buckets: tuple[int, ...]
    steps: int


PROMPT_LENGTHS = (5, 2, 8)  # ragged: the engine left-pads them into one prefill batch


def plan_parity(max_length: int, buckets, n_prompts: int, steps: int = 2) -> list[ParityRound]:
    """Rounds that decode through every bucket inside a KV window of `max_length` columns. A slot holding p prompt
    tokens takes one column per decode step, so a round needs longest prompt + buckets x steps <= max_length; a short
    window gets shorter prompts, fewer steps per bucket and more rounds. The exporter calls this before tracing, so
    an impossible check is refused before any work."""
    if max_length < 2:
        raise EngineError(f"parity needs max_length >= 2 (a 1-token prompt and one decode step); got {max_length}")
    steps = max(1, min(steps, max_length - 1))
    longest = max(1, min(max(PROMPT_LENGTHS), max_length - steps))
    lengths = tuple(min(n, longest) for n in PROMPT_LENGTHS[:n_prompts])
    per_round = (max_length - longest) // steps
    order = sorted(buckets, reverse=True)
    return [ParityRound(lengths, tuple(order[i: i + per_round]), steps) for i in range(0, len(order), per_round)]


def check_parity(directory: Path, model, steps_per_bucket: int = 2, seed: int = 0) -> dict:
    """Return {output: {max_abs_diff, limit, finite}}; raise ParityError naming every output over its limit."""
    man = load_manifest(directory)
    n_prompts = min(3, man.max_batch)
    engine = Engine.load(directory, max_batch=n_prompts, verify=False)  # the exporter wrote it just now
    ref = TorchReference(model, max_batch=n_prompts, warmup_layers=man.warmup_layers)
    rng = np.random.default_rng(seed)
    report: dict = {}
    try:
        for rnd in plan_parity(engine.backend.max_length, man.buckets, n_prompts, steps_per_bucket):
            prompts = [rng.integers(3, man.model.vocab_size, size=n).tolist() for n in rnd.prompt_lengths]
            _check_round(engine, ref, man, prompts, rnd, report)
    finally:
        engine.close()
    failed = {k: v for k, v in report.items() if not v["finite"] or v["max_abs_diff"] > v["limit"]}
    if failed:
        lines = ", ".join(f"{k}: {_describe(v)}" for k, v in failed.items())
        raise ParityError(f"parity check failed for {len(failed)} output(s) of {directory.name}: {lines}")
    return report


def _check_round(engine, ref, man, prompts: list, rnd: ParityRound, report: dict) -> None:
    """One round on fresh slots of both sides; the slots are given back at the end."""
    tols = tolerances(man)
    backend, n = engine.backend, len(prompts)
    slots = backend.slots.allocate(n)
    ref_slots = ref.slots.allocate(n)
    assert ref_slots == slots  # both tables hand out the lowest free slots
    try:
        want = ref.prefill_rows(prompts, slots)
        _record(report, "prefill.logits", backend.prefill_rows(prompts, slots), want, tols["logits"])
        for layer in range(man.num_layers):  # ragged slots: row b's prompt sits at columns [0, len_b), no padding
            keys, values = backend.kv.read(layer)
            for b, slot in enumerate(slots):
                m = len(prompts[b])
                _record(report, "prefill.kv", keys[slot, :, :m], ref.cache[slot].keys[layer][0], tols["kv"])
                _record(report, "prefill.kv", values[slot, :, :m], ref.cache[slot].values[layer][0], tols["kv"])
        if man.verify() is not None:
            _verify_step(backend, ref, man, slots, want, report)
        for bucket in rnd.buckets:
            for _ in range(rnd.steps):
                want = _decode_step(backend, ref, man, slots, want, bucket, report)
    finally:
        backend.slots.free(slots)
        ref.slots.free(ref_slots)


def _decode_step(backend, ref, man, slots: list, want, bucket: int, report: dict):
    """Both sides decode the reference's greedy tokens through `bucket`; -> the reference's logits."""
    tols, n = tolerances(man), len(slots)
    tokens = np.argmax(want[:n], axis=-1).astype(np.int64)
    columns = backend.slots.lengths[slots].copy()
    gates = np.ones((n, bucket), dtype=bool)
    want = ref.decode_rows(slots, tokens, bucket, gates)[slots]
    got = backend.decode_rows(slots, tokens, bucket, gates)[slots]
    _record(report, f"decode.{bucket}.logits", got, want, tols["logits"])
    for layer in man.decode(bucket).layers:
        keys, values = backend.kv.read(layer)
        for b, slot in enumerate(slots):
            c = int(columns[b])
            _record(report, f"decode.{bucket}.kv", keys[slot, :, c], ref.cache[slot].keys[layer][0, :, -1],
                    tols["kv"])
            _record(report, f"decode.{bucket}.kv", values[slot, :, c], ref.cache[slot].values[layer][0, :, -1],
                    tols["kv"])
    return want


def _verify_step(backend, ref, man, slots: list, want, report: dict) -> None:
    """Both sides verify [greedy token, two more] at full depth (lossless mode's pass), compare the logits of every
    column and every layer's new K/V, then forget those columns (the decode steps that follow start from the
    prompts)."""
    n = len(slots)
    columns = backend.slots.lengths[slots].copy()
    S = int(max(1, min(3, backend.max_length - columns.max())))
    tokens = np.zeros((n, S), dtype=np.int64)
    tokens[:, 0] = np.argmax(want[:n], axis=-1)
    tokens[:, 1:] = (tokens[:, :1] + np.arange(1, S)[None, :] * 7) % man.model.vocab_size
    _compare_verify(backend, ref, man, "verify", slots, tokens, columns, report)
    if man.verify("verify_row") is not None:  # one row: the in-place graph of gqa engines
        _compare_verify(backend, ref, man, "verify_row", slots[-1:], tokens[-1:], columns[-1:], report)


def _compare_verify(backend, ref, man, label: str, slots: list, tokens: np.ndarray, columns: np.ndarray,
                    report: dict) -> None:
    """One verify call on both sides over `slots` (which graph runs follows from the row count); logits and every
    layer's new K/V recorded under `label`; then both forget the verified columns."""
    tols, S = tolerances(man), tokens.shape[1]
    _record(report, f"{label}.logits", backend.verify_rows(slots, tokens)[slots], ref.verify_rows(slots, tokens)[slots],
            tols["logits"])
    for layer in range(man.num_layers):
        keys, values = backend.kv.read(layer)
        for b, slot in enumerate(slots):
            c = int(columns[b])
            _record(report, f"{label}.kv", keys[slot, :, c: c + S], ref.cache[slot].keys[layer][0, :, -S:],
                    tols["kv"])
            _record(report, f"{label}.kv", values[slot, :, c: c + S], ref.cache[slot].values[layer][0, :, -S:],
                    tols["kv"])
    backend.rewind(slots, columns.tolist())
    ref.rewind(slots, columns.tolist())


def _describe(entry: dict) -> str:
    if not entry["finite"]:
        return "non-finite values (NaN or inf)"
    return f"{entry['max_abs_diff']:.3g} > {entry['limit']:.3g}"
