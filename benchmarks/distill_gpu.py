"""One distillation worker at a preset's real shapes on one GPU: peak memory and seconds per iteration.

    python -m benchmarks.distill_gpu                                   # wan2.1-1.3b shapes, bf16 autocast, checkpointing
    python -m benchmarks.distill_gpu --set distill.activation_checkpointing=false
    python -m benchmarks.distill_gpu --device cpu --set model.num_layers=1 --set video.latent_height=8 ...  # a dry run

What the README's memory plan computes from parameter counts, measured: a ``Distiller`` (generator, EMA, critic,
and a frozen real score in ``precision.transformer``) built at the preset's model and clip shapes with random
weights (speed and memory do not depend on training), on one device, ``ddp`` with one worker and micro batch 1.
Iteration 0 updates the generator (self-rollout of the whole clip, DMD against the real score with CFG, FKL) and
the critic; the next ``critic_ratio - 1`` iterations update the critic alone. Printed per iteration: seconds and
the device's peak allocated memory; then the bytes of each part's state (parameters, gradients, AdamW, EMA) next
to the README's figures.

Stand-ins, said plainly: the teacher plays the real score unless ``--real-score 14b`` (a random model of the
paper's Wan2.1-T2V-14B real score's shape, in ``precision.transformer``), and the text encoder is a one-layer random
UMT5 of the transformer's text width with 512-token embeddings (UMT5-XXL's output shape; the encoder runs once
per prompt under no_grad and is not what this measures).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


#: Wan2.1-T2V-14B's transformer where it differs from the 1.3B's (its transformer/config.json)
WAN_14B = {"num_layers": 40, "num_attention_heads": 40, "ffn_dim": 13824}


def state_bytes(d) -> dict[str, float]:
    """GB of each part's state on this worker (``train_memory.measure_state``'s bytes, grouped as the README's plan)."""
    from benchmarks.train_memory import measure_state

    b = measure_state(d)
    gb = lambda *parts: sum(b[p] for p in parts) / 1e9  # noqa: E731
    return {
        "generator params + grads + AdamW": gb("generator params", "generator grads", "generator AdamW"),
        "EMA": gb("EMA"),
        "critic params + grads + AdamW": gb("critic params", "critic grads", "critic AdamW"),
        "real score": gb("real score params"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=2, help="iteration 0 updates the generator too")
    parser.add_argument("--real-score", choices=["teacher", "14b"], default="teacher",
                        help="the real score: a copy of the teacher, or a random model of Wan2.1-T2V-14B's shape")
    args = parser.parse_args(argv)

    from hiar.config import load_config
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.io.bundle import runtime_dtypes
    from hiar.io.text import TextEncoder
    from hiar.methods.distill import Distiller

    device = torch.device(args.device)
    cfg = load_config(args.preset, ["distill.num_workers=1", "distill.batch_size=1", "distill.micro_batch_size=1",
                                    "distill.activation_checkpointing=true", "distill.mixed_precision=auto",
                                    "distill.sample_every=0", *args.overrides])
    v, m = cfg.video, cfg.model
    words = ["a", "red", "car", "drives", "along", "the", "road", "at", "night"]
    text = TextEncoder.tiny(words, d_model=m.text_dim, num_layers=1, num_heads=32 if m.text_dim % 32 == 0 else 1,
                            d_ff=256, max_length=512 if device.type == "cuda" else 16).to(device)
    dtypes = runtime_dtypes(cfg, device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:  # initialised where they run: a 14B model's random init on the CPU takes minutes
        real_score = None
        if args.real_score == "14b":  # built first: its fp32 init is freed before the trained models exist
            real_score = CausalWanTransformer3DModel(**{**m.kwargs(), **WAN_14B}).to(dtypes["transformer"])
        generator = CausalWanTransformer3DModel(**m.kwargs())
        teacher = copy.deepcopy(generator)
        if real_score is None:
            real_score = copy.deepcopy(generator).to(dtypes["transformer"])
    d = Distiller(cfg, generator, teacher, text, real_score=real_score)
    del teacher
    n_params = sum(p.numel() for p in generator.parameters())
    tokens = v.train_latent_frames * (v.latent_height // m.patch_size[1]) * (v.latent_width // m.patch_size[2])
    print(f"preset={cfg.preset} device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
          f" generator {n_params / 1e9:.2f}B parameters, real score "
          f"{sum(p.numel() for p in real_score.parameters()) / 1e9:.2f}B in {dtypes['transformer']}; clip "
          f"{v.train_latent_frames} latent frames x {v.latent_height}x{v.latent_width} = {tokens} tokens; "
          f"S={cfg.schedule.num_steps} rollout={cfg.distill.rollout} critic_ratio={cfg.distill.critic_ratio} "
          f"checkpointing={cfg.distill.activation_checkpointing} mixed_precision={cfg.distill.mixed_precision}; "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)

    states = torch.randn(1, cfg.schedule.num_steps + 1, v.latent_channels, v.train_latent_frames, v.latent_height,
                         v.latent_width)
    batch = [(["a red car drives along the road at night"], states)]
    cuda = device.type == "cuda"
    logs = []
    for i in range(args.iterations):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        log = d.iteration_step(batch)
        logs.append(log)
        if cuda:
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")
        losses = " ".join(f"{k}={val:.4g}" for k, val in log.metrics.items() if k.endswith("_loss"))
        print(f"iteration {i} ({'generator + critic' if log.generator_updated else 'critic'}, exit step "
              f"{log.metrics['exit_step']}): {time.perf_counter() - t0:.2f} s, peak allocated {peak:.1f} GB; {losses}",
              flush=True)
    print("state per worker (GB):")
    state = state_bytes(d)
    for name, gb in state.items():
        print(f"  {name:<36}{gb:>8.2f}")
    if cuda:
        print(f"  {'allocated now':<36}{torch.cuda.memory_allocated(device) / 1e9:>8.2f}")
        print(f"  {'reserved (peak)':<36}{torch.cuda.max_memory_reserved(device) / 1e9:>8.2f}")
    return {"logs": logs, "state_gb": state}


if __name__ == "__main__":
    main()
