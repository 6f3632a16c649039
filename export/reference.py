"""The PyTorch SkipDecode reference: HF's OPT modules and weights, our layer sets. Ground truth for every test.

Two independent forms of the same semantics:

* `TorchReference` (cached): a `SlotBackend` (runtime/slot_backend.py), so the one generation loop drives it like
  any compiled engine. Each slot keeps, per layer, K/V only for the columns where that layer ran, and each row is
  computed alone (no padding, no masks beyond causality): the plainest statement of what a step computes.
* `recompute_logits` (uncached): runs a whole sequence at once; at layer l only the positions whose layer set
  contains l are updated, the others pass through unchanged.

They agree exactly when layer sets are monotone (the KV invariant) and disagree when they are not.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch
import torch.utils.checkpoint
from transformers import OPTForCausalLM

from ..runtime.errors import InputError
from ..runtime.schedule import layers_for_budget
from ..runtime.slot_backend import SlotBackend


class SlotKV:
    """One slot's K/V per layer ([1, H, n_l, D], the columns where layer l ran). Passed to HF layers as their
    `past_key_values`: attention calls `update(k, v, layer_idx)` with the new columns and attends to the result."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.columns: list[list[int]] = [[] for _ in range(num_layers)]  # the slot column of each cached entry

    def ran(self, layer: int, columns) -> None:
        """Record the columns whose K/V the last `update` of `layer` appended."""
        self.columns[layer].extend(int(c) for c in columns)

    def truncate(self, length: int) -> None:
        """Forget every entry of column >= length (lossless mode's rewind)."""
        for layer, cols in enumerate(self.columns):
            keep = bisect.bisect_left(cols, length)
            if keep < len(cols):
                del cols[keep:]
                self.keys[layer] = self.keys[layer][:, :, :keep]
                self.values[layer] = self.values[layer][:, :, :keep]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, q, k] -> additive float mask [B, 1, q, k] (0 where allowed, half the dtype's minimum elsewhere).

    HF's layers add the mask to the scores. With the full minimum (-65504 in fp16) any score below about -16 overflows
    to -inf and a fully masked (padding) row's softmax is NaN, which reaches the real rows through its K/V; half the
    minimum stays finite for any score above it, which is still exp-underflow far below every real score."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min / 2)[:, None]


class TorchReference(SlotBackend):
    """Cached SkipDecode forward passes on an HF `OPTForCausalLM`, one row at a time, behind the slot API.

    Every budget is a "bucket" (schedules run exactly). A bucket's graph is layers_for_budget(L, bucket,
    warmup_layers), like an engine exported with that warm-up; `use_warmup` switches it between generations.
    `draft_model` (the same model with other weights, e.g. dequantized ones): what `decode_rows(..., draft=True)`
    runs, as an engine's quantized draft graphs do; every bucket below full depth then has one."""

    def __init__(self, model: OPTForCausalLM, max_batch: int = 64, warmup_layers: int = 1,
                 draft_model: OPTForCausalLM | None = None) -> None:
        self.model = model.eval()
        self.decoder = model.model.decoder
        self.draft_model = draft_model.eval() if draft_model is not None else None
        cfg = model.config
        self.num_layers = len(self.decoder.layers)
        self.buckets = tuple(range(1, self.num_layers + 1))
        self.draft_buckets = self.buckets[:-1] if draft_model is not None else ()
        self.warmup_layers = warmup_layers
        self.max_batch = max_batch
        self.max_length = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 1
        self.dtype = next(model.parameters()).dtype
        self.cache: dict[int, SlotKV] = {}
        self._init_slots()

    def use_warmup(self, warmup: int) -> None:
        """Run later generations with `warmup` warm-up layers (only while no generation holds a slot)."""
        if warmup != self.warmup_layers:
            if self.slots.num_free != self.max_batch:
                raise InputError(f"warmup_layers={warmup}: generations with warm-up {self.warmup_layers} are running")
            self.warmup_layers = warmup

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, model: OPTForCausalLM | None = None
              ) -> torch.Tensor:
        dec = (model or self.model).model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        return x + dec.embed_positions(None, 0, position_ids=position_ids)

    def head(self, hidden: torch.Tensor, model: OPTForCausalLM | None = None) -> torch.Tensor:
        model = model or self.model
        dec = model.model.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return model.lm_head(hidden)

    @torch.inference_mode()
    def _prefill(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, slots: list[int]) -> np.ndarray:
        out = []
        for row, slot in enumerate(slots):  # each prompt alone, without its padding, at full depth
            n = int(mask[row].sum())
            kv = self.cache[slot] = SlotKV(self.num_layers)
            causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), self.dtype)
            h = self.embed(torch.from_numpy(ids[row, -n:])[None], torch.arange(n)[None])
            for i, layer in enumerate(self.decoder.layers):
                h = layer(h, attention_mask=causal, past_key_values=kv)
                kv.ran(i, range(n))
            out.append(self.head(h[:, -1]).float())
        return torch.cat(out).numpy()

    def _decode(self, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        return self._step(self.model, ids, lengths, bucket, gates)

    def _decode_draft(self, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray) -> np.ndarray:
        return self._step(self.draft_model, ids, lengths, bucket, gates)

    @torch.inference_mode()
    def _step(self, model: OPTForCausalLM, ids: np.ndarray, lengths: np.ndarray, bucket: int, gates: np.ndarray
              ) -> np.ndarray:
        graph = layers_for_budget(self.num_layers, bucket, self.warmup_layers)
        layers = model.model.decoder.layers
        out = np.zeros((len(ids), self.vocab_size), dtype=np.float32)
        for row in np.flatnonzero(gates.any(axis=1)):  # rows with no layer on are not part of this call
            kv = self.cache[int(row)]
            h = self.embed(torch.tensor([[int(ids[row])]]), torch.tensor([[int(lengths[row])]]), model)
            for layer, on in zip(graph, gates[row], strict=True):
                if on:  # attends to this layer's own columns plus the new one: no mask needed
                    h = layers[layer](h, attention_mask=None, past_key_values=kv)
                    kv.ran(layer, [lengths[row]])
            out[row] = self.head(h[:, -1], model).float().numpy()[0]
        return out

    @torch.inference_mode()
    def _verify(self, ids: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
        n, S = ids.shape
        out = np.zeros((n, S, self.vocab_size), dtype=np.float32)
        last = self.model.config.max_position_embeddings - 1
        for row in map(int, rows):  # each row alone, every layer, causal over its past and the new tokens
            kv, c = self.cache[row], int(lengths[row])
            short = [i for i, cols in enumerate(kv.columns) if len(cols) != c]
            if short:
                raise InputError(f"slot {row}: layer {short[0]} holds {len(kv.columns[short[0]])} of its {c} columns; "
                                 "a full-depth verify needs every layer's K/V (rewind drafted columns first)")
            pos = torch.clamp(torch.arange(c, c + S), max=last)[None]
            allowed = torch.arange(c + S)[None, :] <= torch.arange(c, c + S)[:, None]  # [S, c + S]
            mask = additive_mask(allowed[None], self.dtype)
            h = self.embed(torch.from_numpy(ids[row])[None], pos)
            for i, layer in enumerate(self.decoder.layers):
                h = layer(h, attention_mask=mask, past_key_values=kv)
                kv.ran(i, range(c, c + S))
            out[row] = self.head(h[0]).float().numpy()
        return out

    def _rewind(self, slots: list[int], lengths: list[int]) -> None:
        for slot, n in zip(slots, lengths, strict=True):
            self.cache[slot].truncate(n)


def recompute_logits(model: OPTForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layer_sets: Sequence[Sequence[int]], checkpointing: bool = False) -> torch.Tensor:
    """Uncached forward over whole sequences with per-position layer sets.

    input_ids, attention_mask: [B, S]; layer_sets[c] = layers of the pass over column c (len S).
    Returns logits [B, S, V]. Differentiable (used by fine-tuning with teacher forcing); `checkpointing`
    recomputes each layer's activations in the backward pass instead of keeping them (gradient checkpointing).
    """
    ref = TorchReference(model, max_batch=1)
    B, S = input_ids.shape
    assert len(layer_sets) == S, (len(layer_sets), S)
    runs = torch.zeros(ref.num_layers, S, dtype=torch.bool)
    for c, layers in enumerate(layer_sets):
        runs[list(layers), c] = True
    pad = attention_mask.bool()
    causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
    mask = additive_mask(causal[None] & pad[:, None, :], ref.dtype).to(input_ids.device)
    pos = (torch.cumsum(attention_mask, 1) * attention_mask - 1).long()
    h = ref.embed(input_ids, pos)
    for idx, layer in enumerate(ref.decoder.layers):
        if not runs[idx].any():
            continue
        if checkpointing and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(layer, h, attention_mask=mask, use_reentrant=False)
        else:
            out = layer(h, attention_mask=mask)
        h = torch.where(runs[idx][None, :, None].to(h.device), out, h)
    return ref.head(h)
