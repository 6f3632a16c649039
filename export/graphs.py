"""Torch modules that are traced into the prefill graph and the per-bucket decode graphs.

They reuse the HF model's modules (and so its parameter names: `model.decoder.layers.3.fc1.weight`, ...) but
wire attention themselves, because the decode graph reads a preallocated KV buffer instead of a growing cache
(see runtime/contract.py). The PyTorch reference (reference.py) calls HF's own layers; the export parity check
compares the two, so this file is checked against an independent implementation on every export.

Every Linear is applied to a 2-D input so the legacy exporter emits Gemm(transB=1) on the stored weight: no
Transpose of a weight in the graph, hence nothing for onnxruntime to constant-fold into a private copy, and
every session can use the one shared weight buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Gemm(torch.autograd.Function):
    """F.linear that always exports as Gemm(x, W[, b], transB=1), bias or not (the legacy exporter would
    otherwise emit Transpose(W) + MatMul for a bias-free Linear)."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        return F.linear(x, weight, bias)

    @staticmethod
    def symbolic(g, x, weight, bias=None):
        args = (x, weight) if bias is None or bias.node().mustBeNone() else (x, weight, bias)
        return g.op("Gemm", *args, transB_i=1)


def linear(x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
    # x: [..., in] -> [..., out] through a 2-D Gemm with transB=1
    y = _Gemm.apply(x.reshape(-1, x.shape[-1]), mod.weight, mod.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class OPTGraphBase(nn.Module):
    """Holds `model` and `lm_head` under the same attribute names as `OPTForCausalLM` (same parameter names)."""

    def __init__(self, hf_model) -> None:
        super().__init__()
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        cfg = hf_model.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.pre_ln = bool(cfg.do_layer_norm_before)
        self.act = hf_model.model.decoder.layers[0].activation_fn

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = linear(x, dec.project_in)
        return x + dec.embed_positions.weight[position_ids + dec.embed_positions.offset]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = linear(h, dec.project_out)
        return linear(h, self.lm_head).float()

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, S, H*D] -> [B, H, S, D]
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def qkv(self, layer, x: torch.Tensor):
        attn = layer.self_attn
        q = self.split_heads(linear(x, attn.q_proj) * attn.scaling)
        return q, self.split_heads(linear(x, attn.k_proj)), self.split_heads(linear(x, attn.v_proj))

    def finish_layer(self, layer, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, FFN and the layer norms in OPT's pre-LN or post-LN order."""
        B, H, S, D = attn_out.shape
        h = residual + linear(attn_out.transpose(1, 2).reshape(B, S, H * D), layer.self_attn.out_proj)
        if not self.pre_ln:
            h = layer.self_attn_layer_norm(h)
        x = layer.final_layer_norm(h) if self.pre_ln else h
        h = h + linear(self.act(linear(x, layer.fc1)), layer.fc2)
        return h if self.pre_ln else layer.final_layer_norm(h)


def masked(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention scores where `allowed`, the dtype's minimum elsewhere: the masked value replaces the score (an ONNX
    Where), it is never added to it. An additive mask of the dtype minimum (-65504 in fp16) plus a score below about
    -16 rounds to -inf; a row with nothing allowed (a left-padding query of a prefill) then has a NaN softmax, its
    hidden state and so its K/V turn NaN, and the real rows of the same prompt read that NaN through their masked
    columns (NaN + bias is NaN). Replaced values are finite whatever the score, so a fully masked row gets a uniform,
    finite softmax, and a NaN score at a masked column is dropped."""
    return torch.where(allowed, scores, torch.finfo(scores.dtype).min)


class PrefillGraph(OPTGraphBase):
    """(input_ids, position_ids, attention_mask) [B, S] -> logits of the last column, every layer's K/V."""

    def forward(self, input_ids, position_ids, attention_mask):
        h = self.embed(input_ids, position_ids)
        S = input_ids.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]
        kv = []
        for layer in self.model.decoder.layers:
            x = layer.self_attn_layer_norm(h) if self.pre_ln else h
            q, k, v = self.qkv(layer, x)
            probs = torch.softmax(masked(q @ k.transpose(-1, -2), allowed), dim=-1, dtype=torch.float32).to(h.dtype)
            h = self.finish_layer(layer, h, probs @ v)
            kv += [k, v]
        return (self.head(h[:, -1]), *kv)


class _GroupQueryAttention(torch.autograd.Function):
    """One new token per row against a shared past/present buffer; exports as com.microsoft GroupQueryAttention.

    q, k, v: [B, 1, H*D] (q already scaled, hence scale=1); past_k/v: [B, H, T, D]; past_length: [B] int32.
    Returns (out [B, 1, H*D], present_k, present_v) where present = past with column past_length[b] of row b set
    to the new k/v; row b attends over columns [0, past_length[b]]. onnxruntime writes that column in place when
    past and present are bound to one buffer. The torch forward is only used while tracing.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, past_length, kv_length, heads):
        B, H, T, D = past_k.shape
        col = torch.arange(T, device=q.device)
        here = (col[None, :] == past_length[:, None].long())[:, None, :, None]  # [B, 1, T, 1]
        present_k = torch.where(here, k.reshape(B, 1, H, D).transpose(1, 2), past_k)
        present_v = torch.where(here, v.reshape(B, 1, H, D).transpose(1, 2), past_v)
        allowed = (col[None, :] <= past_length[:, None].long())[:, None, None, :]  # [B, 1, 1, T]
        qh = q.reshape(B, 1, H, D).transpose(1, 2)
        scores = masked(qh @ present_k.transpose(-1, -2), allowed)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs @ present_v).transpose(1, 2).reshape(B, 1, H * D), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, past_length, kv_length, heads):
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, past_length,
                                         kv_length, num_heads_i=heads, kv_num_heads_i=heads, scale_f=1.0, outputs=3)
        for value, like in ((out, q), (present_k, past_k), (present_v, past_v)):
            value.setType(like.type())  # the exporter cannot infer a contrib op's outputs
        return out, present_k, present_v


class DecodeGraph(OPTGraphBase):
    """One token per row through `layers` only, rows gated per layer; K/V in the preallocated slot buffers.

    `attention="gqa"` writes the new K/V into the buffers in place (outputs present.*), `"matmul"` uses standard
    ONNX ops and returns them (outputs new.*); see runtime/contract.py.
    """

    def __init__(self, hf_model, layers: Sequence[int], attention: str = "gqa") -> None:
        super().__init__(hf_model)
        self.layer_ids = tuple(layers)
        self.attention = attention

    def forward(self, input_ids, past_length, *rest):
        # gqa: (kv_length, gate, k_0, v_0, ...); matmul: (gate, k_0, v_0, ...); each k/v [B, H, Tmax, D]
        kv_length = rest[0] if self.attention == "gqa" else None
        gate, past = (rest[1], rest[2:]) if self.attention == "gqa" else (rest[0], rest[1:])
        h = self.embed(input_ids, past_length.long()[:, None])  # [B, 1, hidden]; position = tokens so far
        out = []
        for i, idx in enumerate(self.layer_ids):
            layer = self.model.decoder.layers[idx]
            x = layer.self_attn_layer_norm(h) if self.pre_ln else h
            if self.attention == "gqa":
                attn, k, v = self.gqa(layer, x, past[2 * i], past[2 * i + 1], past_length, kv_length)
            else:
                attn, k, v = self.masked(layer, x, past[2 * i], past[2 * i + 1], past_length)
            h = torch.where(gate[:, i, None, None], self.finish_layer(layer, h, attn), h)
            out += [k, v]
        return (self.head(h[:, -1]), *out)

    def gqa(self, layer, x, past_k, past_v, past_length, kv_length):
        attn = layer.self_attn
        q = linear(x, attn.q_proj) * attn.scaling
        o, k, v = _GroupQueryAttention.apply(q, linear(x, attn.k_proj), linear(x, attn.v_proj), past_k, past_v,
                                             past_length, kv_length, self.heads)
        return self.split_heads(o), k, v

    def masked(self, layer, x, past_k, past_v, past_length):
        q, k, v = self.qkv(layer, x)  # [B, H, 1, D]
        col = torch.arange(past_k.shape[2], device=x.device)
        allowed = (col[None, :] < past_length[:, None].long())[:, None, None, :]  # [B, 1, 1, Tmax]
        scores = torch.cat([masked(q @ past_k.transpose(-1, -2), allowed), (q * k).sum(-1, keepdim=True)], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        return probs[..., :-1] @ past_v + probs[..., -1:] * v, k, v
