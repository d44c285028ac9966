import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread in this process and the jobs it starts (the jobs' Ray workers set their own): the tests' models
# are tiny, and on a 2-core box shared with Ray workers two OpenMP threads per process spun against each other,
# up to 10x slower under load (the shipped-teacher scores: 228 s with two threads, 31 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from hiar.core.model import CausalWanTransformer3DModel

TINY_KW = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=64,
)


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """diffusers initialises some weights to exact zeros/ones; jitter all of them so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


@pytest.fixture
def tiny_model() -> CausalWanTransformer3DModel:
    torch.manual_seed(0)
    return perturbed(CausalWanTransformer3DModel(**TINY_KW))


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray cluster for the whole test session (jobs join it through RAY_ADDRESS)."""
    from tests.services import RayHead

    head = RayHead(num_cpus=2)
    yield head
    head.stop()


@pytest.fixture(scope="session")
def s3_server():
    from tests.services import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 (tests/services.py), stopped with its whole process group."""
    from tests.services import MlflowServer

    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def wan_ckpt(tmp_path_factory):
    """A miniature Wan2.1 T2V 1.3B repository in the public diffusers layout (tests/wan_checkpoint.py)."""
    from tests.wan_checkpoint import build_wan_checkpoint

    return build_wan_checkpoint(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-1.3B-Diffusers")


@pytest.fixture(scope="session")
def wan_real_scores(wan_ckpt, tmp_path_factory):
    """(a stand-in real score that fits the miniature's text encoder and VAE, one that does not: text_dim 48)."""
    from tests.wan_checkpoint import build_incompatible_real_score, build_real_score_standin

    base = tmp_path_factory.mktemp("real")
    return (build_real_score_standin(base / "Wan2.1-T2V-14B-Diffusers", wan_ckpt),
            build_incompatible_real_score(base / "incompatible", wan_ckpt))
