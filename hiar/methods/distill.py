"""Distillation (paper §3.3): ODE-regression init, then DMD under self-rollout plus the forward-KL regulariser.

Pure PyTorch; ``hiar/jobs/train.py`` wraps these pieces in Ray Train.  The training step reads top to bottom in
:meth:`Distiller.iteration`:

1. **Self-rollout** of the causal generator from seeded noise, in the training mode of the config
   (:func:`self_rollout`): ``hierarchical`` (HiAR: every block at step j before any block at step j + 1, context
   re-noised to t_{j+1}) or ``block_first`` (Self-Forcing).  One random *exit step* is shared by all blocks;
   the rollout runs without gradient up to it and the exit step's clean estimate carries the only gradient.
   Context never carries gradient (``StepStage`` detaches it; the KV cache is detached).
2. **Generator update** every ``critic_ratio``-th iteration: the DMD loss (eq. 5) from the score difference of
   the real score (the teacher with CFG) and the fake score (the critic) at a random shifted noise level, plus
   ``lambda`` times the FKL loss (eq. 10) on teacher-trajectory states for the first K steps, with the student in
   bidirectional attention (the paper) or block-causal attention (the public code).
3. **Critic update** every iteration: flow matching on the detached generator samples.

Gradients of data-parallel workers are averaged with one ``all_reduce`` per parameter tensor
(:func:`hiar.methods.parallel.average_gradients`) rather than by wrapping the models in DDP: the generator is called many times per
step (one call per block and step), which DDP's once-per-forward reducer does not model.

With ``distill.sharding: fsdp`` and more than one worker the generator, the critic, the EMA and (per
``distill.real_score_sharding``) the real score are sharded with FSDP2 at construction (:mod:`hiar.methods.sharding`):
FSDP reduce-scatters the gradients itself, so ``average_gradients`` is skipped; the training step is the
same code.  ``distill.activation_checkpointing`` checkpoints each transformer block of the trained models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hiar.methods import sharding
from hiar.config import HiarConfig
from hiar.methods.losses import dmd_generator_loss, fkl_loss, flow_matching_loss
from hiar.methods.parallel import autocast, average_gradients, clip_gradients, mean_over_workers
from hiar.core.rollout import ROLLOUT_MODES, StepStage, _split_blocks, advance, initial_noise
from hiar.core.schedule import add_noise, shift_sigma, x0_from_velocity
from hiar.seeding import derive_seed, seeded_generator
from hiar.core.velocity import GuidedVelocity


# ---------------------------------------------------------------------- rollouts and scores
def self_rollout(velocity: GuidedVelocity, noise: torch.Tensor, sigmas: torch.Tensor, seeds, *, mode: str,
                 exit_step: int, step_rule: str = "x0_renoise", context_noise: str = "next") -> torch.Tensor:
    """The generator's samples ``[B, C, F, H, W]``: each block's clean estimate at ``exit_step``.

    Gradient flows only through the exit step's model calls (when grad is enabled by the caller).  With
    ``exit_step = S - 1`` and no grad this equals the inference rollout of the same mode.
    """
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout mode must be one of {ROLLOUT_MODES}, got {mode!r}")
    num_steps = sigmas.numel() - 1
    if not 0 <= exit_step < num_steps:
        raise ValueError(f"exit_step must be in [0, {num_steps - 1}], got {exit_step}")
    grad = torch.is_grad_enabled()
    k = velocity.frames_per_block
    blocks = _split_blocks(noise, k)
    if mode == "hierarchical":
        for j in range(exit_step + 1):
            stage = StepStage(velocity, sigmas, j, seeds, step_rule=step_rule, context_noise=context_noise, fused=True)
            with torch.set_grad_enabled(grad and j == exit_step):
                outs = []
                for n, xb in enumerate(blocks):
                    x_next = stage.process(n, xb)
                    outs.append(stage.last_x0 if j == exit_step else x_next)
            blocks = outs
        return torch.cat(blocks, dim=2)
    cache = velocity.new_cache()
    out = []
    for n, x in enumerate(blocks):
        for j in range(exit_step + 1):
            with torch.set_grad_enabled(grad and j == exit_step):
                s, s_next = float(sigmas[j]), float(sigmas[j + 1])
                v = velocity(x, s, cache=cache, frame_offset=n * k)
                x, x0 = advance(x, v, s, s_next, step_rule, seeds, n, j)
        out.append(x0)
        with torch.no_grad():
            velocity(x0.detach(), 0.0, cache=cache, frame_offset=n * k)  # Self-Forcing: context at t_c = 0
    return torch.cat(out, dim=2)


def per_frame(sigma: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B]`` -> ``[B, F]`` (one level for the whole clip)."""
    return sigma.view(-1, 1).expand(-1, frames)


