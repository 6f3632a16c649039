"""Small offline fixtures for the training-side tests: a synthetic corpus, a tokenizer trained on it, and the
config of a tiny OPT that fits that tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ("and the lord said unto moses go thou into the land which i will give unto thy seed for ever "
         "behold light darkness water heaven earth").split()
VOCAB = 300  # 256 byte symbols + 4 special tokens + a few merges
TINY_OPT = dict(model_type="opt", num_hidden_layers=6, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=128, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0)


def synthetic_docs(n: int = 30, seed: int = 0) -> list[str]:
    """Verse-like documents: a few short sentences of words from a small list (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 12))).capitalize() + "." for _ in range(4)]
        docs.append("\n".join(lines))
    return docs


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**TINY_OPT, **overrides}))
    return path
