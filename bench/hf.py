"""The baseline a user would otherwise pick: Hugging Face transformers `generate` (PyTorch, fp32, greedy, the
model's default attention implementation) on the same checkpoint, prompts, lengths and thread count as the engine.

Its runs are timed in the same rounds as the engine's (bench/run.py), so the `vs_hf` ratios are not skewed by
the machine's load changing between the two measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..runtime.slot_backend import left_pad


class HFBaseline:
    """One `OPTForCausalLM` in memory; `runner(prompts, n)` times `generate` of exactly n new tokens."""

    def __init__(self, checkpoint: Path, threads: int) -> None:
        import torch
        from transformers import OPTForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # generation-config notices would interleave with the bench log
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True).eval()
        cfg = self.model.config
        self.num_layers, self.pad = cfg.num_hidden_layers, cfg.pad_token_id
        self.attn_implementation = getattr(cfg, "_attn_implementation", None)
        self.label = "hf-generate"

    def extra(self) -> dict:
        return {"attn_implementation": self.attn_implementation}

    def runner(self, prompts: Sequence[Sequence[int]], n: int) -> Callable[[], float]:
        """-> a function that runs greedy `generate` (min = max = n new tokens, left-padded batch) and returns
        its wall time in seconds."""
        torch = self.torch
        ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, self.pad))

        def run() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=self.pad)
            elapsed = time.perf_counter() - t0
            if out.shape[1] != ids.shape[1] + n:
                raise RuntimeError(f"HF generate returned {out.shape[1] - ids.shape[1]} new tokens, not {n}")
            return elapsed

        return run
