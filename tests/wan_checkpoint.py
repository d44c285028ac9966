"""Miniature Wan2.1 T2V checkpoints, in the exact layout of the public ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` repository.

Why: the ``wan2.1-1.3b`` path (teacher loading, data generation, distillation, evaluation, serving) must be tested
end to end on a CPU without downloading 30 GB. These directories hold the *real* classes -- diffusers'
``WanTransformer3DModel`` and ``AutoencoderKLWan``, transformers' ``UMT5EncoderModel`` and ``T5TokenizerFast`` --
saved by ``WanPipeline.save_pretrained`` itself, with tiny random (seeded) weights::

    model_index.json  scheduler/  text_encoder/  tokenizer/  transformer/  vae/

The tokenizer is a SentencePiece-style Unigram over whole words (``"▁red"``), built offline: in transformers 5
``T5TokenizerFast`` *is* ``T5Tokenizer``, which always rebuilds a Unigram backend from ``tokenizer.json``, so the
WordLevel tokenizer of ``hiar.io.text.build_word_tokenizer`` cannot be loaded under that class name.

A second checkpoint can share the first one's ``tokenizer/``, ``text_encoder/`` and ``vae/`` byte for byte
(``share_from``), like the public 14B repository ships the same UMT5 and VAE as the 1.3B.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

#: Plain English words; every prompt of :data:`PROMPTS` is made of them only.
PROMPT_WORDS = [
    "a", "the", "at", "in", "on", "along", "across", "over", "through", "under",
    "red", "blue", "green", "white", "black", "small", "old", "quiet", "busy", "dark",
    "car", "dog", "cat", "bird", "boat", "horse", "man", "woman", "child", "train",
    "road", "river", "field", "forest", "beach", "city", "sky", "lake", "snow", "night",
    "sunset", "drives", "runs", "walks", "flies", "sails", "swims", "slowly",
]

#: Distinct short prompts (data generation, evaluation and serving tests draw from these).
PROMPTS = [
    "a red car drives along a quiet road at night",
    "a black dog runs across a green field",
    "a white bird flies over the river at sunset",
    "a small boat sails slowly along the river",
    "the old man walks through the forest",
    "a blue train runs through the city at night",
    "a child runs along the beach at sunset",
    "a cat walks slowly on the old road",
    "a horse runs across the field in the snow",
    "a woman walks along the busy road",
    "a dog swims in the quiet lake",
    "a black bird flies over the dark forest",
    "a white boat sails across the lake at sunset",
    "a green car drives through the snow",
    "a small child walks in the busy city",
    "a red bird flies through the blue sky",
    "a man swims in the river at night",
    "a white horse walks slowly along the beach",
    "a blue car drives over the old river",
    "a small cat runs under the car",
    "a train drives slowly across the field at sunset",
    "a woman runs through the dark city",
    "a black boat sails on the quiet river",
    "a dog walks along the road in the snow",
]

#: The CPU-sized video geometry of the end-to-end tests: 64x64 pixels = 8x8 latents (the VAE is x8 spatial),
#: 6 latent frames in blocks of 3 = 21 video frames (x4 temporal, the first frame alone: 1 + 4 * 5).
GEOMETRY = {
    "height": 64,
    "width": 64,
    "latent_height": 8,
    "latent_width": 8,
    "latent_channels": 16,
    "train_latent_frames": 6,
    "frames_per_block": 3,
    "num_frames": 21,
    "eval_horizon_factor": 2,
    "fps": 8,
}

SHARED_PARTS = ("tokenizer", "text_encoder", "vae")

#: The keys of the public repository's model_index.json. diffusers 0.42's ``WanPipeline.save_pretrained`` also
#: writes ``transformer_2``, ``boundary_ratio`` and ``expand_timesteps`` (Wan2.2), which the 2.1 repositories lack.
PUBLIC_INDEX_KEYS = ("_class_name", "_diffusers_version", "scheduler", "text_encoder", "tokenizer", "transformer",
                     "vae")

#: The transformer ``config.json`` fields that ``model.*`` of the config mirrors.
MODEL_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "rope_max_seq_len")


def _jitter(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """diffusers initialises some weights to exact zeros (e.g. the output projection); jitter all of them so
    every path matters in a comparison (same rule as ``perturbed`` in tests/conftest.py)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def build_tokenizer(words: list[str]):
    """A T5-style tokenizer over whole words: ``<pad>`` 0, ``</s>`` 1 (appended), ``<unk>`` 2, ``▁`` and ``▁word``."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.strip().lower() for w in words)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _transformer(seed: int, **kw):
    from diffusers import WanTransformer3DModel

    kw = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=32, cross_attn_norm=True, eps=1e-6,
              rope_max_seq_len=64, **kw)
    torch.manual_seed(seed)
    return _jitter(WanTransformer3DModel(**kw), seed)


def _scheduler():
    """What the public repository ships: UniPC on flow sigmas, shift 3."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)


def _write_public_index(root: Path) -> None:
    """Rewrite what ``save_pretrained`` wrote into the public form: its keys only, and the tokenizer named
    ``T5TokenizerFast`` (transformers 5 aliases it to ``T5Tokenizer``, so diffusers records that name)."""
    path = root / "model_index.json"
    index = json.loads(path.read_text())
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    path.write_text(json.dumps({k: index[k] for k in PUBLIC_INDEX_KEYS}, indent=2) + "\n")


