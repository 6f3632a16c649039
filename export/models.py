"""Resolve a model name to a checkpoint, load it through transformers, normalise its config once.

Accepted names: a local checkpoint directory (never touches the hub), a hub id (`facebook/opt-1.3b`), or a
short name (`opt-1.3b` -> `facebook/opt-1.3b`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, OPTForCausalLM
from transformers.utils import logging as hf_logging

from ..runtime.errors import ModelError
from ..runtime.manifest import OPTShape
from ..runtime.tokenizer import TextCodec

OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")


def resolve_model(name: str) -> str:
    """Map a short name to its hub id; keep local directories and hub ids; reject anything else."""
    if os.path.isdir(name):
        return name
    if name.startswith("opt-") and name[4:] in OPT_SIZES:
        return f"facebook/{name}"
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name
    raise ModelError(f"unknown model {name!r}: give a local checkpoint directory, a hub id such as "
                     f"facebook/opt-1.3b, or a short name opt-{{{','.join(OPT_SIZES)}}}")


def load_model(name: str, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "eager") -> tuple[OPTForCausalLM, TextCodec | None]:
    """Load an OPT checkpoint and its tokenizer (None when the checkpoint has none). Eval mode."""
    path = resolve_model(name)
    hf_logging.disable_progress_bar()
    local = os.path.isdir(path)
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the config of {name!r} ({path}): {exc}") from exc
    OPTShape.from_config(cfg)  # refuses non-OPT checkpoints before loading weights
    try:
        model = OPTForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local,
                                               attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the weights of {name!r} ({path}): {exc}") from exc
    model.eval()
    return model, load_codec(path, local)


def load_codec(path: str, local: bool) -> TextCodec | None:
    if local:
        tok_file = Path(path) / "tokenizer.json"
        if tok_file.exists():
            return TextCodec.from_file(tok_file)
        if not any((Path(path) / f).exists() for f in ("vocab.json", "tokenizer_config.json")):
            return None
    try:
        hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError):
        return None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    return TextCodec(backend) if backend is not None else None
