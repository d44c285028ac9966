"""hiar.platform.training.worker_part: which samples each training worker reads (checked against the samples
enumerated one by one, not against the rule's own arithmetic)."""

import pytest

from hiar.io.storage import ShardPlan
from hiar.platform.training import worker_part


def part_samples(plan: ShardPlan, rank: int, workers: int) -> list[int]:
    shards, stride = worker_part(plan, rank, workers)
    return [s for shard in shards for s in plan.samples(shard) if s % stride == rank % stride]


@pytest.mark.parametrize("count,shard_size,workers", [(384, 32, 2), (64, 32, 2), (100, 32, 2), (7, 3, 2),
                                                      (4, 2, 2), (5, 8, 3), (9, 3, 4), (1, 4, 1), (33, 32, 2)])
def test_the_parts_cover_every_sample_once(count, shard_size, workers):
    plan = ShardPlan(count, shard_size)
    parts = [part_samples(plan, rank, workers) for rank in range(workers)]
    assert sorted(s for part in parts for s in part) == list(range(count))
    assert all(part == sorted(part) for part in parts)  # in sample order: a rerun reads the same sequence


def test_whole_shards_when_each_worker_gets_a_full_one_else_every_nth_sample():
    # the tiny preset's 384 ODE pairs in shards of 32 over 2 workers: 6 whole files each, nothing read twice
    assert worker_part(ShardPlan(384, 32), 0, 2) == ([0, 2, 4, 6, 8, 10], 1)
    assert worker_part(ShardPlan(384, 32), 1, 2) == ([1, 3, 5, 7, 9, 11], 1)
    # its 64 trajectories: one file each
    assert worker_part(ShardPlan(64, 32), 1, 2) == ([1], 1)
    # 33 samples: a second worker would get one sample, so both read both files and take every other sample
    assert part_samples(ShardPlan(33, 32), 0, 2) == list(range(0, 33, 2))
    assert part_samples(ShardPlan(33, 32), 1, 2) == list(range(1, 33, 2))


@pytest.mark.parametrize("rank,workers", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_workers_is_refused(rank, workers):
    with pytest.raises(ValueError, match="rank must be in"):
        worker_part(ShardPlan(8, 2), rank, workers)
