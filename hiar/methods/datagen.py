"""Teacher samples for the two datasets: ODE pairs (student init) and trajectories (the FKL term).

Both integrate the bidirectional teacher with CFG from a seeded noise and keep its states at the student's S + 1
schedule points (noise first, clean last). The teacher's grid (``num_steps`` points warped by its shift) gets the
student's points inserted, so the kept states sit *exactly* at the student's sigmas rather than at the nearest
grid index (the public code picks nearest indices of a 48-step grid). ``ode_pairs`` use ``teacher.num_steps``
(48 by default); ``trajectories`` use ``data.trajectory_steps`` (the paper's 50).

The initial noise of sample ``i`` is ``initial_noise([seed_i], ...)``: the same noise a student rollout with that
seed starts from.
"""

from __future__ import annotations


import torch

from hiar.config import HiarConfig
from hiar.io.storage import KINDS, TENSOR_COLUMN, sample_seed
from hiar.core.rollout import initial_noise
from hiar.core.schedule import teacher_sigmas
from hiar.core.teacher import sample_teacher


def merged_grid(dense: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The dense grid with ``points`` inserted (descending, unique) and the index of each point in it."""
    grid = torch.unique(torch.cat([dense, points])).flip(0)
    keep = [int((grid - p).abs().argmin()) for p in points]
    return grid, keep


def kind_steps(cfg: HiarConfig, kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return cfg.teacher.num_steps if kind == "ode_pairs" else cfg.data.trajectory_steps


#: the ``data`` key that holds each kind's sample count
COUNT_KEYS = {"ode_pairs": "num_ode_pairs", "trajectories": "num_trajectories"}


def kind_count(cfg: HiarConfig, kind: str) -> int:
    """How many samples of ``kind`` the config makes and trains on (the first that many sample indices):
    ``data.<COUNT_KEYS[kind]>``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return getattr(cfg.data, COUNT_KEYS[kind])


def generation_settings(cfg: HiarConfig, kind: str, prompts=None) -> dict:
    """Everything that determines the samples (content-addresses the dataset together with the teacher).
    ``prompts``: the config's ``hiar.io.prompts.PromptSet`` (loaded from the config when not given)."""
    if prompts is None:
        from hiar.io.prompts import prompt_set

        prompts = prompt_set(cfg)
    v = cfg.video
    return {
        "kind": kind, "seed": cfg.seed, "num_steps": kind_steps(cfg, kind), "shift": cfg.teacher.shift,
        "guidance_scale": cfg.teacher.guidance_scale, "student_sigmas": cfg.schedule.sigmas().tolist(),
        "latent_shape": [v.train_latent_frames, v.latent_channels, v.latent_height, v.latent_width],
        "frames_per_block": cfg.rollout.frames_per_block, "shard_size": cfg.data.shard_size, "dtype": cfg.data.dtype,
        # the prompt set by content (not by path): the deduplicated list and the held-out split fix the training list
        "prompts": {"sha256": prompts.sha256, "heldout_sha256": prompts.heldout_sha256},
    }


def prompt_source(cfg: HiarConfig) -> list[str]:
    """The training prompts (``hiar.io.prompts.prompt_set(cfg).train``): tiny without ``data.prompts``, the synthetic
    world's training captions; otherwise the dataset's training split (its held-out prompts never appear).
    Raises ValueError / FileNotFoundError for a missing or bad prompt dataset."""
    from hiar.io.prompts import prompt_set

    return list(prompt_set(cfg).train)


def shard_items(prompts: list[str] | tuple[str, ...], shards, plan) -> list[dict]:
    """Ray Data items: one per shard, carrying its sample indices and their prompts (sample ``i`` takes
    ``prompts[i % len(prompts)]``), so the actors never read the prompt dataset themselves."""
    out = []
    for s in shards:
        indices = list(plan.samples(int(s)))
        out.append({"shard": int(s), "indices": indices, "prompts": [prompts[i % len(prompts)] for i in indices]})
    return out


class TeacherSampler:
    """Turns sample indices into dataset rows (DESIGN.md §4) with a loaded teacher. ``prompts``: the training
    prompts that :meth:`prompt` indexes (sample ``i`` takes ``prompts[i % len(prompts)]``); may be empty when every
    :meth:`rows` call passes the prompts of its samples (the Ray Data items carry them)."""

    def __init__(self, cfg: HiarConfig, kind: str, transformer, text, prompts: list[str] | tuple[str, ...] = ()):
        self.cfg, self.kind, self.transformer, self.text, self.prompts = cfg, kind, transformer, text, prompts
        self.num_steps = kind_steps(cfg, kind)
        student = cfg.schedule.sigmas()
        self.grid, self.keep = merged_grid(teacher_sigmas(self.num_steps, cfg.teacher.shift), student)
        self.timesteps = (self.grid[self.keep] * 1000.0).tolist()

    def prompt(self, index: int) -> str:
        if not self.prompts:
            raise ValueError("TeacherSampler was built without prompts: pass the samples' prompts to rows()")
        return self.prompts[index % len(self.prompts)]

    def seed(self, index: int) -> int:
        return sample_seed(self.cfg.seed, self.kind, index)

    @torch.no_grad()
    def states(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """[B, S + 1, F, C, H, W] float32: the teacher's states at the student's schedule points."""
        v, k = self.cfg.video, self.cfg.rollout.frames_per_block
        device = next(self.transformer.parameters()).device
        noise = initial_noise(seeds, v.train_latent_frames // k, (v.latent_channels, k, v.latent_height, v.latent_width),
                              device=device)
        embeds = self.text.encode(prompts).to(device)
        null = self.text.null_embedding(len(prompts)).to(device)
        _, kept = sample_teacher(self.transformer, noise, embeds, self.grid, negative_embeds=null,
                                 guidance_scale=self.cfg.teacher.guidance_scale, keep=self.keep)
        # [S + 1] x [B, C, F, H, W] -> [B, S + 1, F, C, H, W]
        return torch.stack([kept[i] for i in self.keep], dim=1).permute(0, 1, 3, 2, 4, 5).float().cpu()

    def rows(self, indices: list[int], prompts: list[str] | None = None) -> list[dict]:
        """Rows of samples ``indices``; ``prompts[j]`` is the prompt of ``indices[j]`` (default: :meth:`prompt`)."""
        if prompts is not None and len(prompts) != len(indices):
            raise ValueError(f"rows(): {len(indices)} indices but {len(prompts)} prompts")
        out = []
        bs = max(1, self.cfg.data.batch_size)
        column = TENSOR_COLUMN[self.kind]
        for start in range(0, len(indices), bs):
            chunk = indices[start : start + bs]
            texts = list(prompts[start : start + bs]) if prompts is not None else [self.prompt(i) for i in chunk]
            seeds = [self.seed(i) for i in chunk]
            states = self.states(texts, seeds)
            for j, i in enumerate(chunk):
                row = {"sample_id": i, "prompt": texts[j], "seed": seeds[j], "timesteps": self.timesteps,
                       column: states[j].numpy()}
                if self.kind == "trajectories":
                    row["num_steps"] = self.num_steps
                out.append(row)
        return out


def load_teacher_components(cfg: HiarConfig, path: str, device: str = "cpu"):
    """(transformer, text encoder) of the data teacher at ``path`` (either layout of ``hiar.io.bundle``, local or
    ``s3://``), on ``device`` in the configured precision (float32 on the CPU)."""
    from hiar.io.bundle import load_text, load_transformer, open_model_dir, runtime_dtypes

    md = open_model_dir(path, "teacher directory (teacher.path)")
    dtypes = runtime_dtypes(cfg, device)
    return load_transformer(md, device, dtypes["transformer"]), load_text(md, device, dtypes["text_encoder"])