def build_wan_checkpoint(root: Path, *, seed: int = 0, num_layers: int = 2, num_attention_heads: int = 2,
                         attention_head_dim: int = 16, text_dim: int = 32, ffn_dim: int = 64,
                         words: list[str] | None = None, share_from: Path | None = None) -> Path:
    """Write a miniature Wan2.1 T2V repository at ``root`` (all parts float32, seeded) and return ``root``.

    Without ``share_from`` the text encoder (UMT5, ``d_model = text_dim``) and the VAE (``z_dim`` 16, x4 temporal,
    x8 spatial) are new; with it, ``tokenizer/``, ``text_encoder/`` and ``vae/`` are byte-for-byte copies of that
    checkpoint's (``words`` is then ignored), whatever the transformer's ``text_dim``.
    """
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    root = Path(root)
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG state is left alone
        transformer = _transformer(seed, num_layers=num_layers, num_attention_heads=num_attention_heads,
                                   attention_head_dim=attention_head_dim, text_dim=text_dim, ffn_dim=ffn_dim)
        if share_from is None:
            tokenizer = build_tokenizer(PROMPT_WORDS if words is None else words)
            torch.manual_seed(seed + 1000)
            text_encoder = _jitter(UMT5EncoderModel(UMT5Config(
                vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=text_dim // 8,
                dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)), seed + 1000).float()
            torch.manual_seed(seed + 2000)
            vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    if share_from is not None:
        share_from = Path(share_from)
        tokenizer = AutoTokenizer.from_pretrained(share_from / "tokenizer", local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(share_from / "text_encoder", local_files_only=True)
        vae = AutoencoderKLWan.from_pretrained(share_from / "vae", local_files_only=True)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=_scheduler())
    pipe.save_pretrained(root)
    _write_public_index(root)
    if share_from is not None:  # the very same files, not a re-serialisation of the loaded weights
        for part in SHARED_PARTS:
            shutil.rmtree(root / part)
            shutil.copytree(share_from / part, root / part)
    return root


def build_real_score_standin(root: Path, share_from: Path, *, seed: int = 1) -> Path:
    """A stand-in for Wan2.1-T2V-14B: a bigger, differently shaped transformer (3 layers, 4 heads of 8) that still
    fits the 1.3B's text encoder (text_dim 32) and VAE (16 channels), which it shares byte for byte."""
    return build_wan_checkpoint(root, seed=seed, num_layers=3, num_attention_heads=4, attention_head_dim=8,
                                ffn_dim=96, share_from=share_from)


def build_incompatible_real_score(root: Path, share_from: Path, *, seed: int = 2) -> Path:
    """A real score that does not fit: its transformer wants 48-wide text embeddings, the shared UMT5 makes 32."""
    return build_wan_checkpoint(root, seed=seed, num_layers=3, num_attention_heads=4, attention_head_dim=8,
                                text_dim=48, ffn_dim=96, share_from=share_from)


def write_prompts(path: Path, prompts: list[str] = PROMPTS, fmt: str = "txt") -> Path:
    """A prompt dataset file: one prompt a line (``txt``), or a ``prompt`` column (``jsonl``, ``parquet``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        path.write_text("".join(p + "\n" for p in prompts))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": list(prompts)}), path)
    else:
        raise ValueError(f"fmt must be 'txt', 'jsonl' or 'parquet', got {fmt!r}")
    return path


def cpu_overrides(ckpt: Path, real_score: Path | None = None, prompts: Path | str | None = None) -> list[str]:
    """``section.field=value`` overrides that make the ``wan2.1-1.3b`` preset CPU-sized for the checkpoint at
    ``ckpt``: ``model.*`` read from its transformer, the :data:`GEOMETRY`, and a few steps of everything.

    ``teacher.real_score_path`` is ``real_score`` or empty (= the teacher itself): the preset's default points at
    a 14B directory that does not exist here.
    """
    have = json.loads((Path(ckpt) / "transformer" / "config.json").read_text())
    g = GEOMETRY
    values = {f"model.{k}": have[k] for k in MODEL_FIELDS}
    values.update({
        "video.latent_channels": g["latent_channels"], "video.latent_height": g["latent_height"],
        "video.latent_width": g["latent_width"], "video.train_latent_frames": g["train_latent_frames"],
        "video.eval_horizon_factor": g["eval_horizon_factor"], "video.fps": g["fps"],
        "rollout.frames_per_block": g["frames_per_block"], "rollout.window_frames": g["train_latent_frames"],
        "teacher.path": str(ckpt), "teacher.real_score_path": str(real_score or ""), "teacher.num_steps": 4,
        "data.trajectory_steps": 4, "data.num_ode_pairs": 8, "data.num_trajectories": 8, "data.shard_size": 4,
        "data.batch_size": 2, "data.actors": 1,
        "distill.batch_size": 2, "distill.micro_batch_size": 1, "distill.num_workers": 1,
        "distill.ode_batch_size": 2, "distill.ode_steps": 3, "distill.steps": 2, "distill.critic_ratio": 2,
        "distill.checkpoint_every": 1, "distill.sample_every": 0,
        "eval.num_prompts": 2, "eval.segments": 2,
    })
    if prompts is not None:
        values["data.prompts"] = str(prompts)
        values["data.heldout_prompts"] = 4
    # JSON values are valid YAML, so every override parses back to exactly this value (paths stay strings)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


__all__ = ["PROMPT_WORDS", "PROMPTS", "GEOMETRY", "build_tokenizer", "build_wan_checkpoint",
           "build_real_score_standin", "build_incompatible_real_score", "write_prompts", "cpu_overrides"]
