"""HiAR: hierarchical autoregressive denoising for long-video diffusion distillation, on Ray.

One distribution, one import root, layers that import only downwards (``tests/unit/test_layers.py`` reads the
import graph and fails on any other edge):

    hiar.config, hiar.seeding, hiar.identity   the typed config, seeds, content identities (used by every layer)
    hiar.core      schedule, Wan DiT, KV cache, velocity, rollouts, teacher sampler, generation
    hiar.tiny      the synthetic captioned world and its oracle
    hiar.io        model directories / bundles, codecs, text, video, prompt datasets, storage (local or s3://)
    hiar.methods   losses, ODE init, DMD + FKL distillation, teacher pretraining, dataset samples, FSDP2
    hiar.eval      drift suite, dynamics, the promotion gate
                   -- the maths: plain PyTorch, never Ray or MLflow --
    hiar.platform  Ray start-up, MLflow tracking, the model registry
    hiar.jobs      Ray jobs, one entrypoint each            hiar.serving   the Ray Serve app and its client
    hiar.pipeline  the orchestrator (``python -m hiar.pipeline.full``)
"""

__version__ = "0.1.0"
