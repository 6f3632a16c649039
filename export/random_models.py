"""OPT models with random weights built locally from an `OPTConfig`: for tests and benchmarks (speed does not
depend on weight values). Shapes of the public checkpoints are listed so benchmarks need no hub."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

# Published OPT shapes (config.json of each facebook/opt-* checkpoint).
OPT_SHAPES: dict[str, dict] = {
    "opt-125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192),
}

# Tiny test shapes: both OPT styles. A large init std makes logits peaked, so greedy argmax has no near-ties
# and token-equality tests are meaningful rather than flaky.
TINY_SHAPES: dict[str, dict] = {
    "tiny-preln": dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                       vocab_size=211, max_position_embeddings=128),
    "tiny-postln": dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                        vocab_size=211, max_position_embeddings=128, word_embed_proj_dim=32,
                        do_layer_norm_before=False),
}


def build_random_opt(shape: str | dict, seed: int = 0, init_std: float = 0.02, **overrides) -> OPTForCausalLM:
    kwargs = dict(OPT_SHAPES.get(shape) or TINY_SHAPES.get(shape) or {}) if isinstance(shape, str) else dict(shape)
    if isinstance(shape, str) and not kwargs:
        raise KeyError(f"unknown shape {shape!r}; known: {sorted(OPT_SHAPES) + sorted(TINY_SHAPES)}")
    kwargs.setdefault("vocab_size", 50272)
    kwargs.setdefault("max_position_embeddings", 2048)
    kwargs.setdefault("word_embed_proj_dim", kwargs["hidden_size"])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    cfg = OPTConfig(pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
                    init_std=init_std, **kwargs)
    return OPTForCausalLM(cfg).eval()


def save_random_opt(shape: str | dict, out_dir: str | Path, seed: int = 0, **kw) -> Path:
    model = build_random_opt(shape, seed=seed, **kw)
    model.save_pretrained(out_dir)
    return Path(out_dir)
