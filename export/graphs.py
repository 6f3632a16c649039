"""Torch modules that are traced into the prefill graph, the per-bucket decode graphs and the verify graphs.

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


def gemm(x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
    # x: [N, in] -> [N, out], no reshape
    return _Gemm.apply(x, mod.weight, mod.bias)


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

    def finish_rows(self, layer, residual: torch.Tensor, attn_rows: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, FFN and the layer norms in OPT's pre-LN or post-LN order, on token rows:
        residual and attention output [N, hidden] (N = batch x tokens).

        Every graph keeps its hidden state as rows and calls the Gemms directly: a Linear on [B, S, hidden] traces
        into a chain of Shape/Gather/Unsqueeze/Concat/Reshape ops around each Gemm, and at small hidden sizes those
        small ops took more time than the matrix products (onnxruntime profile of a 12-layer, hidden-192 decode
        step). Identical Gemm (and fused Gemm + ReLU) nodes in every graph also let one pre-packed copy of each
        weight serve them all."""
        h = residual + gemm(attn_rows, layer.self_attn.out_proj)
        if not self.pre_ln:
            h = layer.self_attn_layer_norm(h)
        x = layer.final_layer_norm(h) if self.pre_ln else h
        h = h + gemm(self.act(gemm(x, layer.fc1)), layer.fc2)
        return h if self.pre_ln else layer.final_layer_norm(h)

    def embed_rows(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of every token as rows [N, hidden] (ids and positions of any shape, flattened)."""
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids.reshape(-1))
        if dec.project_in is not None:
            x = gemm(x, dec.project_in)
        return x + dec.embed_positions.weight[position_ids.reshape(-1) + dec.embed_positions.offset]

    def head_rows(self, h: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = gemm(h, dec.project_out)
        return gemm(h, self.lm_head).float()


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
        # the hidden state as rows [B*S, hidden], like the decode graphs: the same Gemm (and fused Gemm + ReLU)
        # nodes in every graph, so the shared pre-packed weights serve them all (ONE packed copy per weight)
        S = input_ids.shape[1]
        H, D = self.heads, self.head_dim
        h = self.embed_rows(input_ids, position_ids)
        causal = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]

        def heads(t):  # [B*S, H*D] -> [B, H, S, D]
            return t.reshape(-1, S, H, D).transpose(1, 2)

        kv = []
        for layer in self.model.decoder.layers:
            x = layer.self_attn_layer_norm(h) if self.pre_ln else h
            attn = layer.self_attn
            q, k, v = heads(gemm(x, attn.q_proj) * attn.scaling), heads(gemm(x, attn.k_proj)), \
                heads(gemm(x, attn.v_proj))
            probs = torch.softmax(masked(q @ k.transpose(-1, -2), allowed), dim=-1, dtype=torch.float32).to(h.dtype)
            h = self.finish_rows(layer, h, (probs @ v).transpose(1, 2).reshape(-1, H * D))
            kv += [k, v]
        last = h.reshape(-1, S, h.shape[-1])[:, -1]  # [B, hidden]: the last column of every row
        return (self.head_rows(last), *kv)


class _GroupQueryAttention(torch.autograd.Function):
    """S new tokens per row against a shared past/present buffer; exports as com.microsoft GroupQueryAttention.

    q, k, v: [B, S, H*D] (q already scaled, hence scale=1); past_k/v: [B, H, T, D]; last: [B] int32, the column of
    each row's last new token (the op's `seqlens_k`: its total length - 1), so row b's new tokens sit at columns
    last[b] - S + 1 .. last[b]. Returns (out [B, S, H*D], present_k, present_v) where present = past with those
    columns set to the new k/v; new token i of row b attends causally over columns [0, last[b] - S + 1 + i].
    onnxruntime writes the columns in place when past and present are bound to one buffer. The torch forward is
    only used while tracing.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, last, kv_length, heads):
        B, H, T, D = past_k.shape
        S = q.shape[1]
        col = torch.arange(T, device=q.device)
        start = last.long() - S + 1  # [B]
        idx = (col[None, :] - start[:, None]).clamp(0, S - 1)  # [B, T]: which new token lands at each column
        here = ((col[None, :] >= start[:, None]) & (col[None, :] <= last[:, None].long()))[:, None, :, None]
        new_k, new_v = (x.reshape(B, S, H, D).transpose(1, 2) for x in (k, v))  # [B, H, S, D]
        gather = idx[:, None, :, None].expand(B, H, T, D)
        present_k = torch.where(here, torch.gather(new_k, 2, gather), past_k)
        present_v = torch.where(here, torch.gather(new_v, 2, gather), past_v)
        pos = start[:, None] + torch.arange(S, device=q.device)[None, :]  # [B, S]
        allowed = (col[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, S, T]
        qh = q.reshape(B, S, H, D).transpose(1, 2)
        scores = masked(qh @ present_k.transpose(-1, -2), allowed)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs @ present_v).transpose(1, 2).reshape(B, S, H * D), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, last, kv_length, heads):
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, last,
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
        h = self.embed_rows(input_ids, past_length.long())  # [B, hidden]; position = tokens so far
        out = []
        for i, idx in enumerate(self.layer_ids):
            layer = self.model.decoder.layers[idx]
            x = layer.self_attn_layer_norm(h) if self.pre_ln else h
            if self.attention == "gqa":
                attn, k, v = self.gqa(layer, x, past[2 * i], past[2 * i + 1], past_length, kv_length)
            else:
                attn, k, v = self.masked(layer, x, past[2 * i], past[2 * i + 1], past_length)
            h = torch.where(gate[:, i, None], self.finish_rows(layer, h, attn), h)
            out += [k, v]
        return (self.head_rows(h), *out)

    def gqa(self, layer, x, past_k, past_v, past_length, kv_length):
        # x: [B, hidden] -> attention output [B, H*D] (constant-shape reshapes only, see `finish_rows`)
        attn, HD = layer.self_attn, self.heads * self.head_dim
        q = (gemm(x, attn.q_proj) * attn.scaling).reshape(-1, 1, HD)
        o, k, v = _GroupQueryAttention.apply(q, gemm(x, attn.k_proj).reshape(-1, 1, HD),
                                             gemm(x, attn.v_proj).reshape(-1, 1, HD), past_k, past_v,
                                             past_length, kv_length, self.heads)
        return o.reshape(-1, HD), k, v

    def masked(self, layer, x, past_k, past_v, past_length):
        attn, H, D = layer.self_attn, self.heads, self.head_dim

        def heads(t):  # [B, H*D] -> [B, H, 1, D]
            return t.reshape(-1, 1, H, D).transpose(1, 2)

        q, k, v = heads(gemm(x, attn.q_proj) * attn.scaling), heads(gemm(x, attn.k_proj)), heads(gemm(x, attn.v_proj))
        col = torch.arange(past_k.shape[2], device=x.device)
        allowed = (col[None, :] < past_length[:, None].long())[:, None, None, :]  # [B, 1, 1, Tmax]
        scores = torch.cat([masked(q @ past_k.transpose(-1, -2), allowed), (q * k).sum(-1, keepdim=True)], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        o = probs[..., :-1] @ past_v + probs[..., -1:] * v  # [B, H, 1, D]
        return o.reshape(-1, H * D), k, v


class VerifyGraph(OPTGraphBase):
    """S new tokens per row through every layer: the verifier of lossless (self-speculative) decoding.

    Row b feeds input_ids[b, :] at columns/positions past_length[b] .. past_length[b] + S - 1, attends over its past
    columns (< past_length[b]) and causally over the new tokens, and returns the logits of every new column
    [B, S, V] and the new tokens' K/V [B, H, S, D] (standard ops only: onnxruntime's GroupQueryAttention takes several
    new tokens with a past only at batch 1). Positions are clamped to the model's last one: rows of the call window
    that are not verified, and columns past a row's budget, may run beyond it; their outputs are never used
    (runtime/slot_backend.py). The hidden state stays [B*S, hidden] between layers (see `finish_rows`).
    """

    def __init__(self, hf_model, attention: str = "matmul") -> None:
        super().__init__(hf_model)
        self.max_position = hf_model.config.max_position_embeddings - 1
        self.attention = attention  # "gqa": one row per call, K/V written in place (the `verify_row` graph)

    def forward(self, input_ids, past_length, *rest):
        # matmul: (k_0, v_0, ...); gqa: (kv_length, k_0, v_0, ...); each k/v [B, H, Tmax, D]
        kv_length, past = (rest[0], rest[1:]) if self.attention == "gqa" else (None, rest)
        S = input_ids.shape[1]
        H, D = self.heads, self.head_dim
        steps = torch.arange(S, device=input_ids.device)
        pos = (past_length.long()[:, None] + steps[None, :]).clamp(max=self.max_position)  # [B, S]
        h = self.embed_rows(input_ids, pos)  # [B*S, hidden]
        col = torch.arange(past[0].shape[2], device=h.device)
        past_ok = (col[None, :] < past_length[:, None].long())[:, None, None, :]  # [B, 1, 1, Tmax]
        causal = (steps[None, :] <= steps[:, None])[None, None]  # [1, 1, S, S]
        out = []
        for i, layer in enumerate(self.model.decoder.layers):
            x = layer.self_attn_layer_norm(h) if self.pre_ln else h
            attn = layer.self_attn

            def heads(t):  # [B*S, H*D] -> [B, H, S, D]
                return t.reshape(-1, S, H, D).transpose(1, 2)

            past_k, past_v = past[2 * i], past[2 * i + 1]
            if self.attention == "gqa":  # onnxruntime takes several new tokens with a past only at batch 1
                last = (past_length + (S - 1)).to(torch.int32)
                o, k, v = _GroupQueryAttention.apply((gemm(x, attn.q_proj) * attn.scaling).reshape(-1, S, H * D),
                                                     gemm(x, attn.k_proj).reshape(-1, S, H * D),
                                                     gemm(x, attn.v_proj).reshape(-1, S, H * D), past_k, past_v,
                                                     last, kv_length, H)
                h = self.finish_rows(layer, h, o.reshape(-1, H * D))
                out += [k, v]
                continue
            q, k, v = heads(gemm(x, attn.q_proj) * attn.scaling), heads(gemm(x, attn.k_proj)), \
                heads(gemm(x, attn.v_proj))
            scores = torch.cat([masked(q @ past_k.transpose(-1, -2), past_ok), masked(q @ k.transpose(-1, -2), causal)],
                               dim=-1)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(h.dtype)
            T = past_k.shape[2]
            o = probs[..., :T] @ past_v + probs[..., T:] @ v  # [B, H, S, D]
            h = self.finish_rows(layer, h, o.transpose(1, 2).reshape(-1, H * D))
            out += [k, v]
        return (self.head_rows(h).reshape(-1, S, self.lm_head.weight.shape[0]), *out)
