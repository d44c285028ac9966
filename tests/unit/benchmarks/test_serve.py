"""The in-process rows of benchmarks/serve.py do the library's rollouts, so its ratios compare like with like."""

import pytest
import torch

from benchmarks.serve import PROMPTS, block_first_streams, diagonal_streams, random_tiny_bundle
from hiar.core.generation import generate_latents
from hiar.io.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(random_tiny_bundle(tmp_path_factory.mktemp("student"), "tiny"))


def per_stream(rows, streams: int) -> list[torch.Tensor]:
    blocks: list[list] = [[] for _ in range(streams)]
    for i, n, x in rows:
        assert n == len(blocks[i])  # each stream's blocks in order
        blocks[i].append(x)
    return [torch.cat(b, dim=2) for b in blocks]


def reference(bundle, i: int, seed: int, num_blocks: int, mode: str) -> torch.Tensor:
    return generate_latents(bundle.transformer, bundle.text, bundle.config, [PROMPTS[i % 2]], [seed], num_blocks,
                            mode)


def test_lock_step_diagonals_of_several_streams_are_each_streams_hierarchical_rollout(bundle):
    seeds = [3, 7]
    got = per_stream(diagonal_streams(bundle, seeds, 3), len(seeds))
    for i, seed in enumerate(seeds):
        ref = reference(bundle, i, seed, 3, "hierarchical")
        assert got[i].shape == ref.shape and (got[i] - ref).abs().max() <= 1e-4
    assert (got[0] - got[1]).abs().max() > 1e-2  # the streams are not one video twice


def test_batched_block_first_streams_are_each_streams_block_first_rollout(bundle):
    seeds = [3, 7]
    got = per_stream(block_first_streams(bundle, seeds, 2, batched=True), len(seeds))
    for i, seed in enumerate(seeds):
        assert (got[i] - reference(bundle, i, seed, 2, "block_first")).abs().max() <= 1e-4
