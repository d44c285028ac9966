"""Per-stream attention cache for the block-causal Wan DiT.

What it holds, per transformer layer:

* self-attention K/V of every written block, keyed by the block's absolute first frame. Keys are stored
  *after* RoPE, so a block keeps the position it was written at. Writing a block at a position that is
  already cached replaces it: this is how hierarchical denoising moves a block's context from one noise
  level to the next, and how the fused call overwrites the noisy K/V a standalone denoise left behind;
* cross-attention K/V of the prompt, computed once per stream (the text does not change between blocks).

Visibility. A query in block ``b`` (frames ``[s, s + k)``) sees key frames ``f`` with
``block(f) <= b`` and either ``f >= s + k - window_frames`` (the sliding window, which counts the query's
own block) or ``f < sink_frames`` (attention sinks: the first frames of the stream stay visible forever).
``window_frames=None`` means unlimited. The window bounds what a query *reads*; since a cached block's K/V in
layer l were computed while it saw its own window, information still travels one window per layer (the
receptive field of an L-layer model is about L windows), as with Self-Forcing's rolling cache. Blocks that no future query can see are evicted, so memory is
bounded by the window for streams of any length; queries must therefore move forward in time.

Packed calls. A forward may also be given several ``CacheSegment``s instead of one cache: its frames are then
the concatenation of the segments, each a run of whole blocks of its own stream position in its own cache (the
S per-step caches of one stream in HiAR's diagonal order). Each segment reads and writes only its own cache, as
if it were a separate call; only the per-token layers run once over the whole pack. Several *streams* (each
with its own prompt and batch size) go into one forward as ``PackMember``s, one per stream, each holding that
stream's prompt and segments (``hiar.core.batching``).

Gradients. With ``detach=True`` (the default) stored K/V are detached: the paper trains with no gradient
through the KV cache. The model still attends to the live, in-call K/V of the blocks it is computing, so a
block's gradient through its own self-attention is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _LayerCache:
    blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # start -> (k, v)
    cross: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class CacheSegment:
    """``num_frames`` frames (whole blocks) of a packed call, at absolute ``frame_offset`` in ``cache``'s stream."""

    cache: "KVCache"
    frame_offset: int
    num_frames: int


@dataclass(frozen=True)
class PackMember:
    """One stream's share of a multi-stream packed call: its prompt and its segments.

    ``context`` is the stream's ``encoder_hidden_states`` ``[b, tokens, text_dim]`` (b: its samples, doubled under
    classifier-free guidance). In the packed call (batch axis 1) the member takes ``b * sum(num_frames)`` frames:
    its b samples one after another, each the concatenation of its segments' frames.
    """

    context: torch.Tensor
    segments: tuple[CacheSegment, ...]


