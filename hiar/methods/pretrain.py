"""Flow-matching pretraining of the tiny teacher on the synthetic world, without any framework.

``hiar/jobs/pretrain_teacher.py`` runs this inside Ray Train; everything here is plain PyTorch so the training
step reads top to bottom and can be driven from a test or a notebook as well.

The teacher is a bidirectional ``CausalWanTransformer3DModel`` conditioned on a frozen tiny UMT5 encoder over the
world's vocabulary, trained on pixel-space clips (``PixelCodec``) of the training horizon with velocity targets,
logit-normal noise levels with a shift, and 10 % caption dropout so classifier-free guidance works. An EMA of the
weights is what gets evaluated and shipped.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hiar.tiny import oracle
from hiar.io.bundle import save_bundle, load_bundle
from hiar.io.codec import PixelCodec
from hiar.config import HiarConfig
from hiar.methods.losses import flow_matching_loss, sample_training_sigmas
from hiar.core.model import CausalWanTransformer3DModel
from hiar.core.rollout import initial_noise
from hiar.core.schedule import teacher_sigmas
from hiar.seeding import seeded_generator
from hiar.core.teacher import sample_teacher
from hiar.io.text import TextEncoder
from hiar.tiny.captions import heldout_prompts, train_prompts, vocabulary
from hiar.tiny.world import SyntheticWorld


def build_world(cfg: HiarConfig) -> SyntheticWorld:
    """The config's synthetic world (``world.*``): its training scenes, and the reference scenes of the oracle
    (``scene_for_prompt``, which ``world.static_share`` never freezes)."""
    w = cfg.world
    return SyntheticWorld(w.frame_size, w.seed, w.start_jitter, w.static_share)


def build_world_components(cfg: HiarConfig) -> tuple[SyntheticWorld, TextEncoder, PixelCodec]:
    """The tiny preset's world, its frozen text encoder and a pixel codec fitted on training clips."""
    world = build_world(cfg)
    text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length,
                            seed=cfg.world.seed)
    k, h = cfg.world.frames_per_latent, cfg.world.history_frames
    codec = PixelCodec.fit((world.clip(i, cfg.video.train_latent_frames * k)[0] for i in range(128)),
                           frames_per_latent=k, history_frames=h)
    if not codec.latent_channels == cfg.video.latent_channels == cfg.model.in_channels == cfg.model.out_channels:
        raise ValueError(
            f"world.frames_per_latent={k} and world.history_frames={h} give latents of {codec.latent_channels} "
            f"channels (3 per frame); set video.latent_channels, model.in_channels and model.out_channels to "
            f"{codec.latent_channels} (they are {cfg.video.latent_channels}, {cfg.model.in_channels}, "
            f"{cfg.model.out_channels})")
    return world, text, codec


def missing_init_from(source: str | Path) -> str:
    """The error for a ``pretrain.init_from`` that does not exist (the job checks it before starting Ray)."""
    return (f"pretrain.init_from={str(source)!r} does not exist; give a teacher bundle directory or a pretrain "
            f"checkpoint's state.pt")


def widen_channels(state: dict, in_channels: int, out_channels: int) -> dict:
    """A transformer state dict with more latent channels, computing what the narrower model computed.

    New input channels get zero patch-embedding weights, so at the first step the model ignores them and its
    prediction of the old channels is exactly the old model's. New output channel ``i`` starts as a copy of old
    channel ``i mod C_old``: for the pixel codec's history channels that is the same colour of the latent
    frame's own first frame, the nearest thing to an earlier frame the old model can predict.
    """
    state = dict(state)
    w_in = state["patch_embedding.weight"]  # [dim, C, pt, ph, pw]
    c_in = w_in.shape[1]
    if in_channels < c_in:
        raise ValueError(f"cannot narrow the input from {c_in} to {in_channels} latent channels")
    pad = w_in.new_zeros(w_in.shape[0], in_channels - c_in, *w_in.shape[2:])
    state["patch_embedding.weight"] = torch.cat([w_in, pad], dim=1)

    w_out, b_out = state["proj_out.weight"], state["proj_out.bias"]  # rows: patch position major, channel minor
    patch = math.prod(w_in.shape[2:])
    c_out = w_out.shape[0] // patch
    if out_channels < c_out:
        raise ValueError(f"cannot narrow the output from {c_out} to {out_channels} latent channels")
    source = torch.arange(out_channels) % c_out
    state["proj_out.weight"] = w_out.view(patch, c_out, -1)[:, source].reshape(patch * out_channels, -1).clone()
    state["proj_out.bias"] = b_out.view(patch, c_out)[:, source].reshape(-1).clone()
    return state


