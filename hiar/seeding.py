"""One way to turn a tuple of integers (a seed plus what the randomness is for) into an independent RNG seed.

Noise for (sample, block, step), a dataset sample's seed, and a training step's generator all derive from
``derive_seed``, so each stream is independent of execution order, batching and worker, and reproducible anywhere.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative-masked integer parts (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
