"""CTranslate2 as a benchmark peer: convert a local OPT checkpoint, generate greedily, time tokens/s.

Needs the `peers` extra (`pip install -e .[peers]`: ctranslate2, plus torch/transformers for converting).
The converter wants a tokenizer only for the vocabulary strings and the special tokens; a checkpoint without one
(random-weight shapes) gets a stand-in whose token i is the string ``<i>``, so ids map one to one.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import ctranslate2
except ImportError:  # pragma: no cover - exercised only where the extra is missing
    ctranslate2 = None

# CTranslate2 picks its GEMM library once per process: Intel MKL on Intel CPUs, oneDNN elsewhere; CT2_USE_MKL=1
# forces MKL. On an AVX2-only AMD EPYC (2 threads, opt-125m shape, int8) forcing MKL made it 12x slower (3.7 vs
# 46.5 tokens/s at batch 1, 14.9 vs 175 at batch 8), so the bench keeps CTranslate2's own choice and records it.
GEMM_ENV = ("CT2_USE_MKL", "CT2_PACKED_GEMM", "CT2_FORCE_CPU_ISA")
INSTALL_HINT = "CTranslate2 is not installed: pip install -e .[peers] (installs ctranslate2==4.8.5)"
QUANTIZATIONS = ("int8", "int8_float32", "float32", "int16", "int8_float16", "float16")


def require_ctranslate2():
    if ctranslate2 is None:
        raise ImportError(INSTALL_HINT)
    return ctranslate2


class _StandInTokenizer:
    """What the converter reads from a tokenizer: get_vocab() and the bos/eos/unk strings."""

    def __init__(self, vocab_size: int, bos: int, eos: int, unk: int) -> None:
        self.vocab = {f"<{i}>": i for i in range(vocab_size)}
        self.bos_token, self.eos_token, self.unk_token = f"<{bos}>", f"<{eos}>", f"<{unk}>"

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def _has_tokenizer(checkpoint: Path) -> bool:
    return any((checkpoint / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def convert(checkpoint_dir: str | Path, out_dir: str | Path, quantization: str = "int8", force: bool = True) -> Path:
    """Convert a local OPT checkpoint with `ctranslate2.converters.TransformersConverter`; returns `out_dir`.

    quantization: a CTranslate2 weight type ("int8", "float32", ...). A checkpoint without tokenizer files gets
    the stand-in vocabulary (token i = "<i>")."""
    require_ctranslate2()
    from ctranslate2.converters import TransformersConverter

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS}")
    checkpoint = Path(checkpoint_dir)
    cfg = json.loads((checkpoint / "config.json").read_text())
    if cfg.get("model_type") == "opt" and int(cfg["vocab_size"]) % 8:
        # CTranslate2's OPT loader pads the vocabulary to a multiple of 8 and then requires the embedding to match
        raise ValueError(f"{checkpoint}: vocab_size={cfg['vocab_size']} is not a multiple of 8, which CTranslate2's "
                         "OPT converter requires")

    class _Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            if _has_tokenizer(checkpoint):
                return super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
            return _StandInTokenizer(int(cfg["vocab_size"]), int(cfg.get("bos_token_id", 2)),
                                     int(cfg.get("eos_token_id", 2)), int(cfg.get("unk_token_id", 3)))

    out = _Converter(str(checkpoint)).convert(str(out_dir), quantization=quantization, force=force)
    return Path(out)


def _load_vocabulary(model_dir: Path) -> list[str]:
    if (model_dir / "vocabulary.json").is_file():
        return json.loads((model_dir / "vocabulary.json").read_text())
    return (model_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]


class CT2Generator:
    """Greedy generation over a converted model; prompts and results are token ids."""

    def __init__(self, model_dir: str | Path, threads: int = 2, compute_type: str = "default") -> None:
        ct2 = require_ctranslate2()
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.compute_type = compute_type
        self.generator = ct2.Generator(str(self.model_dir), device="cpu", intra_threads=threads, inter_threads=1,
                                       compute_type=compute_type)
        self.vocab = _load_vocabulary(self.model_dir)
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Exactly `new_tokens` greedy tokens per prompt (no end token), prompt excluded."""
        if new_tokens < 1:
            raise ValueError(f"new_tokens={new_tokens} must be >= 1")
        for p in prompts:
            bad = [t for t in p if not 0 <= t < len(self.vocab)]
            if not p or bad:
                raise ValueError(f"prompt {p!r}: empty or ids outside the vocabulary ({len(self.vocab)})")
        tokens = [[self.vocab[t] for t in p] for p in prompts]
        results = self.generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens,
                                                sampling_topk=1, include_prompt_in_result=False, end_token=[],
                                                beam_size=1)
        return [list(r.sequences_ids[0]) for r in results]


@dataclass(frozen=True)
class PeerTiming:
    batch: int
    new_tokens: int
    seconds: list[float]  # one per repeat

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of the median call, prefill included."""
        return self.batch * self.new_tokens / self.median_s

    def to_dict(self) -> dict:
        return {"batch": self.batch, "new_tokens": self.new_tokens, "median_s": self.median_s,
                "tokens_per_s": self.tokens_per_s, "seconds": self.seconds}


def time_generate(gen: CT2Generator, prompts: list[list[int]], new_tokens: int, repeats: int = 3,
                  warmup: int = 1) -> PeerTiming:
    """End-to-end wall time of `gen.generate` (prefill + `new_tokens` steps), `repeats` times after `warmup`."""
    for _ in range(warmup):
        gen.generate(prompts, new_tokens)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen.generate(prompts, new_tokens)
        seconds.append(time.perf_counter() - t0)
    return PeerTiming(len(prompts), new_tokens, seconds)


class CT2Baseline:
    """CTranslate2 as a benchmark baseline (bench/run.py): the same runner interface as `HFBaseline`, whose
    generate(N) - generate(1) split gives its decode time."""

    def __init__(self, label: str, model_dir: str | Path, num_layers: int, threads: int, quantization: str) -> None:
        self.label, self.num_layers, self.quantization = label, num_layers, quantization
        self.generator = CT2Generator(model_dir, threads=threads)

    def runner(self, prompts: list[list[int]], n: int):
        def run() -> float:
            t0 = time.perf_counter()
            self.generator.generate(prompts, n)
            return time.perf_counter() - t0
        return run

    def extra(self) -> dict:
        return {"quantization": self.quantization, "gemm": gemm_config()}


def gemm_config() -> dict:
    """The GEMM library CTranslate2 uses in this process (its rule: MKL on Intel CPUs or where CT2_USE_MKL=1,
    unless CT2_USE_MKL=0; oneDNN otherwise) and the environment variables that steer it."""
    env = {k: os.environ[k] for k in GEMM_ENV if k in os.environ}
    forced = env.get("CT2_USE_MKL", "").strip().lower()
    mkl = forced in ("1", "true", "on") or (forced not in ("0", "false", "off") and _cpu_vendor() == "GenuineIntel")
    return {"library": "mkl" if mkl else "onednn", "env": env}


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""

