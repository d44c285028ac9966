"""CausalWanTransformer3DModel: the Wan2.1 DiT with block-causal attention, per-frame timesteps and a KV cache.

Over 400 lines because it is one model in diffusers' one-file-per-model style: the transformer and the blocks,
attention, embeddings and RoPE that only it uses, whose parameter names must match diffusers' checkpoints.

The constructor, parameter names and config are those of diffusers' ``WanTransformer3DModel`` (text-to-video
variant), so ``from_pretrained`` reads a diffusers Wan2.1 ``transformer/`` directory and ``save_pretrained``
writes one diffusers loads back. Everything causal is a *forward* argument, not config, for the same reason:

* ``attention_mode="bidirectional"`` (the teacher, the critic, the FKL term) or ``"block_causal"`` (the
  student), with ``frames_per_block`` latent frames per block (3 in the paper);
* ``timestep`` of shape ``[B]`` (one level per sample, as diffusers) or ``[B, F]`` (one per latent frame);
* ``kv_cache`` + ``frame_offset``: the call's frames sit at absolute positions
  ``[frame_offset, frame_offset + F)``; their K/V are written into the cache (replacing any block already
  cached there) and every query attends to the cached blocks before it plus the call's own blocks under a
  block-causal mask. Passing ``[context block n at t_{j+1}, block n+1 at t_j]`` with per-frame timesteps is
  the paper's *fused* call: one forward writes block n's context and denoises block n+1, and block n's keys
  never see block n+1;
* ``kv_cache`` as a list of ``CacheSegment``s (``frame_offset`` left at 0): a *packed* call, whose frames are
  the segments one after another, each at its own position in its own cache (see ``PackedSelfAttentionPlan``);
* ``kv_cache`` as a list of ``PackMember``s (batch axis 1, ``encoder_hidden_states=None``): a *multi-stream*
  packed call, each member one stream with its own prompt, batch size and segments (``hiar.core.batching``).

With ``attention_mode="bidirectional"``, one timestep and no cache, the output equals diffusers' to float32
round-off (tested). Image-to-video inputs (``image_dim`` / ``added_kv_proj_dim``) are not supported.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from hiar.core.kv_cache import CacheSegment, KVCache, PackMember

ATTENTION_MODES = ("bidirectional", "block_causal")


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep features: [cos, sin] of ``t * 10000^(-i/half)`` (flip_sin_to_cos, no freq shift)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


#: The activations between the two linears of a :class:`TwoLayerMLP`.
MLP_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class TwoLayerMLP(nn.Module):
    """``linear_2(activation(linear_1(x)))``: diffusers' ``TimestepEmbedding`` (``"silu"``) and
    ``PixArtAlphaTextProjection`` (``"gelu_tanh"``), with their parameter names."""

    def __init__(self, in_dim: int, dim: int, activation: str):
        super().__init__()
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(MLP_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(MLP_ACTIVATIONS[self.activation](self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way modulation); text -> model width. Names follow diffusers."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TwoLayerMLP(freq_dim, dim, "silu")
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TwoLayerMLP(text_dim, dim, "gelu_tanh")

    def time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = sinusoidal_embedding(timestep.reshape(-1), self.freq_dim)
        dtype = self.time_embedder.linear_1.weight.dtype
        # the time embedder stays fp32 (_keep_in_fp32_modules); its output enters the rest in the model's dtype
        temb = self.time_embedder(feats.to(dtype)).to(self.time_proj.weight.dtype)
        return temb, self.time_proj(F.silu(temb))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def rope_tables(
    head_dim: int, frames: torch.Tensor, height: int, width: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-axis RoPE (cos, sin) for absolute frame indices ``frames`` and an ``height x width`` grid.

    Computed from positions rather than sliced from a fixed table, so a stream can go past any length.
    float64 like diffusers, hence bit-identical to its table for the same positions.
    """
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim

    def axis(dim: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        ang = torch.outer(pos.to(torch.float64), inv)
        return ang.cos().repeat_interleave(2, dim=1).float(), ang.sin().repeat_interleave(2, dim=1).float()

    ct, st = axis(t_dim, frames.cpu())
    ch, sh = axis(h_dim, torch.arange(height))
    cw, sw = axis(w_dim, torch.arange(width))
    nf = frames.numel()

    def grid(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                a.view(nf, 1, 1, -1).expand(nf, height, width, -1),
                b.view(1, height, 1, -1).expand(nf, height, width, -1),
                c.view(1, 1, width, -1).expand(nf, height, width, -1),
            ],
            dim=-1,
        ).reshape(1, 1, nf * height * width, head_dim)

    return grid(ct, ch, cw), grid(st, sh, sw)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``[B, heads, L, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


#: How a block-causal call attends: ``(q_lo, q_hi, k_first, k_last, key_indices)`` per run of query tokens that
#: see the same keys; ``key_indices`` is None when those keys are the slice ``[k_first, k_last)``, else the gathered
#: positions (sink frames before a window). Plain ints on the host, so a run list is hashable and comparing two
#: calls' attention needs no device round trip.
AttentionRuns = tuple[tuple[int, int, int, int, "tuple[int, ...] | None"], ...]


def attention_runs(mask: torch.Tensor) -> AttentionRuns:
    """The runs of a ``[Lq, Lk]`` boolean mask whose rows come in runs (block-causal: every query of a block sees
    the same keys)."""
    mask = mask.cpu()
    lq = mask.shape[0]
    starts = [0] + ((mask[1:] != mask[:-1]).any(dim=1).nonzero().flatten() + 1).tolist()
    runs = []
    for lo, hi in zip(starts, starts[1:] + [lq]):
        keys = mask[lo].nonzero().flatten()
        first, last = int(keys[0]), int(keys[-1]) + 1
        runs.append((lo, hi, first, last, None if last - first == keys.numel() else tuple(keys.tolist())))
    return tuple(runs)


def attend_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: AttentionRuns) -> torch.Tensor:
    """Attention of ``q`` ``[B, heads, Lq, d]`` over ``k``/``v`` as ``runs`` say, one mask-free call per run.

    Why not one call with the mask: with an arbitrary mask a GPU runs no flash kernel, and at Wan2.1-1.3B's shapes
    the masked call takes about twice as long as the same attention split this way (per layer, on an H200; a whole
    Wan-shaped video takes 0.83x the time: README "Benchmarks"); the split also skips the scores of keys a query
    cannot see. The keys each query attends to are exactly the mask's, so results equal the masked call's up to
    the kernels' rounding.
    """
    outs = []
    for lo, hi, first, last, indices in runs:
        if indices is None:
            kr, vr = k[:, :, first:last], v[:, :, first:last]
        else:
            where = torch.tensor(indices, device=k.device)
            kr, vr = k.index_select(2, where), v.index_select(2, where)
        outs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], kr, vr))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=mask)`` for a block-causal ``[Lq, Lk]`` boolean mask, as
    :func:`attend_runs` over the mask's :func:`attention_runs`."""
    return attend_runs(q, k, v, attention_runs(mask))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: AttentionRuns | None) -> torch.Tensor:
    """The attention-weighted values ``[B, L, heads * d]`` of ``q``/``k``/``v`` ``[B, heads, L, d]`` (``runs``
    None: every query sees every key)."""
    out = F.scaled_dot_product_attention(q, k, v) if runs is None else attend_runs(q, k, v, runs)
    return out.transpose(1, 2).flatten(2).type_as(q)


