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

from pathlib import Path

import torch

from hiar.config import HiarConfig
from hiar.data import KINDS, TENSOR_COLUMN, sample_seed
from hiar.rollout import initial_noise
from hiar.schedule import teacher_sigmas
from hiar.teacher import sample_teacher


def merged_grid(dense: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The dense grid with ``points`` inserted (descending, unique) and the index of each point in it."""
    grid = torch.unique(torch.cat([dense, points])).flip(0)
    keep = [int((grid - p).abs().argmin()) for p in points]
    return grid, keep


def kind_steps(cfg: HiarConfig, kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return cfg.teacher.num_steps if kind == "ode_pairs" else cfg.data.trajectory_steps


def generation_settings(cfg: HiarConfig, kind: str) -> dict:
    """Everything that determines the samples (content-addresses the dataset together with the teacher)."""
    v = cfg.video
    return {
        "kind": kind, "seed": cfg.seed, "num_steps": kind_steps(cfg, kind), "shift": cfg.teacher.shift,
        "guidance_scale": cfg.teacher.guidance_scale, "student_sigmas": cfg.schedule.sigmas().tolist(),
        "latent_shape": [v.train_latent_frames, v.latent_channels, v.latent_height, v.latent_width],
        "frames_per_block": cfg.rollout.frames_per_block, "shard_size": cfg.data.shard_size, "dtype": cfg.data.dtype,
        "prompts": cfg.data.prompts_file or "world:train",
    }


def prompt_source(cfg: HiarConfig) -> list[str]:
    """tiny: the synthetic world's training captions; otherwise one prompt per line of ``data.prompts_file``."""
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist (data.prompts_file)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts file {str(path)!r} has no prompts")
        return prompts
    from hiar.world import train_prompts

    return train_prompts()


class TeacherSampler:
    """Turns sample indices into dataset rows (DESIGN.md §4) with a loaded teacher."""

    def __init__(self, cfg: HiarConfig, kind: str, transformer, text, prompts: list[str]):
        self.cfg, self.kind, self.transformer, self.text, self.prompts = cfg, kind, transformer, text, prompts
        self.num_steps = kind_steps(cfg, kind)
        student = cfg.schedule.sigmas()
        self.grid, self.keep = merged_grid(teacher_sigmas(self.num_steps, cfg.teacher.shift), student)
        self.timesteps = (self.grid[self.keep] * 1000.0).tolist()

    def prompt(self, index: int) -> str:
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

    def rows(self, indices: list[int]) -> list[dict]:
        out = []
        bs = max(1, self.cfg.data.batch_size)
        column = TENSOR_COLUMN[self.kind]
        for start in range(0, len(indices), bs):
            chunk = indices[start : start + bs]
            prompts, seeds = [self.prompt(i) for i in chunk], [self.seed(i) for i in chunk]
            states = self.states(prompts, seeds)
            for j, i in enumerate(chunk):
                row = {"sample_id": i, "prompt": prompts[j], "seed": seeds[j], "timesteps": self.timesteps,
                       column: states[j].numpy()}
                if self.kind == "trajectories":
                    row["num_steps"] = self.num_steps
                out.append(row)
        return out


def load_teacher_components(cfg: HiarConfig, path: str):
    """(transformer, text encoder) from a teacher directory: a tiny teacher written by ``save_teacher`` or a
    diffusers Wan2.1 pipeline (``path`` is its root or its ``transformer/`` folder; text from the same root)."""
    from hiar.model import CausalWanTransformer3DModel
    from hiar.text import TextEncoder

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"teacher directory {str(root)!r} does not exist (teacher.path)")
    if (root / "transformer").is_dir():
        transformer_dir = root / "transformer"
    else:
        transformer_dir, root = root, root.parent
    transformer = CausalWanTransformer3DModel.from_pretrained(transformer_dir).eval()
    text = TextEncoder.from_pretrained(root)
    return transformer, text
