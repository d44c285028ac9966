"""The velocity field every rollout calls: a DiT bound to one prompt, in sigma space, with optional CFG.

Rollouts never touch the transformer directly; they call ``velocity(x, sigma, cache=..., frame_offset=...)``
and ``velocity.new_cache()``. That keeps the rollout code free of text, guidance and timestep conventions, and
lets tests drive the same rollouts with a toy field whose output is a known function of its context.

Guidance. ``guidance_scale = g`` gives ``v = v_uncond + g * (v_cond - v_uncond)`` (g = 1: no guidance), which is
the same field as the ``cond + (g - 1) * (cond - uncond)`` form the Self-Forcing code writes. Conditional and
unconditional branches run as one batch of 2B, so each call is one model forward and the KV cache holds both
branches (their contexts differ because cross-attention differs).
"""

from __future__ import annotations

import torch

from hiar.core.kv_cache import KVCache
from hiar.core.schedule import sigma_to_timestep


class GuidedVelocity:
    def __init__(
        self,
        transformer,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        frames_per_block: int = 3,
        window_frames: int | None = None,
        sink_frames: int = 0,
        detach_cache: bool = True,
    ):
        if guidance_scale != 1.0 and negative_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_embeds (the unconditional prompt)")
        if negative_embeds is not None and negative_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_embeds {tuple(negative_embeds.shape)} must match prompt_embeds {tuple(prompt_embeds.shape)}"
            )
        self.transformer = transformer
        # a model loaded in bf16 (hiar.io.bundle.runtime_dtypes on a GPU) takes its inputs in its own dtype; the
        # rollouts, losses and caches around it stay float32
        # (the input layer's dtype: diffusers keeps a few Wan modules -- time embedder, norms -- in fp32)
        entry = getattr(transformer, "patch_embedding", None) or transformer
        first = next(entry.parameters(), None) if isinstance(entry, torch.nn.Module) else None
        self.dtype = first.dtype if first is not None else None
        self.guided = negative_embeds is not None and guidance_scale != 1.0
        self.guidance_scale = guidance_scale
        self.context = torch.cat([prompt_embeds, negative_embeds]) if self.guided else prompt_embeds
        if self.dtype is not None and self.dtype != self.context.dtype:
            self.context = self.context.to(self.dtype)
        self.batch_size = prompt_embeds.shape[0]
        self.frames_per_block = frames_per_block
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.detach_cache = detach_cache

    def new_cache(self) -> KVCache:
        return self.transformer.new_kv_cache(self.frames_per_block, self.window_frames, self.sink_frames, self.detach_cache)

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        *,
        cache: KVCache | None = None,
        frame_offset: int = 0,
        attention_mode: str = "block_causal",
    ) -> torch.Tensor:
        """``sigma``: a float, or one value per frame ``[F]``, or ``[B, F]``. Returns the velocity, shape of x."""
        model_x, timestep = self.model_inputs(x, sigma)
        out = self.transformer(
            model_x,
            timestep,
            self.context,
            return_dict=False,
            attention_mode=attention_mode,
            frames_per_block=self.frames_per_block if attention_mode == "block_causal" else None,
            kv_cache=cache,
            frame_offset=frame_offset,
        )[0]
        return self.velocity_from(out, x.dtype)

    def model_inputs(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """What the transformer takes for ``x`` at ``sigma``: (latents, per-frame timesteps ``[B', F]``), both
        doubled under guidance (B' = 2B) and the latents in the model's dtype. ``hiar.core.batching`` packs these
        of several streams into one forward."""
        b, _, f = x.shape[:3]
        if b != self.batch_size:
            raise ValueError(f"x has batch size {b} but the prompt embeddings have {self.batch_size}")
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sig.ndim in (0, 1):
            sig = sig.expand(b, f)
        timestep = sigma_to_timestep(sig)
        if self.guided:
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        if self.dtype is not None and self.dtype != x.dtype:
            x = x.to(self.dtype)
        return x, timestep

    def velocity_from(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The velocity from the transformer's output for ``model_inputs``: guidance applied, in ``dtype``."""
        out = out.to(dtype)
        if not self.guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)