def batched_attention(calls: list) -> list[torch.Tensor]:
    """``[attention(q, k, v, runs) for q, k, v, runs in calls]``, with the calls that share their runs and shapes
    stacked on the batch axis and done together.

    Why: a packed call (``PackedSelfAttentionPlan``) holds one segment per denoising step and stream, and in a
    stream's steady state every segment attends in the same pattern (its own cache window, then its own blocks);
    stacked, the segments of 8 streams take 2 attention calls per layer instead of 64. Each batch row is computed
    on its own, as in its own call.
    """
    groups: dict = {}
    for i, (q, k, v, runs) in enumerate(calls):
        groups.setdefault((runs, q.shape[1:], k.shape[1:], v.shape[1:]), []).append(i)
    out: list = [None] * len(calls)
    for (runs, *_), members in groups.items():
        q, k, v = (torch.cat([calls[i][j] for i in members]) if len(members) > 1 else calls[members[0]][j]
                   for j in range(3))
        mixed = attention(q, k, v, runs)
        for i, part in zip(members, mixed.split([calls[i][0].shape[0] for i in members])):
            out[i] = part
    return out


class Attention(nn.Module):
    """Multi-head attention with RMS-normalised q/k across heads (Wan's ``rms_norm_across_heads``)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, dim] -> [B, heads, L, head_dim]
        return x.unflatten(2, (self.heads, -1)).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.norm_k(self.to_k(context))), self.split(self.to_v(context))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: AttentionRuns | None) -> torch.Tensor:
        return self.project_out(self.mix(q, k, v, runs))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: AttentionRuns | None) -> torch.Tensor:
        """The attention-weighted values ``[B, L, dim]``, before the output projection."""
        return attention(q, k, v, runs)

    def project_out(self, mixed: torch.Tensor) -> torch.Tensor:
        return self.to_out[1](self.to_out[0](mixed))


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` for tokens ``x`` ``[B, L, dim]`` and one modulation per group of tokens
    ``[B, G, 1, dim]`` (G = frames with per-frame timesteps, else 1): the tokens are viewed by group, so the
    modulation broadcasts over a frame's tokens instead of being copied to every token (the same products, a sixth
    of the memory traffic of a per-token ``[B, L, 6, dim]`` modulation)."""
    return (x.unflatten(1, (scale.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with ``gate`` one per group of tokens, as in :func:`modulate`."""
    groups = gate.shape[1]
    return (x.unflatten(1, (groups, -1)) + y.unflatten(1, (groups, -1)) * gate).flatten(1, 2)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, eps)
        self.attn2 = Attention(dim, heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        self_attention: "SelfAttentionPlan | PackedSelfAttentionPlan",
        layer: int,
    ) -> torch.Tensor:
        # mod: [B, G, 6, dim], one modulation per group of tokens: G = F with per-frame timesteps, else 1
        shift, scale, gate, c_shift, c_scale, c_gate = (
            (self.scale_shift_table.unsqueeze(0) + mod.float()).unsqueeze(3).unbind(2)
        )  # each [B, G, 1, dim], broadcast over a group's tokens by ``modulate`` and ``gated_residual``

        h = modulate(self.norm1(x.float()), scale, shift).type_as(x)
        a = self.attn1
        q = apply_rope(a.split(a.norm_q(a.to_q(h))), *rope)
        k = apply_rope(a.split(a.norm_k(a.to_k(h))), *rope)
        v = a.split(a.to_v(h))
        attended = self_attention.attend(layer, a, q, k, v)
        x = gated_residual(x.float(), attended, gate).type_as(x)

        h = self.norm2(x.float()).type_as(x)
        a2 = self.attn2
        x = x + self_attention.cross_attend(layer, a2, a2.split(a2.norm_q(a2.to_q(h))), context)

        h = modulate(self.norm3(x.float()), c_scale, c_shift).type_as(x)
        return gated_residual(x.float(), self.ffn(h).float(), c_gate).type_as(x)


class SelfAttentionPlan:
    """Decides, for one forward call, which keys each query sees, and talks to the KV cache.

    Kept out of the blocks so the math above reads like diffusers' and all causal bookkeeping is here.
    """

    def __init__(
        self,
        mode: str,
        frames_per_block: int | None,
        tokens_per_frame: int,
        frame_offset: int,
        num_frames: int,
        cache: KVCache | None,
    ):
        self.mode, self.k, self.tpf = mode, frames_per_block, tokens_per_frame
        self.offset, self.num_frames, self.cache = frame_offset, num_frames, cache
        # on the host: which keys a query sees is bookkeeping, decided once per call, not per layer
        self.query_frames = torch.arange(frame_offset, frame_offset + num_frames).repeat_interleave(tokens_per_frame)
        self._runs: dict[bytes, AttentionRuns] = {}  # key layout -> runs; every layer of a call has the same layout
        self._static_runs = None
        if mode == "block_causal" and cache is None:
            self._static_runs = attention_runs(self.mask_for(self.query_frames))

    def mask_for(self, key_frames: torch.Tensor) -> torch.Tensor:
        qb = (self.query_frames // self.k)[:, None]
        kb = (key_frames // self.k)[None, :]
        visible = kb <= qb
        cache = self.cache
        if cache is not None and cache.window_frames is not None:
            q_end = (qb + 1) * self.k
            in_window = key_frames[None, :] >= q_end - cache.window_frames
            visible = visible & (in_window | (key_frames[None, :] < cache.sink_frames))
        return visible

    def runs_for(self, key_frames: torch.Tensor) -> AttentionRuns:
        layout = key_frames.numpy().tobytes()
        if layout not in self._runs:
            self._runs[layout] = attention_runs(self.mask_for(key_frames))
        return self._runs[layout]

    def keys(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """``(keys, values, runs)`` of this call at ``layer`` (runs None: bidirectional), the call's own K/V
        written into the cache."""
        if self.cache is None:
            return k, v, self._static_runs
        ck, cv, key_frames = self.cache.gather(layer, self.offset, self.num_frames, k, v)
        self.cache.write(layer, self.offset, k, v)
        return ck, cv, self.runs_for(key_frames)

    def attend(self, layer: int, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attn.project_out(self.mix(layer, attn, q, k, v))

    def mix(self, layer: int, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v, runs = self.keys(layer, k, v)
        return attn.mix(q, k, v, runs)

    def cross_attend(self, layer: int, attn: Attention, q: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        ck, cv = self.cross_kv(layer, attn, context)
        return attn.attend(q, ck, cv, None)

    def cross_kv(self, layer: int, attn: Attention, context: torch.Tensor | None):
        if self.cache is None:
            return attn.project_kv(context)
        cached = self.cache.cross_kv(layer)
        if cached is None or _fresh_cross_kv(self.cache):
            fresh = attn.project_kv(context)
            if cached is None:
                self.cache.set_cross_kv(layer, *fresh)
            return fresh
        return cached


class _Member:
    """A packed call's member as the model sees it: a prompt, its segments, and ``rows`` samples per batch row."""

    def __init__(self, context: torch.Tensor, segments, rows: int):
        self.context, self.segments, self.rows = context, list(segments), rows


class PackedSelfAttentionPlan:
    """Attention of a packed call: each segment attends only to its own cache and its own live keys, and each
    member (stream) to its own prompt.

    Every per-token layer (projections, norms, modulation, FFN, output head) runs once over the whole pack; only
    the attention products are taken per segment (self-attention) and per member (cross-attention), so no query
    is ever scored against another segment's keys or another stream's prompt (no mask, no padding, no wasted
    scores). Segments (and members) that attend in the same pattern are stacked on the batch axis and done in one
    call (:func:`batched_attention`). A member's ``rows`` samples lie one after another along the token axis of
    one batch row; the plan moves them onto the batch axis for its attention products (``rows == 1`` is the
    single-stream pack of ``hiar.core.diagonal``, whose batch axis is the stream's own).
    """

    def __init__(self, members: list[_Member], batch: int, tokens_per_frame: int):
        self.batch = batch
        self.members = []  # (slice of the pack, rows, [(plan, slice of one row)])
        start = 0
        for m in members:
            segs, row = [], 0
            for seg in m.segments:
                plan = SelfAttentionPlan("block_causal", seg.cache.frames_per_block, tokens_per_frame,
                                         seg.frame_offset, seg.num_frames, seg.cache)
                segs.append((plan, slice(row, row + seg.num_frames * tokens_per_frame)))
                row += seg.num_frames * tokens_per_frame
            self.members.append((slice(start, start + m.rows * row), m.rows, segs))
            start += m.rows * row

    @staticmethod
    def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:  # [B, heads, rows * L, d] -> [B * rows, heads, L, d]
        if rows == 1:
            return t
        b, h, n, d = t.shape
        return t.reshape(b, h, rows, n // rows, d).transpose(1, 2).reshape(b * rows, h, n // rows, d)

    def _unrows(self, t: torch.Tensor, rows: int) -> torch.Tensor:  # [B * rows, L, dim] -> [B, rows * L, dim]
        return t if rows == 1 else t.reshape(self.batch, rows * t.shape[1], t.shape[2])

    def attend(self, layer: int, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls = []  # one per segment, members in order
        for sl, rows, segs in self.members:
            qm, km, vm = (self._rows(t[:, :, sl], rows) for t in (q, k, v))
            for plan, ss in segs:
                calls.append((qm[:, :, ss], *plan.keys(layer, km[:, :, ss], vm[:, :, ss])))
        mixed, out = iter(batched_attention(calls)), []
        for _, rows, segs in self.members:
            out.append(self._unrows(torch.cat([next(mixed) for _ in segs], dim=1), rows))
        return attn.project_out(torch.cat(out, dim=1))

    def cross_attend(self, layer: int, attn: Attention, q: torch.Tensor, contexts: list) -> torch.Tensor:
        calls = []  # one per member
        for (sl, rows, segs), context in zip(self.members, contexts):
            # All segments of a member belong to one stream, hence one prompt: its K/V are the same in every cache.
            kv = segs[0][0].cross_kv(layer, attn, context)
            for plan, _ in segs[1:]:
                if plan.cache.cross_kv(layer) is None:
                    plan.cache.set_cross_kv(layer, *kv)
            calls.append((self._rows(q[:, :, sl], rows), *kv, None))
        mixed = batched_attention(calls)
        return attn.project_out(torch.cat([self._unrows(m, rows) for m, (_, rows, _) in zip(mixed, self.members)], 1))


def _pack_members(kv_cache: list, encoder_hidden_states, frame_offset: int, batch: int, num_frames: int):
    """The members of a packed call (a list of ``CacheSegment`` or of ``PackMember``), checked."""
    items = list(kv_cache)
    if not items:
        raise ValueError("a packed call needs at least one CacheSegment")
    if frame_offset != 0:
        raise ValueError("a packed call takes its positions from its CacheSegments; leave frame_offset at 0")
    if all(isinstance(item, PackMember) for item in items):
        if encoder_hidden_states is not None:
            raise ValueError("a multi-stream packed call takes each stream's prompt from its PackMember; "
                             "pass encoder_hidden_states=None")
        if batch != 1:
            raise ValueError(f"a multi-stream packed call has batch size 1 (each member's samples lie along the "
                             f"frame axis), got {batch}")
        members = [_Member(m.context, m.segments, int(m.context.shape[0])) for m in items]
    elif all(isinstance(item, CacheSegment) for item in items):
        members = [_Member(encoder_hidden_states, items, 1)]
    else:
        raise ValueError("kv_cache must be a KVCache, a list of CacheSegment or a list of PackMember")
    segments = [seg for m in members for seg in m.segments]
    if any(not m.segments for m in members) or any(not isinstance(seg, CacheSegment) for seg in segments):
        raise ValueError("every PackMember needs at least one CacheSegment")
    if len({id(seg.cache) for seg in segments}) != len(segments):
        raise ValueError("each segment of a packed call needs its own cache (one segment per cache)")
    covered = sum(m.rows * seg.num_frames for m in members for seg in m.segments)
    if covered != num_frames:
        raise ValueError(f"the segments cover {covered} frames, the call has {num_frames}")
    return members


def _bind_cache(cache: KVCache, tpf: int, context: torch.Tensor) -> None:
    cache.tokens_per_frame = tpf
    cache.bind_context(context)  # when the prompt changed, cross K/V get recomputed lazily layer by layer


def _fresh_cross_kv(cache) -> bool:
    return torch.is_grad_enabled() and cache.detach


class CausalWanTransformer3DModel(ModelMixin, ConfigMixin):
    """Wan2.1 text-to-video DiT; see the module docstring for what is added to diffusers' forward."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if image_dim is not None or added_kv_proj_dim is not None or pos_embed_seq_len is not None:
            raise ValueError(
                "CausalWanTransformer3DModel supports the text-to-video Wan2.1 DiT only; this config has "
                f"image_dim={image_dim}, added_kv_proj_dim={added_kv_proj_dim} (an image-to-video checkpoint)"
            )
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' (Wan2.1) is supported, got {qk_norm!r}")
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, text_dim)
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps) for _ in range(num_layers)]
        )
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ helpers
    def new_kv_cache(
        self, frames_per_block: int, window_frames: int | None = None, sink_frames: int = 0, detach: bool = True
    ) -> KVCache:
        return KVCache(len(self.blocks), frames_per_block, window_frames, sink_frames, detach)

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def _check_context(self, encoder_hidden_states, b: int) -> None:
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states must be [B={b}, tokens, {self.config.text_dim}], got {shape}")
        if encoder_hidden_states.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}, the model expects "
                f"text_dim={self.config.text_dim}"
            )

    def _validate(self, hidden_states, timestep, attention_mode, frames_per_block, kv_cache):
        cfg = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, F, H, W], got shape {tuple(hidden_states.shape)}")
        b, c, f, h, w = hidden_states.shape
        if c != cfg.in_channels:
            raise ValueError(f"hidden_states has {c} channels, the model expects in_channels={cfg.in_channels}")
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size F={f}, H={h}, W={w} is not divisible by patch_size={tuple(cfg.patch_size)}")
        if timestep.ndim == 0:
            raise ValueError("timestep must have shape [B] or [B, F], got a scalar")
        if timestep.shape[0] != b or timestep.ndim > 2 or (timestep.ndim == 2 and timestep.shape[1] != f):
            raise ValueError(f"timestep must have shape [B]=[{b}] or [B, F]=[{b}, {f}], got {tuple(timestep.shape)}")
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
        if attention_mode == "block_causal" or kv_cache is not None:
            if attention_mode != "block_causal":
                raise ValueError("a kv_cache only makes sense with attention_mode='block_causal'")
            if pt != 1:
                raise ValueError("block-causal attention needs a temporal patch size of 1")
            k = kv_cache.frames_per_block if kv_cache is not None else frames_per_block
            if k is None:
                raise ValueError("attention_mode='block_causal' needs frames_per_block (or a kv_cache)")
            if frames_per_block is not None and kv_cache is not None and frames_per_block != kv_cache.frames_per_block:
                raise ValueError(
                    f"frames_per_block={frames_per_block} differs from the cache's {kv_cache.frames_per_block}"
                )
            if f % k:
                raise ValueError(f"num_frames ({f}) must be divisible by frames_per_block ({k})")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        attention_mode: str = "bidirectional",
        frames_per_block: int | None = None,
        kv_cache: KVCache | list[CacheSegment] | list[PackMember] | None = None,
        frame_offset: int = 0,
    ):
        if encoder_hidden_states_image is not None:
            raise ValueError("image conditioning is not supported (text-to-video only)")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        b, _, f, h, w = hidden_states.shape
        members = None
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            members = _pack_members(kv_cache, encoder_hidden_states, frame_offset, b, f)
        if members is not None:
            caches = [seg.cache for m in members for seg in m.segments]
        else:
            caches = [kv_cache] if kv_cache is not None else []
        for cache in caches or [None]:
            self._validate(hidden_states, timestep, attention_mode, frames_per_block, cache)
        for m in members or []:
            self._check_context(m.context, b * m.rows)
        if members is None:
            self._check_context(encoder_hidden_states, b)
        pt, ph, pw = self.config.patch_size
        pf, pph, ppw = f // pt, h // ph, w // pw
        tpf = pph * ppw
        if members is not None:
            for m in members:  # every segment is checked before any cache is touched
                for seg in m.segments:
                    seg.cache.check_call(b * m.rows, tpf, seg.frame_offset, seg.num_frames)
            for m in members:
                for seg in m.segments:
                    _bind_cache(seg.cache, tpf, m.context)
            frames = torch.cat([torch.arange(seg.frame_offset, seg.frame_offset + seg.num_frames)
                                for m in members for _ in range(m.rows) for seg in m.segments])
        else:
            if kv_cache is not None:
                kv_cache.check_call(b, tpf, frame_offset, pf)
                _bind_cache(kv_cache, tpf, encoder_hidden_states)
            frames = torch.arange(frame_offset, frame_offset + pf)
        k = caches[0].frames_per_block if caches else frames_per_block

        rope = tuple(t.to(hidden_states.device) for t in rope_tables(self.config.attention_head_dim, frames, pph, ppw))

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        temb, mod = self.condition_embedder.time(timestep)
        dim = x.shape[-1]
        groups = pf if timestep.ndim == 2 else 1  # per-frame timesteps modulate each frame's tokens
        temb = temb.view(b, groups, dim).type_as(x)
        mod = mod.view(b, groups, 6, dim)

        # With grad on and a detached cache (training), the prompt path is recomputed every call: "no gradient
        # through the cache" is about temporal context, and the text projections must still learn.
        def embed(text, caches):
            need = not caches or any(c.cross_kv(0) is None or _fresh_cross_kv(c) for c in caches)
            return self.condition_embedder.text_embedder(text) if need else None

        if members is not None:
            context = [embed(m.context, [seg.cache for seg in m.segments]) for m in members]
            plan = PackedSelfAttentionPlan(members, b, tpf)
        else:
            context = embed(encoder_hidden_states, caches)
            plan = SelfAttentionPlan(attention_mode, k, tpf, frame_offset, pf, kv_cache)
        for i, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, context, mod, rope, plan, i)
            else:
                x = block(x, context, mod, rope, plan, i)

        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        x = modulate(self.norm_out(x.float()), scale, shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, pf, pph, ppw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a diffusers-format directory. Local paths only: nothing is fetched from a hub."""
        path = os.fspath(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder")
        where = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(where):
            raise FileNotFoundError(
                f"no model directory at {where!r}: expected a diffusers-format Wan transformer directory "
                "(config.json + diffusion_pytorch_model*.safetensors)"
            )
        if not os.path.isfile(os.path.join(where, "config.json")):
            raise FileNotFoundError(f"{where!r} has no config.json: not a diffusers-format model directory")
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write a diffusers-format directory that ``diffusers.WanTransformer3DModel`` loads as-is."""
        super().save_pretrained(save_directory, *args, **kwargs)
        cfg_path = os.path.join(save_directory, "config.json")
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        # Name the diffusers class so WanPipeline / model_index.json tooling recognise the directory.
        cfg["_class_name"] = "WanTransformer3DModel"
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
