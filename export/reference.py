"""The PyTorch SkipDecode reference: HF's OPT modules and weights, our layer sets. Ground truth for every test.

Two independent forms of the same semantics:

* `TorchReference` (cached): a `StepBackend` for the shared generation loop. Its cache keeps, per layer, K/V
  only for the columns where that layer ran, and each layer attends to exactly those columns.
* `recompute_logits` (uncached): runs a whole sequence at once; at layer l only the positions whose layer set
  contains l are updated, the others pass through unchanged.

They agree exactly when layer sets are monotone (the KV invariant) and disagree when they are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import OPTForCausalLM

from ..runtime.schedule import Step


class LayerCache:
    """Per-layer K/V entries and the columns they belong to. Passed to HF layers as `past_key_values`."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [B, H, n_l, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.columns: list[list[int]] = [[] for _ in range(num_layers)]
        self._pending: list[int] = []

    def expect(self, columns: list[int]) -> None:
        """Columns of the next `update` calls (one pass over these columns)."""
        self._pending = columns

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        self.columns[layer_idx] = self.columns[layer_idx] + self._pending
        return key, value


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, q, k] -> additive float mask [B, 1, q, k] (0 where allowed, dtype min elsewhere)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


class TorchReference:
    """Cached SkipDecode forward passes on an HF `OPTForCausalLM` (implements `StepBackend`)."""

    def __init__(self, model: OPTForCausalLM, max_batch: int = 64) -> None:
        self.model = model.eval()
        self.decoder = model.model.decoder
        self.num_layers = len(self.decoder.layers)
        self.buckets = tuple(range(1, self.num_layers + 1))  # every budget: the schedule runs exactly
        self.warmup_layers = None  # layer sets are built per step: any warm-up works
        self.max_batch = max_batch
        self.max_length = model.config.max_position_embeddings
        self.dtype = next(model.parameters()).dtype
        self.cache = LayerCache(self.num_layers)
        self.mask = None  # [B, T] padding mask of the current batch

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        return x + dec.embed_positions(None, 0, position_ids=position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return self.model.lm_head(hidden)

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids)
        B, p = ids.shape
        self.cache = LayerCache(self.num_layers)
        self.cache.expect(list(range(p)))
        pad = torch.from_numpy(attention_mask[:, :p]).bool()
        causal = torch.ones(p, p, dtype=torch.bool).tril()
        mask = additive_mask(causal[None] & pad[:, None, :], self.dtype)
        h = self.embed(ids, torch.from_numpy(position_ids))
        for layer in self.decoder.layers:
            h = layer(h, attention_mask=mask, past_key_values=self.cache)
        return self.head(h[:, -1]).float().numpy()

    @torch.inference_mode()
    def decode(self, token_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
               step: Step) -> np.ndarray:
        c = step.column
        pad = torch.from_numpy(attention_mask).bool()
        h = self.embed(torch.from_numpy(token_ids)[:, None], torch.from_numpy(position_ids)[:, None])
        self.cache.expect([c])
        for idx in step.layers:
            cols = self.cache.columns[idx] + [c]  # the entries this layer holds, plus the new one
            mask = additive_mask(pad[:, cols][:, None, :], self.dtype)
            h = self.decoder.layers[idx](h, attention_mask=mask, past_key_values=self.cache)
        return self.head(h[:, -1]).float().numpy()


def recompute_logits(model: OPTForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layer_sets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Uncached forward over whole sequences with per-position layer sets.

    input_ids, attention_mask: [B, S]; layer_sets[c] = layers of the pass over column c (len S).
    Returns logits [B, S, V]. Differentiable (used by fine-tuning with teacher forcing).
    """
    ref = TorchReference(model)
    B, S = input_ids.shape
    assert len(layer_sets) == S, (len(layer_sets), S)
    runs = torch.zeros(ref.num_layers, S, dtype=torch.bool)
    for c, layers in enumerate(layer_sets):
        runs[list(layers), c] = True
    pad = attention_mask.bool()
    causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
    mask = additive_mask(causal[None] & pad[:, None, :], ref.dtype)
    pos = (torch.cumsum(attention_mask, 1) * attention_mask - 1).long()
    h = ref.embed(input_ids, pos)
    for idx, layer in enumerate(ref.decoder.layers):
        if not runs[idx].any():
            continue
        out = layer(h, attention_mask=mask)
        h = torch.where(runs[idx][None, :, None].to(h.device), out, h)
    return ref.head(h)
