"""The miniature Wan2.1 checkpoints of tests/wan_checkpoint.py: the public layout, loadable by diffusers itself and
by the project's loaders, with the sizes the CPU end-to-end tests rely on."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from tests.wan_checkpoint import (
    GEOMETRY,
    PROMPT_WORDS,
    PROMPTS,
    cpu_overrides,
    write_prompts,
)


def test_layout_and_model_index_are_the_public_ones(wan_ckpt):
    assert sorted(p.name for p in wan_ckpt.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    index = json.loads((wan_ckpt / "model_index.json").read_text())
    import diffusers

    assert index == {
        "_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}
    sched = json.loads((wan_ckpt / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["flow_shift"], sched["prediction_type"], sched["use_flow_sigmas"]) == (3.0, "flow_prediction", True)
    assert {w for p in PROMPTS for w in p.split()} <= set(PROMPT_WORDS) and len(set(PROMPTS)) == len(PROMPTS)


def test_wan_pipeline_loads_and_runs(wan_ckpt):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5EncoderModel

    pipe = WanPipeline.from_pretrained(wan_ckpt, local_files_only=True)
    assert type(pipe.transformer) is WanTransformer3DModel and pipe.transformer_2 is None
    assert isinstance(pipe.tokenizer, T5TokenizerFast) and type(pipe.text_encoder) is UMT5EncoderModel
    assert type(pipe.vae) is AutoencoderKLWan and type(pipe.scheduler) is UniPCMultistepScheduler
    assert pipe.transformer.config.num_layers == 2 and pipe.transformer.config.text_dim == 32
    assert pipe.text_encoder.config.d_model == 32 and pipe.vae.config.z_dim == 16
    out = pipe(PROMPTS[0], num_inference_steps=2, height=64, width=64, num_frames=5, guidance_scale=2.0,
               output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 5, 64, 64, 3) and 0 <= out.min() and out.max() <= 1


def test_causal_model_matches_diffusers_on_the_checkpoint(wan_ckpt):
    from diffusers import WanTransformer3DModel

    from hiar.core.model import CausalWanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(wan_ckpt / "transformer").eval()
    ours = CausalWanTransformer3DModel.from_pretrained(wan_ckpt / "transformer").eval()
    assert set(ref.state_dict()) == set(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, GEOMETRY["train_latent_frames"], 8, 8, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([910.0, 250.0])
    with torch.no_grad():
        expected = ref(x, t, text).sample
        got = ours(x, t, text, attention_mode="bidirectional").sample
    assert expected.abs().max() > 1e-2  # jittered weights: the output is not trivially zero
    assert (got - expected).abs().max() <= 1e-5


def test_real_score_standins_share_the_text_encoder_and_vae(wan_ckpt, wan_real_scores):
    from diffusers import WanPipeline

    from hiar.io.bundle import check_real_score, open_model_dir

    standin, incompatible = wan_real_scores
    for root in wan_real_scores:
        for part in ("tokenizer", "text_encoder", "vae"):
            files = sorted(p.relative_to(root / part) for p in (root / part).rglob("*") if p.is_file())
            assert files == sorted(p.relative_to(wan_ckpt / part) for p in (wan_ckpt / part).rglob("*") if p.is_file())
            for f in files:
                assert (root / part / f).read_bytes() == (wan_ckpt / part / f).read_bytes(), (root, part, f)
    big = WanPipeline.from_pretrained(standin, local_files_only=True).transformer.config
    assert (big.num_layers, big.num_attention_heads, big.attention_head_dim, big.text_dim) == (3, 4, 8, 32)
    bad = WanPipeline.from_pretrained(incompatible, local_files_only=True).transformer.config
    assert bad.text_dim == 48
    teacher = open_model_dir(wan_ckpt)
    check_real_score(teacher, open_model_dir(standin))
    with pytest.raises(ValueError, match="text_dim is 48"):
        check_real_score(teacher, open_model_dir(incompatible))


def test_text_encoder_encodes_every_prompt(wan_ckpt):
    from hiar.io.text import TextEncoder

    enc = TextEncoder.from_pretrained(wan_ckpt)
    emb = enc.encode(PROMPTS)  # raises on any unknown word
    assert emb.shape == (len(PROMPTS), enc.max_length, 32) and enc.max_length == 512
    n = len(PROMPTS[0].split()) + 1  # words and </s>
    assert emb[0, :n].abs().min() > 0 and torch.all(emb[0, n:] == 0)
    with pytest.raises(ValueError, match="unknown word"):
        enc.encode("a purple zebra")


def test_vae_codec_geometry(wan_ckpt):
    from hiar.io.codec import WanVAECodec

    codec = WanVAECodec.from_pretrained(wan_ckpt)
    video = torch.rand(1, GEOMETRY["num_frames"], GEOMETRY["height"], GEOMETRY["width"], 3,
                       generator=torch.Generator().manual_seed(0))
    lat = codec.encode(video)
    assert lat.shape == (1, 16, 6, 8, 8) == (1, GEOMETRY["latent_channels"], GEOMETRY["train_latent_frames"],
                                             GEOMETRY["latent_height"], GEOMETRY["latent_width"])


def test_cpu_overrides_build_the_preset_for_the_checkpoint(wan_ckpt, wan_real_scores):
    from hiar.io.bundle import check_model_config, open_model_dir
    from hiar.config import load_config

    cfg = load_config("wan2.1-1.3b", cpu_overrides(wan_ckpt, real_score=wan_real_scores[0]))
    have = json.loads((wan_ckpt / "transformer" / "config.json").read_text())
    assert cfg.model.kwargs()["num_layers"] == have["num_layers"] and list(cfg.model.patch_size) == have["patch_size"]
    assert cfg.teacher.path == str(wan_ckpt) and cfg.teacher.real_score_path == str(wan_real_scores[0])
    assert (cfg.video.latent_height, cfg.video.train_latent_frames, cfg.rollout.window_frames) == (8, 6, 6)
    check_model_config(open_model_dir(cfg.teacher.path), cfg)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_write_prompts(tmp_path, fmt):
    path = write_prompts(tmp_path / f"prompts.{fmt}", fmt=fmt)
    if fmt == "txt":
        got = path.read_text().splitlines()
    elif fmt == "jsonl":
        got = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    else:
        got = pq.read_table(path).column("prompt").to_pylist()
    assert got == PROMPTS
