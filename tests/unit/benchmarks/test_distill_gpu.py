"""benchmarks/distill_gpu.py (a GPU measurement) dry-run on the CPU at miniature shapes: the Wan preset's Distiller
is built with its stand-ins, iteration 0 updates generator and critic, the next the critic alone, and the state
it reports is the models' (the real score in the preset's CPU precision, fp32)."""

from __future__ import annotations

import math

from benchmarks.distill_gpu import main

MINIATURE = ["model.num_layers=1", "model.num_attention_heads=2", "model.attention_head_dim=16", "model.ffn_dim=64",
             "video.latent_height=8", "video.latent_width=8", "video.train_latent_frames=6", "rollout.window_frames=6",
             "distill.critic_ratio=2"]


def test_a_cpu_dry_run_at_miniature_shapes(capsys):
    out = main(["--device", "cpu", "--iterations", "2", *[a for o in MINIATURE for a in ("--set", o)]])
    updated = [log.generator_updated for log in out["logs"]]
    assert updated == [True, False]
    first = out["logs"][0].metrics
    assert {"dmd_loss", "fkl_loss", "critic_loss"} <= first.keys()
    assert all(math.isfinite(v) for log in out["logs"] for k, v in log.metrics.items() if k.endswith("_loss"))
    state = out["state_gb"]
    # generator: params + grads + two AdamW moments (fp32) = 4x its parameters; the EMA and the real score 1x
    assert math.isclose(state["generator params + grads + AdamW"], 4 * state["EMA"], rel_tol=1e-3)
    assert math.isclose(state["real score"], state["EMA"], rel_tol=1e-9)
    printed = capsys.readouterr().out
    assert "iteration 0 (generator + critic" in printed and "iteration 1 (critic" in printed
