"""One typed config for the whole platform: dataclasses, YAML presets, command-line overrides.

Over 400 lines because it is the one typed config: every section's dataclass, its validation and its parsing
from YAML and overrides belong together, so a field is declared, checked and documented in one place.

A preset is a YAML file in ``hiar/presets/`` (or any path) that sets some fields; everything else keeps the
defaults below. Overrides are ``section.field=value`` strings whose values are parsed as YAML
(``rollout.window_frames=null``, ``schedule.student_timesteps=[1000,500]``). Unknown sections or fields and
values of the wrong type are errors that list the valid choices, so a typo never silently does nothing.
``HiarConfig.to_dict()`` is what gets logged to MLflow, and ``config_hash()`` content-addresses run outputs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hiar.core.rollout import CONTEXT_NOISE, ROLLOUT_MODES, STEP_RULES
from hiar.core.schedule import student_sigmas, teacher_sigmas
from hiar.identity import identity

PRESET_DIR = Path(__file__).parent / "presets"
#: How the Serve app lays out the denoising steps (``hiar.serving.app``).
SERVE_TOPOLOGIES = ("per_step", "diagonal")


def added_later(default, neutral=dataclasses.MISSING):
    """A field added after stage identities were published. ``neutral`` (the default unless given) is the value
    that keeps the behaviour from before the field existed: identities (:meth:`HiarConfig.identity_view`) leave the
    field out while it holds that value, so adding it renames no stored student or teacher (the README's
    reproduction commands name students by identity). A new field that changes what a stage trains belongs here;
    one left out of this renames every stage that hashes its section."""
    return field(default=default, metadata={"neutral": default if neutral is dataclasses.MISSING else neutral})


def run_setting(default):
    """A field that says how a job runs -- workers, devices, checkpoints, logging, where it writes -- and not what it
    trains: stage identities (:meth:`HiarConfig.identity_view`) leave it out, so a recipe keeps one name on any
    cluster shape. It may change float rounding or the order in which the data arrives (the worker count shards the
    dataset), nothing else: a field that changes the maths (a loss, a schedule, a budget) must not be one."""
    return field(default=default, metadata={"run_setting": True})


def hashed_as(default, published):
    """A field that does not determine what a stage trains yet entered identities before that was seen: identities
    (:meth:`HiarConfig.identity_view`) hash ``published`` in its place, the value every stored identity was made
    with, whatever it holds. So changing it retrains nothing (a stage planned again under another value finds its
    output under the same name) and no stored student or teacher is renamed. Leaving it out instead would rename
    every stage that hashes its section."""
    return field(default=default, metadata={"hashed_as": published})


@dataclass
class ModelConfig:
    """Constructor arguments of the Wan DiT (the names of diffusers' ``WanTransformer3DModel``)."""

    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    def kwargs(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = tuple(d["patch_size"])
        return d


@dataclass
class ScheduleConfig:
    """The student's few-step grid (see ``hiar.core.schedule``)."""

    student_timesteps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    shift: float = 5.0
    warp: bool = True  # Self-Forcing/HiAR's warp_denoising_step: eq. 1 applied to the listed times

    def sigmas(self) -> torch.Tensor:
        return student_sigmas(self.student_timesteps, self.shift, self.warp)

    @property
    def num_steps(self) -> int:
        return len(self.student_timesteps)


@dataclass
class RolloutConfig:
    frames_per_block: int = 3
    step_rule: str = "x0_renoise"  # "euler" (eq. 3) | "x0_renoise" (few-step DMD generator rule)
    context_noise: str = "next"  # t_c: "next" = t_{j+1} (HiAR) | "current" = t_j | "clean" = 0
    fused: bool = True  # fuse the context write of block n with the denoising of block n + 1
    # sliding attention window in latent frames (paper: 5 s), None = unlimited; the distiller's self-rollout uses it
    # too, so a window shorter than video.train_latent_frames also shapes training (README: the attention window)
    window_frames: int | None = 21
    sink_frames: int = 0
    guidance_scale: float = 1.0  # the distilled student runs without CFG


@dataclass
class VideoConfig:
    """Latent geometry. ``latent_*`` are what the DiT sees; ``fps`` is of decoded frames."""

    latent_channels: int = 16
    latent_height: int = 60
    latent_width: int = 104
    train_latent_frames: int = 21  # 5 s at 16 fps after the VAE's 4x temporal compression
    # evaluate at 4x the training horizon (paper: 20 s). Read by evaluations only (their identity has the horizon as
    # latent frames): another factor evaluates the same students, it trains none again
    eval_horizon_factor: int = hashed_as(4, published=4)
    fps: int = 16


@dataclass
class TeacherConfig:
    path: str = ""  # data teacher and critic init: a Wan2.1 diffusers repository (or its transformer/), or a bundle;
    # local or s3:// (hiar.io.bundle.open_model_dir)
    real_score_path: str = ""  # DMD real score (paper: Wan2.1-T2V-14B), its own model; empty = the teacher itself
    num_steps: int = 48  # Euler steps for ODE pairs (public code: 48)
    shift: float = 8.0
    guidance_scale: float = 6.0

    def sigmas(self) -> torch.Tensor:
        return teacher_sigmas(self.num_steps, self.shift)


@dataclass
class PrecisionConfig:
    """dtypes of each part on a GPU ("fp32" | "bf16" | "fp16"); on the CPU everything runs in fp32. Used wherever
    a model is loaded for inference (data generation, evaluation, serving, the frozen real score, the text encoder
    and VAE in training); trained weights stay fp32 (``distill.mixed_precision`` is their autocast)."""

    transformer: str = "bf16"
    text_encoder: str = "bf16"
    vae: str = "fp32"  # Wan's VAE decodes visibly better in fp32; bf16 halves its memory


@dataclass
class DataConfig:
    num_ode_pairs: int = 16000
    num_trajectories: int = 20000
    trajectory_steps: int = 50  # paper: 50 ODE steps (public code: 48)
    shard_size: int = 64
    storage: str = ""  # local directory or s3://bucket/prefix; empty = <run_dir>/data
    dtype: str = "float16"  # stored tensor precision ("float16" | "float32")
    batch_size: int = 4  # samples per teacher call inside a shard
    # prompt dataset (hiar.io.prompts): a .txt/.jsonl/.parquet file or a directory/prefix of them, local or s3://;
    # required for every non-tiny preset (tiny without it: the synthetic world's captions)
    prompts: str = ""
    heldout_prompts: int = 64  # distinct prompts held out for evaluation, never trained on (hiar.io.prompts rule)
    actors: int = 2  # teacher actors in the Ray Data pool
    cpus_per_actor: float = 0.5  # fractional, so the pool never takes every CPU (DESIGN §8)
    gpus_per_actor: float = 0.0
    threads_per_actor: int = 1


@dataclass
class DistillConfig:
    rollout: str = "hierarchical"  # "hierarchical" (HiAR) | "block_first" (Self-Forcing baseline)
    fkl_weight: float = 0.1  # lambda, eq. 11
    fkl_steps: int = 1  # K: FKL only on the first K of S steps
    fkl_attention: str = "bidirectional"  # paper default; "block_causal" is what the public code does
    critic_ratio: int = 5  # critic updates per generator update
    lr_generator: float = 2e-6
    lr_critic: float = 3e-7
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    batch_size: int = 64
    ema_decay: float = 0.99
    # generator steps before the EMA starts averaging (until then it is a copy of the generator): Self-Forcing's
    # ema_start_step. An EMA that averaged from step 1 would keep 0.99^60 = 55% of the ODE init after 60 steps
    ema_start_step: int = added_later(200, neutral=0)  # 0, the behaviour before it: average from step 1
    steps: int = 20000  # generator steps (critic steps = critic_ratio x this)
    grad_clip: float = 10.0
    micro_batch_size: int = 1  # per worker per forward; batch_size = micro x workers x accumulation steps
    min_t: float = 0.02  # DMD / critic noise levels: uniform t in [min_t, max_t], then the schedule's shift
    max_t: float = 0.98
    # the shift (eq. 1) that maps those t to DMD / critic noise levels; None = schedule.shift (Self-Forcing's
    # timestep_shift). A smaller shift scores more of the low-noise levels, where fine detail is decided
    score_shift: float | None = added_later(None)
    # CFG scale of the real score in the DMD loss; None = teacher.guidance_scale (the scale the teacher's data was
    # sampled with). Self-Forcing's DMD config sets its own (3.0) apart from the data's: the student runs without
    # CFG, so this scale is the only place where it learns how strongly to follow its prompt
    real_guidance_scale: float | None = added_later(None)
    # latent frames the generator rolls itself out for in training; DMD and the critic judge the last
    # video.train_latent_frames of them (the clip the teacher knows). None = the training clip. Longer: the student
    # also trains on the frame positions and contexts that a rollout past the clip reaches (tiny: its 4x horizon)
    rollout_frames: int | None = added_later(None)
    # which clip-length windows of that rollout DMD and the critic judge: "last" (the window that ends it) or "all"
    # (every consecutive window, batched: rollout_frames must then be a whole number of clips). "all" keeps the
    # first clip, the one a video starts with, judged as well; each later window starts mid-video, where a teacher
    # trained only on scene starts is off its data (pretrain.late_start_share)
    score_windows: str = added_later("last")
    mixed_precision: str = "auto"  # "auto" = bf16 autocast on GPUs that support it, fp32 on CPU | "bf16" | "no"
    # ODE-regression init (--stage ode_init)
    ode_steps: int = 3000
    lr_ode: float = 2e-6
    ode_batch_size: int = 64
    # per worker per forward in ODE init; None = micro_batch_size. A stage of its own: an ODE-init sample is one
    # forward and backward of one model, a distillation sample a rollout of the generator and passes of three, so
    # the two run fastest at different micro batches (tiny: 4 and 2)
    ode_micro_batch_size: int | None = added_later(None)
    # Ray Train
    num_workers: int = run_setting(1)
    use_gpu: bool = run_setting(False)
    # fractional: a worker that reserves every CPU deadlocks Ray Data (DESIGN §8)
    cpus_per_worker: float = run_setting(0.5)
    # "ddp": every worker holds whole models, gradients all-reduced | "fsdp": FSDP2 (hiar.methods.sharding) shards the
    # generator, critic, EMA and (real_score_sharding) the real score per transformer block over the workers (gloo
    # on CPU, NCCL on GPUs). fsdp with one worker warns and runs unsharded (the same as ddp with one worker).
    sharding: str = "ddp"
    # fsdp only: "shard" the frozen real score too | "replicate" it per worker
    real_score_sharding: str = run_setting("shard")
    # recompute each transformer block in backward (trained models): the same gradients, less memory
    activation_checkpointing: bool = run_setting(False)
    storage_path: str = run_setting("")  # Ray Train checkpoints: local dir or s3://; empty = <run_dir>/train
    # a distillation checkpoint (a Ray Train checkpoint directory, local or s3://), or a distillation run's directory
    # (<run_dir>/train/distill-<identity>: its latest checkpoint), to start from when this run has none of its own:
    # move a run to another cluster, worker count or sharding, or train it longer; its model shapes must match
    resume_from: str = run_setting("")
    # a worker keeps its dataset shard in memory after the first pass when it fits in this many MB (the tiny
    # datasets always do), so later epochs do not execute the Ray dataset again; 0 = stream every epoch
    dataset_cache_mb: int = run_setting(2048)
    checkpoint_every: int = run_setting(20)  # generator steps between distillation checkpoints
    # ODE-init steps between its checkpoints: an ODE-init step costs about a tenth of a generator step, and a
    # checkpoint on tiny about one to four seconds, so every 10 steps spent a quarter of the stage writing them
    ode_checkpoint_every: int = run_setting(100)
    keep_checkpoints: int = run_setting(2)
    max_failures: int = run_setting(3)
    sample_every: int = run_setting(50)  # generator steps between sample MP4s in MLflow (0 = only at the end)
    sample_prompts: int = run_setting(2)

    def micro_batch(self, stage: str) -> int:
        """Samples per worker per forward in ``stage`` ("ode_init" or "distill")."""
        if stage == "ode_init" and self.ode_micro_batch_size is not None:
            return self.ode_micro_batch_size
        return self.micro_batch_size

    def global_batch(self, stage: str) -> int:
        return self.ode_batch_size if stage == "ode_init" else self.batch_size

    def accumulation_steps(self, stage: str, world_size: int) -> int:
        """Micro-batches per worker per optimiser step of ``stage`` over ``world_size`` workers; a batch they do not
        divide is refused by the keys that set it (``hiar.jobs.train.plan_stage`` asks before any worker starts)."""
        total, micro = self.global_batch(stage), self.micro_batch(stage)
        if total % (micro * world_size):
            batch = "ode_batch_size" if stage == "ode_init" else "batch_size"
            own_micro = stage == "ode_init" and self.ode_micro_batch_size
            micro_key = "ode_micro_batch_size" if own_micro else "micro_batch_size"
            raise ValueError(f"distill.{batch} ({total}) must be a multiple of distill.{micro_key} x "
                             f"distill.num_workers ({micro} x {world_size}) for {stage}")
        return total // (micro * world_size)


@dataclass
class WorldConfig:
    """The tiny preset's synthetic world (``hiar.tiny.world``)."""

    frame_size: int = 32
    seed: int = 0
    start_jitter: int | None = None  # None: shapes start anywhere; k: within k px of the centre (hiar.tiny.world)
    # share of the teacher's training clips whose caption says "moves" but whose shape stands still: a world where
    # a static video is a cheap mode of every caption (the low-motion shortcut the paper's FKL counters)
    static_share: float = 0.0
    frames_per_latent: int = 1  # video frames packed into one latent frame by the pixel codec (hiar.io.codec)
    history_frames: int = 0  # earlier video frames the pixel codec adds to each latent frame (hiar.io.codec)
    text_max_length: int = 16


@dataclass
class PretrainConfig:
    """Flow-matching pretraining of the tiny teacher (the ``tiny`` preset only; Wan teachers are loaded)."""

    max_steps: int = 100_000
    max_minutes: float = 30.0  # wall-clock budget; training stops at whichever limit comes first
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    caption_dropout: float = 0.1  # empty prompt instead of the caption, so CFG has an unconditional branch
    sigma_sampling: str = "uniform"  # training noise levels: "uniform" | "logit_normal" (hiar.methods.losses)
    sigma_shift: float = 1.0  # eq. 1 shift applied to the sampled times
    grad_clip: float = 1.0
    checkpoint_every: int = run_setting(100)
    eval_every_minutes: float = run_setting(5.0)
    eval_prompts: int = run_setting(16)
    # Euler steps of the job's held-out evaluations (the card's sampler). Its own key: teacher.num_steps is the ODE
    # pairs' sampler, which the tiny preset cut to 24, and a teacher's card is compared at 48 (its recorded score)
    eval_num_steps: int = run_setting(48)
    num_workers: int = 1  # batch_size is per worker: the workers change the global batch, hence the weights
    threads_per_worker: int = run_setting(0)  # 0 = cores / workers
    # start from another teacher instead of random weights: a teacher bundle directory, or a trainer state file
    # (state.pt of a pretrain checkpoint); a model with fewer latent channels is widened (hiar.methods.pretrain.widen_channels)
    init_from: str = ""
    # a share of the training clips are later windows of their scene, starting at a frame drawn uniformly from
    # (0, late_start_frames] (a multiple of world.frames_per_latent), their first latent frame holding its true
    # history. Why: the real score of a long distillation rollout (distill.rollout_frames) judges a window that
    # does not start the video; a teacher that only saw scene starts denoises such a window worse at high noise
    # (README "Quality on the tiny preset"). 0 = every clip starts its scene (the shipped teacher).
    late_start_share: float = added_later(0.0)
    late_start_frames: int = added_later(0)


@dataclass
class EvalConfig:
    """Long-rollout evaluation (``hiar/jobs/evaluate.py``): the paper's drift suite on held-out prompts."""

    num_prompts: int = 8  # evenly spread over the held-out prompts (tiny) or the first N held-out of data.prompts
    seeds: list[int] = field(default_factory=lambda: [0])
    rollouts: list[str] = field(default_factory=lambda: list(ROLLOUT_MODES))
    segments: int = 5  # drift suite: equal temporal segments (paper: 5)
    actors: int = 1
    cpus_per_actor: float = 0.5  # fractional: an actor taking a whole CPU starves Ray Data on a small box (DESIGN §8)
    gpus_per_actor: float = 0.0
    threads_per_actor: int = 1  # torch intra-op threads per actor
    batch_size: int = 2  # (prompt, seed) items per actor call, generated as one batch
    sample_videos: int = 4  # the first N items' videos are tiled into one MP4 per rollout mode
    scorer_weights: str = ""  # learned drift scorers' weights dir (empty = $HIAR_SCORER_WEIGHTS; none = pixel metrics)


@dataclass
class RegistryConfig:
    """MLflow registry and the promotion gate (``hiar/jobs/promote.py``)."""

    model_name: str = "hiar-student"
    # the gate's tolerated degradations (hiar.eval.gate), in each metric's units: a check fails when the mean paired
    # (prompt, seed) difference is worse than this
    max_drift_increase: float = 0.0  # Drift Score
    max_dynamics_drop: float = 0.05  # dynamic degree
    max_quality_drop: float = 0.0  # oracle caption consistency (tiny)
    max_alignment_drop: float = 0.0  # CLIP text-video alignment
    max_degradation_increase: float = 0.0  # one learned drift scorer's degradation (dinov2, lpips, ...)
    # an improvement counts only when the mean paired difference exceeds this many of its standard errors (> 0)
    gate_margin_se: float = 3.0
    # promote only when some gated check improved beyond noise; false: "not worse" suffices (never the default)
    gate_require_improvement: bool = True
    gate_rollout: str = "hierarchical"  # the rollout mode whose evaluation metrics the gate compares
    # the checks that gate this preset (hiar.eval.gate.GATE_CHECKS: drift, dynamics, quality, alignment, dinov2, lpips,
    # clip_iqa, musiq); drift and dynamics always; a check whose scorer was skipped (no weights) is reported, not gated
    gate_metrics: list[str] = field(default_factory=lambda: ["drift", "dynamics", "alignment"])


@dataclass
class ServeConfig:
    """The Ray Serve app (``hiar.serving``): limits, placement and where the model comes from."""

    model_uri: str = "models:/hiar-student@champion"  # or models:/name/<version>, or a local bundle directory
    host: str = "127.0.0.1"
    port: int = 8000
    max_blocks: int = 64  # longest stream a request may ask for
    max_concurrent_streams: int = 8  # beyond this: HTTP 429
    stage_replicas: int = 1
    stage_num_cpus: float = 0.0  # fractional on a small box (DESIGN §8: whole CPUs deadlock on 2 cores)
    stage_num_gpus: float = 0.0
    max_buffered_blocks: int = 2  # back-pressure between stages
    decoder_replicas: int = 1  # per_step only: in diagonal the Diagonal replica decodes its own streams
    decoder_num_gpus: float = 0.0  # per_step only
    ingress_num_gpus: float = 0.0  # the ingress encodes prompts: UMT5-XXL (bf16 on a GPU, precision.text_encoder)
    stage_torch_threads: int = 1  # intra-op threads per replica (CPU): one stage per core, not all on one
    max_prompt_chars: int = 2000  # checked before tokenising; the token limit is the text encoder's max_length
    max_request_bytes: int = 16384  # larger bodies: HTTP 413
    health_check_period_s: float = 2.0  # how soon Serve notices (and replaces) a dead replica
    stall_timeout_s: float = 120.0  # a stage waiting this long for its consumer gives the stream up
    # per_step: one deployment per denoising step (a device each); diagonal: one deployment holds all S step caches
    # of a stream, runs each anti-diagonal as one packed forward and decodes the blocks (the one-device way)
    topology: str = "per_step"
    # blocks of concurrent streams waiting at the same stage, denoised in one forward (1: unbatched, bit-identical
    # to the offline rollout; > 1: equal to it within float round-off, 1e-4 on tiny). The shipped serve configs
    # turn it on; the default keeps the reference behaviour
    max_batch: int = 1
    batch_wait_ms: float = 0.0  # how long a waiting block may wait for others to join its batch


def with_default_sections(cls):
    """Give each field of ``cls`` that is annotated with a config dataclass and has no default a fresh default
    instance of that class (``field(default_factory=...)``), so a section is declared once, by its type. Applied
    under ``@dataclass``."""
    hints = typing.get_type_hints(cls)
    for name in cls.__annotations__:
        if dataclasses.is_dataclass(hints[name]) and name not in vars(cls):
            setattr(cls, name, field(default_factory=hints[name]))
    return cls


@dataclass
@with_default_sections
class HiarConfig:
    preset: str = "custom"
    seed: int = 0
    run_dir: str = "runs"
    model: ModelConfig
    schedule: ScheduleConfig
    rollout: RolloutConfig
    video: VideoConfig
    teacher: TeacherConfig
    precision: PrecisionConfig
    data: DataConfig
    distill: DistillConfig
    world: WorldConfig
    pretrain: PretrainConfig
    eval: EvalConfig
    registry: RegistryConfig
    serve: ServeConfig

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity_view(self, *sections: str) -> dict:
        """The named sections (every one when none is named) as identities hash them: all fields but those declared
        :func:`added_later` that still hold their neutral value and the :func:`run_setting` ones, and the
        :func:`hashed_as` ones at their published value."""
        out = {}
        for name in sections or [f.name for f in dataclasses.fields(self)]:
            value = getattr(self, name)
            if not dataclasses.is_dataclass(value):
                out[name] = value
                continue
            values = dataclasses.asdict(value)
            out[name] = {f.name: f.metadata.get("hashed_as", values[f.name]) for f in dataclasses.fields(value)
                         if not f.metadata.get("run_setting")
                         and not ("neutral" in f.metadata and values[f.name] == f.metadata["neutral"])}
        return out

    def config_hash(self, *sections: str) -> str:
        """The identity (``hiar.identity.identity``) of the whole config, or of the named sections only."""
        d = self.to_dict()
        return identity({s: d[s] for s in sections} if sections else d)


def validate(cfg: HiarConfig) -> None:
    def choice(name, value, options):
        if value not in options:
            raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")

    r = cfg.rollout
    choice("rollout.step_rule", r.step_rule, STEP_RULES)
    choice("rollout.context_noise", r.context_noise, CONTEXT_NOISE)
    choice("distill.rollout", cfg.distill.rollout, ROLLOUT_MODES)
    choice("distill.fkl_attention", cfg.distill.fkl_attention, ("bidirectional", "block_causal"))
    choice("distill.mixed_precision", cfg.distill.mixed_precision, ("auto", "bf16", "no"))
    choice("distill.sharding", cfg.distill.sharding, ("ddp", "fsdp"))
    choice("distill.real_score_sharding", cfg.distill.real_score_sharding, ("shard", "replicate"))
    for part in ("transformer", "text_encoder", "vae"):
        choice(f"precision.{part}", getattr(cfg.precision, part), ("fp32", "bf16", "fp16"))
    for key in ("checkpoint_every", "ode_checkpoint_every"):
        if getattr(cfg.distill, key) < 1:
            raise ValueError(f"distill.{key} must be >= 1 (steps between checkpoints), got {getattr(cfg.distill, key)}")
    if cfg.distill.dataset_cache_mb < 0:
        raise ValueError(f"distill.dataset_cache_mb must be >= 0 (0 = no cache), got {cfg.distill.dataset_cache_mb}")
    # eq. 1 warps sigmas monotonically only for s > 0 (0 sends every sigma to 0); only score_shift may be null
    for key, value, null in (("schedule.shift", cfg.schedule.shift, ""), ("teacher.shift", cfg.teacher.shift, ""),
                             ("pretrain.sigma_shift", cfg.pretrain.sigma_shift, ""),
                             ("distill.score_shift", cfg.distill.score_shift, " (or null: schedule.shift)")):
        if not (value is None and null) and not value > 0:
            raise ValueError(f"{key} must be > 0{null}, got {value}")
    if cfg.distill.real_guidance_scale is not None and not 0 < cfg.distill.real_guidance_scale <= 50:
        raise ValueError(f"distill.real_guidance_scale must be in (0, 50] (or null: teacher.guidance_scale), "
                         f"got {cfg.distill.real_guidance_scale}")
    rf, clip, k = cfg.distill.rollout_frames, cfg.video.train_latent_frames, cfg.rollout.frames_per_block
    if rf is not None and (rf < clip or rf % k):
        raise ValueError(f"distill.rollout_frames must be a multiple of rollout.frames_per_block ({k}) and at least "
                         f"video.train_latent_frames ({clip}), or null; got {rf}")
    choice("distill.score_windows", cfg.distill.score_windows, ("last", "all"))
    if cfg.distill.score_windows == "all" and (rf or clip) % clip:
        raise ValueError(f"distill.score_windows=all needs distill.rollout_frames to be a whole number of training "
                         f"clips (video.train_latent_frames = {clip}); got {rf}")
    if not 0.0 <= cfg.distill.min_t < cfg.distill.max_t <= 1.0:
        raise ValueError(f"need 0 <= distill.min_t < distill.max_t <= 1, got {cfg.distill.min_t}, {cfg.distill.max_t}")
    choice("data.dtype", cfg.data.dtype, ("float16", "float32"))
    from hiar.eval.gate import MARGIN_FIELDS, validate_checks, validate_margin_se

    try:
        validate_checks(cfg.registry.gate_metrics)
    except ValueError as err:
        raise ValueError(f"registry.gate_metrics: {err}") from None
    try:
        validate_margin_se(cfg.registry.gate_margin_se)
    except ValueError as err:
        raise ValueError(f"registry.{err}") from None
    for name in MARGIN_FIELDS:
        value = getattr(cfg.registry, name)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"registry.{name} must be a finite number, got {value!r}")
    choice("serve.topology", cfg.serve.topology, SERVE_TOPOLOGIES)
    if cfg.serve.max_batch < 1:
        raise ValueError(f"serve.max_batch must be >= 1 (1: no cross-stream batching), got {cfg.serve.max_batch}")
    if not 0.0 <= cfg.serve.batch_wait_ms < float("inf"):
        raise ValueError(f"serve.batch_wait_ms must be a finite number >= 0, got {cfg.serve.batch_wait_ms!r}")
    if cfg.data.heldout_prompts < 1:
        raise ValueError(f"data.heldout_prompts must be >= 1, got {cfg.data.heldout_prompts}")
    p = cfg.pretrain
    if p.eval_num_steps < 1:
        raise ValueError(f"pretrain.eval_num_steps must be >= 1 (Euler steps), got {p.eval_num_steps}")
    if not 0.0 <= p.late_start_share <= 1.0:
        raise ValueError(f"pretrain.late_start_share must be in [0, 1], got {p.late_start_share!r}")
    if p.late_start_share > 0:
        from hiar.io.codec import PixelCodec

        k, h = cfg.world.frames_per_latent, cfg.world.history_frames
        # the earliest late start whose history lies inside the scene
        first = max(k, PixelCodec(frames_per_latent=k, history_frames=h).history_lead)
        if p.late_start_frames < first or p.late_start_frames % k:
            raise ValueError(f"pretrain.late_start_share > 0 needs pretrain.late_start_frames, a multiple of "
                             f"world.frames_per_latent ({k}) and at least {first} (world.history_frames={h}); "
                             f"got {p.late_start_frames}")
    if not 0.0 <= cfg.world.static_share < 1.0:
        raise ValueError(f"world.static_share must be in [0, 1), got {cfg.world.static_share!r}")
    for mode in cfg.eval.rollouts:
        choice("eval.rollouts[]", mode, ROLLOUT_MODES)
    if r.frames_per_block < 1:
        raise ValueError(f"rollout.frames_per_block must be >= 1, got {r.frames_per_block}")
    if r.window_frames is not None and r.window_frames < r.frames_per_block:
        raise ValueError(f"rollout.window_frames ({r.window_frames}) must be >= frames_per_block ({r.frames_per_block})")
    if cfg.video.train_latent_frames % r.frames_per_block:
        raise ValueError(
            f"video.train_latent_frames ({cfg.video.train_latent_frames}) must be divisible by "
            f"rollout.frames_per_block ({r.frames_per_block})"
        )
    if cfg.video.latent_channels != cfg.model.in_channels:
        raise ValueError(
            f"video.latent_channels ({cfg.video.latent_channels}) must equal model.in_channels ({cfg.model.in_channels})"
        )
    if not 0.0 <= cfg.distill.ema_decay < 1.0:
        raise ValueError(f"distill.ema_decay must be in [0, 1), got {cfg.distill.ema_decay!r}")
    if cfg.distill.ema_start_step < 0:
        raise ValueError(f"distill.ema_start_step must be >= 0, got {cfg.distill.ema_start_step}")
    for key in ("batch_size", "micro_batch_size", "ode_batch_size", "ode_micro_batch_size"):
        value = getattr(cfg.distill, key)
        if value is not None and value < 1:  # that each batch divides over the workers: hiar.jobs.train.plan_stage
            raise ValueError(f"distill.{key} must be >= 1, got {value}")
    if not 0 <= cfg.distill.fkl_steps <= cfg.schedule.num_steps:
        raise ValueError(f"distill.fkl_steps must be in [0, {cfg.schedule.num_steps}], got {cfg.distill.fkl_steps}")
    cfg.schedule.sigmas()  # raises on a malformed schedule


# ---------------------------------------------------------------------- building from dicts
def _check_type(path: str, value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return value
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string; a float field means a number
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ValueError(f"{path} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    return value


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "the top level"
        raise ValueError(f"unknown field(s) {unknown} in {where}; valid fields: {names}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        sub = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, sub)
        else:
            kwargs[name] = _check_type(sub, value, hint)
    return cls(**kwargs)


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str = "tiny", overrides: typing.Iterable[str] = ()) -> HiarConfig:
    """A preset name (``tiny``, ``wan2.1-1.3b``) or a YAML path, then ``section.field=value`` overrides."""
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {preset!r}; valid presets: {available_presets()} (or a path to a YAML file)")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("preset", path.stem)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return _build(HiarConfig, data, "")


def add_config_args(parser) -> None:
    """``--preset NAME`` and repeatable ``--set section.field=value`` for every entrypoint."""
    parser.add_argument("--preset", default="tiny", help=f"one of {available_presets()} or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set rollout.window_frames=12 (repeatable)")


def config_from_args(args, parser=None) -> HiarConfig:
    """Build the config; with ``parser``, a bad preset or override exits with a usage error (exit code 2)."""
    try:
        return load_config(args.preset, args.overrides)
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))