def clean_estimate(velocity: GuidedVelocity, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 predicted by a bidirectional score model at per-sample levels ``sigma`` ``[B]``."""
    s = per_frame(sigma, x_t.shape[2])
    v = velocity(x_t, s, attention_mode="bidirectional")
    return x0_from_velocity(x_t, v, sigma.view(-1, 1, 1, 1, 1))


def score_sigmas(batch: int, cfg: HiarConfig, gen: torch.Generator) -> torch.Tensor:
    """DMD / critic noise levels: uniform times in [min_t, max_t] (clamped away from 0 and 1), shifted (eq. 1) by
    ``distill.score_shift`` (``schedule.shift`` when unset)."""
    d = cfg.distill
    t = d.min_t + (d.max_t - d.min_t) * torch.rand(batch, generator=gen)
    return shift_sigma(t, cfg.schedule.shift if d.score_shift is None else d.score_shift)


def real_guidance_scale(cfg: HiarConfig) -> float:
    """The real score's CFG scale in DMD: ``distill.real_guidance_scale``, else the teacher's sampling scale."""
    d = cfg.distill
    return cfg.teacher.guidance_scale if d.real_guidance_scale is None else d.real_guidance_scale


# ---------------------------------------------------------------------- losses of one micro-batch
def ode_regression_loss(student, embeds: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor,
                        frames_per_block: int, gen: torch.Generator) -> torch.Tensor:
    """Self-Forcing's ODE init: each block at a random student schedule point (independently per block), the
    causal student (block-causal attention, no cache) regresses the clean latent.

    ``latents``: ``[B, S + 1, C, F, H, W]`` teacher states at the student's points (noise first, clean last).
    """
    b, s_plus_1, _, f = latents.shape[:4]
    k = frames_per_block
    n_blocks = f // k
    # drawn on the CPU (``gen`` is a CPU generator: the same draws on any device), used where the latents are
    idx = torch.randint(0, s_plus_1 - 1, (b, n_blocks), generator=gen).to(latents.device)  # never the clean point
    frame_idx = idx.repeat_interleave(k, dim=1)  # [B, F]
    gather = frame_idx.view(b, 1, 1, f, 1, 1).expand(b, 1, *latents.shape[2:])
    x_t = torch.gather(latents, 1, gather).squeeze(1)  # [B, C, F, H, W]
    sigma = sigmas.to(device=latents.device, dtype=latents.dtype)[frame_idx]  # [B, F]
    vel = GuidedVelocity(student, embeds, frames_per_block=k)
    v = vel(x_t, sigma, attention_mode="block_causal")
    x0 = x0_from_velocity(x_t, v, sigma.view(b, 1, f, 1, 1))
    return torch.nn.functional.mse_loss(x0, latents[:, -1])


def fkl_regulariser(student, embeds: torch.Tensor, states: torch.Tensor, sigmas: torch.Tensor, num_steps: int,
                    attention_mode: str, frames_per_block: int) -> torch.Tensor:
    """Eq. 10 averaged over the first ``num_steps`` (K) student steps; ``states`` ``[B, S + 1, C, F, H, W]``."""
    vel = GuidedVelocity(student, embeds, frames_per_block=frames_per_block)
    terms = []
    for i in range(num_steps):
        x_i = states[:, i]
        v = vel(x_i, float(sigmas[i]), attention_mode=attention_mode)
        terms.append(fkl_loss(v, x_i, states[:, i + 1], float(sigmas[i]), float(sigmas[i + 1])))
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------- the two stages
class ODEInit:
    """ODE-regression init of the causal student from the ``ode_pairs`` dataset."""

    def __init__(self, cfg: HiarConfig, student: torch.nn.Module, text, rank: int = 0, world_size: int = 1):
        self.cfg, self.text, self.rank, self.world_size = cfg, text, rank, world_size
        self.student = student.train().requires_grad_(True)
        d = cfg.distill
        self.device = next(student.parameters()).device
        if d.activation_checkpointing:
            sharding.activation_checkpointing(self.student, True)
        self.fsdp = sharding.fsdp_enabled(cfg, world_size)
        self._skeleton = None
        if self.fsdp:
            self._skeleton = copy.deepcopy(student).to("meta")
            mesh = sharding.device_mesh(self.device, world_size)
            sharding.shard_model(self.student, mesh, sharding.mixed_precision_policy(cfg, self.device))
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=d.lr_ode, betas=tuple(d.betas),
                                     weight_decay=0.0)
        self.sigmas = cfg.schedule.sigmas()
        self.step = 0
        self.accum = d.accumulation_steps("ode_init", world_size)

    def train_step(self, micro_batches) -> dict:
        """One optimiser step over ``accum`` micro-batches of (prompts, latents ``[b, S + 1, C, F, H, W]``)."""
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for i, (prompts, latents) in enumerate(micro_batches):
            gen = seeded_generator(self.cfg.seed, 10, self.step, self.rank * self.accum + i)
            # the dataset's micro-batches arrive on the CPU; the text encoder may live elsewhere (on the GPU)
            embeds = self.text.encode(list(prompts)).to(self.device)
            with autocast(self.cfg, self.device):
                loss = ode_regression_loss(self.student, embeds, latents.to(self.device), self.sigmas,
                                           self.cfg.rollout.frames_per_block, gen)
            (loss / self.accum).backward()
            total += loss.item() / self.accum
        if not self.fsdp:
            average_gradients(self.student)  # FSDP reduce-scatters the gradients in backward
        grad_norm = clip_gradients(self.student, self.cfg.distill.grad_clip)
        self.opt.step()
        self.step += 1
        return {**mean_over_workers({"ode_loss": total}), "ode_grad_norm": grad_norm}

    def save_checkpoint(self, path, run: str = "") -> None:
        """A sharded checkpoint (``torch.distributed.checkpoint``; collective): see :func:`hiar.methods.sharding.save_checkpoint`.
        ``run`` names the training run that wrote it (its stage identity), kept with the counters."""
        sharding.save_checkpoint(path, {"student": self.student}, {"opt": (self.student, self.opt)},
                                 {"stage": "ode_init", "step": self.step, "world_size": self.world_size,
                                  **({"run": run} if run else {})})

    def load_checkpoint(self, path) -> None:
        """Resume from :meth:`save_checkpoint` output written with any worker count and either sharding."""
        counters = sharding.load_checkpoint(path, {"student": self.student}, {"opt": (self.student, self.opt)},
                                            stage="ode_init")
        self.step = int(counters["step"])

    def export_model(self):
        """The student as one plain module: itself unsharded; with FSDP a collective that returns a copy on
        rank 0 and None elsewhere."""
        if not self.fsdp:
            return self.student
        state = sharding.full_state_dict(self.student)
        return sharding.unsharded_copy(self._skeleton, state, self.device).eval() if self.rank == 0 else None


@dataclass
class IterationLog:
    generator_updated: bool
    metrics: dict


class Distiller:
    """Generator (causal student), critic (fake score, bidirectional) and frozen real score (with CFG).

    ``teacher`` initialises the critic; ``real_score`` is DMD's real score, its own model (paper: Wan2.1-T2V-14B
    while the teacher is the 1.3B), or the teacher itself when None. The real score only runs forward: it can
    be loaded in bf16 (``hiar.io.bundle.runtime_dtypes``)."""

    def __init__(self, cfg: HiarConfig, generator: torch.nn.Module, teacher: torch.nn.Module, text,
                 critic: torch.nn.Module | None = None, rank: int = 0, world_size: int = 1,
                 real_score: torch.nn.Module | None = None):
        d = cfg.distill
        self.cfg, self.text, self.rank, self.world_size = cfg, text, rank, world_size
        self.generator = generator.train().requires_grad_(True)
        self.critic = (critic if critic is not None else copy.deepcopy(teacher)).train().requires_grad_(True)
        self.real_score = (real_score if real_score is not None else teacher).eval().requires_grad_(False)
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False)
        self.device = next(generator.parameters()).device
        if d.activation_checkpointing:
            sharding.activation_checkpointing(self.generator, True)
            sharding.activation_checkpointing(self.critic, True)
        self.fsdp = sharding.fsdp_enabled(cfg, world_size)
        self._skeleton = None
        if self.fsdp:
            self._skeleton = copy.deepcopy(self.ema).to("meta")  # the EMA's structure, for the unsharded export
            mesh = sharding.device_mesh(self.device, world_size)
            mp = sharding.mixed_precision_policy(cfg, self.device)
            sharding.shard_model(self.generator, mesh, mp)
            sharding.shard_model(self.critic, mesh, mp)
            sharding.shard_model(self.ema, mesh)  # fp32 shards lined up with the generator's; never runs sharded
            if d.real_score_sharding == "shard":
                sharding.shard_model(self.real_score, mesh)  # frozen: its load dtype (bf16 on GPUs), no policy
        betas = tuple(d.betas)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=d.lr_generator, betas=betas, weight_decay=0.0)
        self.opt_c = torch.optim.AdamW(self.critic.parameters(), lr=d.lr_critic, betas=betas, weight_decay=0.0)
        self.sigmas = cfg.schedule.sigmas()
        self.iteration = 0  # critic updates; the generator updates every critic_ratio-th
        self.accum = d.accumulation_steps("distill", world_size)
        self.null = text.null_embedding(1).to(self.device)

    @property
    def generator_steps(self) -> int:
        return (self.iteration + self.cfg.distill.critic_ratio - 1) // self.cfg.distill.critic_ratio

    def _rollout(self, embeds: torch.Tensor, seeds: list[int], exit_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's self-rollout, as the clip-length windows the scores judge, and each window's prompt
        embedding: ``distill.score_windows`` "last" gives ``[B, C, clip, H, W]`` and ``embeds``; "all" gives every
        consecutive window, sample-major (``[B * n, ...]``, sample ``i``'s windows at rows ``i n .. i n + n - 1``)."""
        cfg, r = self.cfg, self.cfg.rollout
        # the inference window and sinks: the student trains on the contexts it will be rolled out with (a window
        # as long as the training clip, as in both presets, changes nothing; a shorter one is the tiny ablation's).
        # Not hiar.core.generation.student_velocity: that one also applies rollout.guidance_scale, an inference
        # knob (a request may set it); the generator is trained without CFG
        vel = GuidedVelocity(self.generator, embeds, frames_per_block=r.frames_per_block,
                             window_frames=r.window_frames, sink_frames=r.sink_frames)
        clip = cfg.video.train_latent_frames
        n_blocks = (cfg.distill.rollout_frames or clip) // r.frames_per_block
        shape = (cfg.video.latent_channels, r.frames_per_block, cfg.video.latent_height, cfg.video.latent_width)
        noise = initial_noise(seeds, n_blocks, shape, device=self.device)
        context = r.context_noise if cfg.distill.rollout == "hierarchical" else "clean"
        x0 = self_rollout(vel, noise, self.sigmas.to(self.device), seeds, mode=cfg.distill.rollout,
                          exit_step=exit_step, step_rule=r.step_rule, context_noise=context)
        if cfg.distill.score_windows == "last":
            return x0[:, :, -clip:], embeds  # distill.rollout_frames: the scores judge the last clip-length window
        b, c, f, h, w = x0.shape
        n = f // clip
        windows = x0.view(b, c, n, clip, h, w).transpose(1, 2).reshape(b * n, c, clip, h, w)
        return windows, embeds.repeat_interleave(n, dim=0)

    def _dmd(self, x0: torch.Tensor, embeds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x0.shape[0]
        sigma = score_sigmas(b, self.cfg, gen).to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        x_t = add_noise(x0.detach(), noise, sigma.view(-1, 1, 1, 1, 1))
        with torch.no_grad():
            real = GuidedVelocity(self.real_score, embeds, self.null.expand(b, -1, -1),
                                  guidance_scale=real_guidance_scale(self.cfg))
            fake = GuidedVelocity(self.critic, embeds)
            real_x0 = clean_estimate(real, x_t, sigma)
            fake_x0 = clean_estimate(fake, x_t, sigma)
        return dmd_generator_loss(x0, real_x0, fake_x0)

    def iteration_step(self, micro_batches) -> IterationLog:
        """One critic update (and a generator update every ``critic_ratio``-th call).

        ``micro_batches``: ``accum`` tuples of (prompts, trajectory states ``[b, S + 1, C, F, H, W]``); the
        prompts drive the self-rollout, the states the FKL term.
        """
        cfg, d = self.cfg, self.cfg.distill
        update_generator = self.iteration % d.critic_ratio == 0
        # One exit step per iteration, the same on every worker (seeded by the iteration only).
        exit_step = int(torch.randint(0, self.sigmas.numel() - 1, (1,),
                                      generator=seeded_generator(cfg.seed, 20, self.iteration)))
        metrics = {"exit_step": exit_step}
        samples = []
        if update_generator:
            self.opt_g.zero_grad(set_to_none=True)
        for i, (prompts, states) in enumerate(micro_batches):
            # seeded by the micro-batch's index in the global batch: 2 workers x 1 micro-batch and 1 worker x 2
            # micro-batches roll out the same noise, so a run resumes on another worker count with the same maths
            index = self.rank * self.accum + i
            gen = seeded_generator(cfg.seed, 21, self.iteration, index)
            seeds = [derive_seed(cfg.seed, 22, self.iteration, index, j) % (2**31) for j in range(len(prompts))]
            embeds = self.text.encode(list(prompts)).to(self.device)
            with autocast(cfg, self.device), torch.set_grad_enabled(update_generator):
                x0, judged = self._rollout(embeds, seeds, exit_step)
                if update_generator:
                    dmd = self._dmd(x0, judged, gen)
                    loss = dmd
                    if d.fkl_weight > 0 and d.fkl_steps > 0:
                        fkl = fkl_regulariser(self.generator, embeds, states.to(self.device), self.sigmas,
                                              d.fkl_steps, d.fkl_attention, cfg.rollout.frames_per_block)
                        loss = loss + d.fkl_weight * fkl
                        metrics["fkl_loss"] = metrics.get("fkl_loss", 0.0) + fkl.item() / self.accum
                    (loss / self.accum).backward()
                    metrics["dmd_loss"] = metrics.get("dmd_loss", 0.0) + dmd.item() / self.accum
            samples.append((x0.detach(), judged, gen))
        if update_generator:
            if not self.fsdp:
                average_gradients(self.generator)  # FSDP reduce-scatters the gradients in backward
            metrics["generator_grad_norm"] = clip_gradients(self.generator, d.grad_clip)
            self.opt_g.step()
            # until ema_start_step generator updates are done the EMA follows the generator (decay 0: a copy);
            # generator_steps counts the updates before this one
            started = self.generator_steps >= d.ema_start_step
            sharding.ema_update(self.ema, self.generator, d.ema_decay if started else 0.0)  # local shards or whole

        # Critic: flow matching on the generator's (detached) samples -- the fake score tracks the generator.
        self.opt_c.zero_grad(set_to_none=True)
        critic_total = 0.0
        for x0, embeds, gen in samples:
            sigma = score_sigmas(x0.shape[0], cfg, gen).to(self.device)
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            fake = GuidedVelocity(self.critic, embeds)
            with autocast(cfg, self.device):
                loss_c = flow_matching_loss(lambda x, s: fake(x, s, attention_mode="bidirectional"), x0,
                                            per_frame(sigma, x0.shape[2]), noise)
            (loss_c / self.accum).backward()
            critic_total += loss_c.item() / self.accum
        if not self.fsdp:
            average_gradients(self.critic)
        metrics["critic_grad_norm"] = clip_gradients(self.critic, d.grad_clip)
        self.opt_c.step()
        metrics["critic_loss"] = critic_total
        metrics.update(mean_over_workers({k: v for k, v in metrics.items() if k.endswith("_loss")}))
        self.iteration += 1
        return IterationLog(update_generator, metrics)

    def _checkpointed(self) -> tuple[dict, dict]:
        models = {"generator": self.generator, "critic": self.critic, "ema": self.ema}  # the real score is frozen
        return models, {"opt_g": (self.generator, self.opt_g), "opt_c": (self.critic, self.opt_c)}

    def save_checkpoint(self, path, run: str = "") -> None:
        """A sharded checkpoint (``torch.distributed.checkpoint``; collective): see :func:`hiar.methods.sharding.save_checkpoint`.
        ``run`` names the training run that wrote it (its stage identity): a run resumed from this checkpoint
        (``distill.resume_from``) is named after that run and the iteration, not after where the checkpoint lies."""
        sharding.save_checkpoint(path, *self._checkpointed(),
                                 {"stage": "distill", "iteration": self.iteration,
                                  "generator_steps": self.generator_steps, "world_size": self.world_size,
                                  **({"run": run} if run else {})})

    def load_checkpoint(self, path) -> None:
        """Resume from :meth:`save_checkpoint` output written with any worker count and either sharding."""
        counters = sharding.load_checkpoint(path, *self._checkpointed(), stage="distill")
        self.iteration = int(counters["iteration"])

    def export_model(self):
        """The EMA generator as one plain module: ``self.ema`` unsharded; with FSDP a collective (every rank must
        call it) that returns a copy on rank 0 and None elsewhere."""
        if not self.fsdp:
            return self.ema
        state = sharding.full_state_dict(self.ema)
        return sharding.unsharded_copy(self._skeleton, state, self.device).eval() if self.rank == 0 else None


__all__ = ["self_rollout", "ode_regression_loss", "fkl_regulariser", "clean_estimate", "score_sigmas",
           "real_guidance_scale", "ODEInit", "Distiller"]