def window_latents(world: SyntheticWorld, codec: PixelCodec, scene, latent_frames: int,
                   start_frame: int = 0) -> torch.Tensor:
    """Latents ``[1, C, F, H, W]`` of ``scene``'s frames from ``start_frame`` on (a multiple of the codec's
    frames per latent frame). A window that does not start the scene gets its true history (the frames before
    it), as the same frames inside a longer clip would: a model asked about frame 12 of a rollout sees there
    what came before it, never the repeated first frame of a clip's start."""
    k = codec.frames_per_latent
    if start_frame < 0 or start_frame % k:
        raise ValueError(f"start_frame must be a non-negative multiple of {k} (frames per latent frame), "
                         f"got {start_frame}")
    before = min(start_frame, codec.history_lead)
    frames = world.render(scene, start_frame + codec.num_frames_for(latent_frames))[start_frame - before:]
    return codec.encode(torch.from_numpy(frames)[None])[:, :, before // k:]


class TeacherPretraining:
    """Model, EMA, optimiser and data of one training worker; ``state_dict`` makes it resumable exactly."""

    def __init__(self, cfg: HiarConfig, world: SyntheticWorld, text: TextEncoder, codec: PixelCodec,
                 rank: int = 0, world_size: int = 1, wrap_model: Callable = lambda m: m):
        self.cfg, self.world, self.text, self.codec = cfg, world, text, codec
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(cfg.seed)
        self.raw = CausalWanTransformer3DModel(**cfg.model.kwargs())
        self.model = wrap_model(self.raw)
        self.ema = copy.deepcopy(self.raw).eval().requires_grad_(False)
        p = cfg.pretrain
        self.opt = torch.optim.AdamW(self.raw.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        self.step = 0
        self.elapsed = 0.0  # training seconds so far, carried across resumes
        self.prompts = train_prompts()
        self.prompt_row = {p: i for i, p in enumerate(self.prompts)}
        self.prompt_embeds = text.encode(self.prompts)
        self.null_embed = text.null_embedding(1)

    # ------------------------------------------------------------------ data
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Clips ``[B, C, F, H, W]``, their text embeddings (some dropped to the empty prompt), captions."""
        p = self.cfg.pretrain
        start = (step * self.world_size + self.rank) * p.batch_size
        scenes = [self.world.sample_scene(start + i) for i in range(p.batch_size)]
        x0 = torch.cat([window_latents(self.world, self.codec, scene, self.cfg.video.train_latent_frames, first)
                        for scene, first in zip(scenes, self.start_frames(step))])
        captions = [scene.caption for scene in scenes]
        embeds = torch.stack([self.prompt_embeds[self.prompt_row[c]] for c in captions])
        drop = torch.rand(p.batch_size, generator=seeded_generator(self.cfg.seed, 1, step, self.rank)) < p.caption_dropout
        embeds[drop] = self.null_embed[0]
        return x0, embeds, list(captions)

    def start_frames(self, step: int) -> list[int]:
        """Each clip's first frame in its scene: 0, or for a ``pretrain.late_start_share`` of them a multiple of
        ``world.frames_per_latent`` drawn uniformly from ``(0, pretrain.late_start_frames]`` (never earlier than
        the history needs), from a generator of its own so a share of 0 leaves the data as it was."""
        p, b = self.cfg.pretrain, self.cfg.pretrain.batch_size
        if p.late_start_share <= 0:
            return [0] * b
        k = self.codec.frames_per_latent
        gen = seeded_generator(self.cfg.seed, 3, step, self.rank)
        late = torch.rand(b, generator=gen) < p.late_start_share
        lowest = max(1, self.codec.history_lead // k)
        offsets = torch.randint(lowest, p.late_start_frames // k + 1, (b,), generator=gen) * k
        return [int(o) if is_late else 0 for o, is_late in zip(offsets, late)]

    # ------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        p = self.cfg.pretrain
        return p.lr * min(1.0, (step + 1) / max(1, p.warmup_steps))

    def train_step(self) -> dict:
        p = self.cfg.pretrain
        x0, embeds, _ = self.batch(self.step)
        gen = seeded_generator(self.cfg.seed, 2, self.step, self.rank)
        sigma = sample_training_sigmas(x0.shape[0], p.sigma_shift, gen, p.sigma_sampling)
        noise = torch.randn(x0.shape, generator=gen)

        def velocity(x_t, s):
            return self.model(x_t, s * 1000.0, embeds, return_dict=False)[0]

        loss = flow_matching_loss(velocity, x0, sigma, noise)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), p.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for e, w in zip(self.ema.parameters(), self.raw.parameters()):
                e.lerp_(w, 1.0 - p.ema_decay)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": self.lr_at(self.step - 1)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_prompts: int | None = None, split: str = "heldout") -> tuple[dict, np.ndarray, list[str]]:
        return evaluate_teacher(self.ema, self.text, self.codec, self.cfg, num_prompts, split,
                                self.cfg.pretrain.eval_num_steps)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.raw.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.raw.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])

    def init_from(self, source: str | Path) -> None:
        """Start from another teacher's weights (``pretrain.init_from``): a bundle directory (its transformer
        becomes both the trained weights and the EMA) or a trainer state file (its ``model`` and ``ema``).

        Only the weights are taken: the optimiser, the step and the data stream start fresh, like a new run.
        Fewer latent channels than this run's are widened (:func:`widen_channels`); anything else must match.
        """
        path = Path(source)
        if path.is_dir():
            weights = load_teacher(path)[0].state_dict()
            model, ema = weights, weights
        elif path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or not {"model", "ema"} <= state.keys():
                raise ValueError(f"{str(path)!r} is not a trainer state (a dict with 'model' and 'ema', as "
                                 f"TeacherPretraining.state_dict writes to a pretrain checkpoint's state.pt)")
            model, ema = state["model"], state["ema"]
        else:
            raise FileNotFoundError(missing_init_from(source))
        m = self.cfg.model
        for target, weights in ((self.raw, model), (self.ema, ema)):
            try:
                target.load_state_dict(widen_channels(weights, m.in_channels, m.out_channels))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"cannot start from {str(path)!r}: its transformer does not fit model.* of this "
                                 f"run ({err})") from None

    def save_teacher(self, directory: str | Path, card: dict) -> Path:
        return save_teacher(directory, self.ema, self.text, self.codec, card, self.cfg)


def eval_prompts(num: int, split: str = "heldout") -> list[str]:
    """A fixed, evenly spread subset of a prompt split (the same for every evaluation)."""
    pool = heldout_prompts() if split == "heldout" else train_prompts()
    if num < 1:
        raise ValueError(f"need at least one evaluation prompt, got {num}")
    idx = np.linspace(0, len(pool) - 1, min(num, len(pool))).round().astype(int)
    return [pool[i] for i in idx]


@torch.no_grad()
def sample_eval_clips(transformer, text: TextEncoder, codec, cfg: HiarConfig, num_prompts: int | None = None,
                      split: str = "heldout", num_steps: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The teacher's clips ``[N, T, H, W, 3]`` (bidirectional, Euler, CFG) for fixed prompts and seeds, and those
    prompts. ``num_steps`` Euler steps (default ``teacher.num_steps``) at ``teacher.shift`` and its CFG scale."""
    prompts = eval_prompts(num_prompts or cfg.pretrain.eval_prompts, split)
    t = cfg.teacher
    sigmas = teacher_sigmas(num_steps or t.num_steps, t.shift)
    v = cfg.video
    seeds = list(range(len(prompts)))
    noise = initial_noise(seeds, v.train_latent_frames // cfg.rollout.frames_per_block,
                          (v.latent_channels, cfg.rollout.frames_per_block, v.latent_height, v.latent_width))
    embeds = text.encode(prompts)
    null = text.null_embedding(len(prompts))
    latents, _ = sample_teacher(transformer, noise, embeds, sigmas, negative_embeds=null,
                                guidance_scale=t.guidance_scale)
    return codec.decode(latents).cpu().numpy(), prompts


def evaluate_teacher(transformer, text: TextEncoder, codec, cfg: HiarConfig, num_prompts: int | None = None,
                     split: str = "heldout", num_steps: int | None = None) -> tuple[dict, np.ndarray, list[str]]:
    """:func:`sample_eval_clips`, scored with the oracle: ``(mean scores, frames, prompts)``."""
    frames, prompts = sample_eval_clips(transformer, text, codec, cfg, num_prompts, split, num_steps)
    return oracle.score_batch(zip(frames, prompts)), frames, prompts


def save_teacher(directory: str | Path, transformer, text: TextEncoder, codec, card: dict,
                 config: HiarConfig | None = None) -> Path:
    """The teacher as a model bundle (``hiar.io.bundle``) with its card (config, seed, training time, oracle)."""
    return save_bundle(directory, transformer, text, codec, card, config, title="tiny teacher",
                       summary="A bidirectional Wan-architecture DiT trained by flow matching on the synthetic "
                               "world (`hiar/jobs/pretrain_teacher.py`).")


def load_teacher(directory: str | Path):
    """(transformer, text encoder, codec, card) from a directory written by ``save_teacher``."""
    try:
        b = load_bundle(directory)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (run hiar/jobs/pretrain_teacher.py to train a tiny teacher)") from None
    return b.transformer, b.text, b.codec, b.card


def time_budget_left(trainer: TeacherPretraining, started: float) -> bool:
    p = trainer.cfg.pretrain
    spent = trainer.elapsed + (time.monotonic() - started)
    return trainer.step < p.max_steps and spent < p.max_minutes * 60.0


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "TeacherPretraining", "build_world_components", "widen_channels", "missing_init_from", "sample_eval_clips",
    "evaluate_teacher", "save_teacher", "load_teacher", "eval_prompts", "time_budget_left", "count_params",
]