class KVCache:
    """Self- and cross-attention cache of one stream (one batch of samples) for one model."""

    def __init__(
        self,
        num_layers: int,
        frames_per_block: int,
        window_frames: int | None = None,
        sink_frames: int = 0,
        detach: bool = True,
    ):
        if frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
        if window_frames is not None and window_frames < frames_per_block:
            raise ValueError(
                f"window_frames ({window_frames}) must be >= frames_per_block ({frames_per_block}): "
                "a block must at least see itself"
            )
        if sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
        self.num_layers = num_layers
        self.frames_per_block = frames_per_block
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.detach = detach
        self.layers = [_LayerCache() for _ in range(num_layers)]
        self.batch_size: int | None = None
        self.tokens_per_frame: int | None = None
        self.context: torch.Tensor | None = None  # the encoder_hidden_states the cross K/V belong to
        self.evicted_before = 0  # frames < this (and >= sink_frames) are gone
        self.max_frame_end = 0

    # ------------------------------------------------------------------ checks
    def check_call(self, batch_size: int, tokens_per_frame: int, frame_offset: int, num_frames: int) -> None:
        """Validate a forward call against this cache before any compute is spent on it."""
        k = self.frames_per_block
        if frame_offset < 0 or frame_offset % k:
            raise ValueError(f"frame_offset must be a non-negative multiple of frames_per_block={k}, got {frame_offset}")
        if num_frames % k:
            raise ValueError(f"num_frames ({num_frames}) must be divisible by frames_per_block ({k})")
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"KV cache was built for batch size {self.batch_size}, got a call with batch size {batch_size}; "
                "use a new cache per stream"
            )
        if self.tokens_per_frame is not None and tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"KV cache holds {self.tokens_per_frame} tokens per frame, got {tokens_per_frame}: "
                "the latent frame size changed within a stream"
            )
        first_visible = self.window_start(frame_offset)
        if first_visible < self.evicted_before:
            raise ValueError(
                f"query at frame {frame_offset} needs context from frame {first_visible}, which was already "
                f"evicted by the sliding window (kept from frame {self.evicted_before}); caches move forward only"
            )

    def window_start(self, block_start: int) -> int:
        if self.window_frames is None:
            return 0
        return max(0, block_start + self.frames_per_block - self.window_frames)

    # ------------------------------------------------------------------ self-attention
    def write(self, layer: int, frame_offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V ``[B, heads, frames * tokens_per_frame, head_dim]`` of whole blocks starting at frame_offset."""
        bsz, _, n_tok, _ = k.shape
        tpf = self.tokens_per_frame
        if self.batch_size is None:
            self.batch_size = bsz
        num_frames = n_tok // tpf
        kb = self.frames_per_block * tpf
        lc = self.layers[layer]
        for i in range(num_frames // self.frames_per_block):
            start = frame_offset + i * self.frames_per_block
            kk, vv = k[:, :, i * kb : (i + 1) * kb], v[:, :, i * kb : (i + 1) * kb]
            if self.detach:
                kk, vv = kk.detach(), vv.detach()
            lc.blocks[start] = (kk, vv)
        if layer == self.num_layers - 1:
            self.max_frame_end = max(self.max_frame_end, frame_offset + num_frames)
            self._evict()

    def gather(
        self, layer: int, frame_offset: int, num_frames: int, live_k: torch.Tensor, live_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values a call at ``[frame_offset, frame_offset + num_frames)`` may attend to.

        Returns ``(k, v, key_frames)``: cached blocks before the call that fall in the first query block's
        window (or are sinks), followed by the call's own live K/V; ``key_frames`` gives each key token's
        absolute frame index (on the host) so the caller can build the exact visibility mask.
        """
        tpf = self.tokens_per_frame
        lo = self.window_start(frame_offset)
        ks, vs, frames = [], [], []
        for start in sorted(self.layers[layer].blocks):
            if start >= frame_offset:
                continue  # the call's own blocks (and anything later) come from the live tensors
            end = start + self.frames_per_block
            if end <= lo and start >= self.sink_frames:
                continue
            kk, vv = self.layers[layer].blocks[start]
            ks.append(kk)
            vs.append(vv)
            frames.append(torch.arange(start, end).repeat_interleave(tpf))
        ks.append(live_k)
        vs.append(live_v)
        frames.append(torch.arange(frame_offset, frame_offset + num_frames).repeat_interleave(tpf))
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(frames)

    def _evict(self) -> None:
        if self.window_frames is None:
            return
        # The earliest query from now on starts at or after the last block written so far minus one block
        # (a block may be re-written at its own position), so nothing before its window start is needed.
        horizon = self.window_start(self.max_frame_end - 2 * self.frames_per_block)
        for lc in self.layers:
            for start in [s for s in lc.blocks if s + self.frames_per_block <= horizon and s >= self.sink_frames]:
                del lc.blocks[start]
        self.evicted_before = max(self.evicted_before, horizon)

    # ------------------------------------------------------------------ cross-attention
    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.layers[layer].cross

    def set_cross_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layers[layer].cross = (k.detach(), v.detach()) if self.detach else (k, v)

    def bind_context(self, encoder_hidden_states: torch.Tensor) -> bool:
        """Remember the prompt the cross K/V belong to. Returns True when they must be (re)computed."""
        same = self.context is not None and (
            encoder_hidden_states is self.context
            or (encoder_hidden_states.shape == self.context.shape and torch.equal(encoder_hidden_states, self.context))
        )
        if not same:
            self.context = encoder_hidden_states
            for lc in self.layers:
                lc.cross = None
        return not same

    # ------------------------------------------------------------------ introspection
    def cached_blocks(self, layer: int = 0) -> list[int]:
        return sorted(self.layers[layer].blocks)

    def block_kv(self, start: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].blocks[start]

    def nbytes(self) -> int:
        total = 0
        for lc in self.layers:
            for k, v in lc.blocks.values():
                total += k.numel() * k.element_size() + v.numel() * v.element_size()
            if lc.cross is not None:
                total += sum(t.numel() * t.element_size() for t in lc.cross)
        return total
