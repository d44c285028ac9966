"""What every Ray Train job here does around its own training steps: one ``TorchTrainer`` set-up on the driver
(:func:`fit`), and on each worker (:class:`WorkerSession`) the resume from the run's own last checkpoint, the
checkpoint reports, its part of the dataset (:func:`dataset_parts`), rank 0's MLflow run, sample videos and
progress events.

Used by ``hiar.jobs.train`` (ODE init and distillation) and ``hiar.jobs.pretrain_teacher``; the training maths stays
in ``hiar.methods``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from hiar.platform.progress import report as report_progress
from hiar.platform.ray_cluster import train_worker_env
from hiar.platform.tracking import log_video


def fit(train_loop, loop_config: dict, *, name: str, storage_path: str, num_workers: int, use_gpu: bool = False,
        cpus_per_worker: float = 1.0, keep_checkpoints: int = 2, max_failures: int = 2,
        datasets: dict[str, list] | None = None):
    """Run ``train_loop(loop_config)`` on ``num_workers`` Ray Train workers; returns Ray Train's ``Result``.

    ``name`` is the run's directory under ``storage_path`` (local or s3://): the jobs derive it from what determines
    the weights, so rerunning a command finds its checkpoints and resumes, and ``max_failures`` restarts of a killed
    worker group continue from the last one.

    ``datasets``: name -> one Ray dataset per worker (index: rank; ``dataset_parts``), which that worker alone
    reads, in order (``WorkerSession.shard_batches``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    per_rank = {}
    for dataset_name, parts in (datasets or {}).items():
        if len(parts) != num_workers:
            raise ValueError(f"dataset {dataset_name!r}: {len(parts)} parts for {num_workers} workers")
        per_rank.update({_part_name(dataset_name, rank): part for rank, part in enumerate(parts)})
    # DataConfig replaces each dataset's own execution options with these: the parts' file order must survive it
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            worker_runtime_env=train_worker_env(),
        ),
        datasets=per_rank or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    return trainer.fit()


def _part_name(dataset_name: str, rank: int) -> str:
    """The name under which worker ``rank`` finds its part of ``dataset_name`` (``fit``'s ``datasets``)."""
    return f"{dataset_name}@rank{rank}"


def worker_part(plan, rank: int, num_workers: int) -> tuple[list[int], int]:
    """The samples of a dataset's ``ShardPlan`` that training worker ``rank`` of ``num_workers`` reads:
    ``(shards, stride)``, those of ``shards`` whose index is ``rank`` modulo ``stride``. Whole shards (``rank``,
    ``rank + num_workers``, ...; stride 1) when every worker gets at least one full shard, so each reads only its
    own files; with fewer samples, every shard and every ``num_workers``-th sample."""
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank must be in [0, {num_workers}), got {rank}")
    if plan.count >= num_workers * plan.shard_size:
        return list(range(rank, plan.num_shards, num_workers)), 1
    return list(range(plan.num_shards)), num_workers


def dataset_parts(uri: str, plan, columns: list[str], num_workers: int) -> list:
    """One Ray dataset per training worker (index: rank): ``columns`` of the samples ``worker_part`` gives it, of
    the first ``plan.count`` samples of the Parquet dataset at ``uri`` (``plan``: their ``ShardPlan``; the dataset
    may hold more), in file order.

    Why not one dataset that Ray Train splits: ``streaming_split`` hands each block to whichever worker asks first,
    so two runs of one stage identity trained on other rows per worker and ended with other weights (ODE loss
    0.0308 against 0.0312 after 40 steps on one box); a part fixed by the plan makes a rerun repeat its run."""
    import ray.data

    from hiar.io.storage import shard_paths

    fs, paths = shard_paths(uri, plan)
    parts = []
    for rank in range(num_workers):
        shards, stride = worker_part(plan, rank, num_workers)
        ds = ray.data.read_parquet([paths[s] for s in shards], filesystem=fs)
        ds.context.execution_options.preserve_order = True  # file order, whoever reads it (fit: its workers)
        ds = ds.select_columns(["sample_id", *columns])
        # the last shard may hold samples past the count; a stride keeps every num_workers-th sample
        if stride > 1 or plan.count < plan.num_shards * plan.shard_size:
            ds = ds.map_batches(_part_rows, fn_kwargs={"count": plan.count, "rank": rank, "stride": stride},
                                batch_format="pyarrow")
        parts.append(ds.select_columns(columns))
    return parts


def _part_rows(batch, count: int, rank: int, stride: int):
    """The rows of ``batch`` (a pyarrow table) whose sample index is below ``count`` and ``rank`` modulo
    ``stride``."""
    import pyarrow as pa

    ids = batch["sample_id"].to_numpy()
    return batch.filter(pa.array((ids < count) & (ids % stride == rank)))


class WorkerSession:
    """One Ray Train worker's bookkeeping; everything MLflow and progress happens on rank 0 only."""

    def __init__(self, task: str):
        import ray.train

        self.task = task  # the progress task, e.g. "train distill"
        self.context = ray.train.get_context()
        self.rank, self.world_size = self.context.get_world_rank(), self.context.get_world_size()

    def resume(self, load: Callable[[Path], None]) -> bool:
        """Load this run's own last checkpoint with ``load(directory)`` -- after a worker failure, or on a rerun of
        the same command -- and return True; False when the run has none."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            load(Path(directory))
        return True

    def start_tracking(self, tracking_uri: str, run_id: str | None = None, experiment_id: str | None = None,
                       run_name: str | None = None, params: dict | None = None) -> str | None:
        """Rank 0: continue MLflow run ``run_id``, else start one in ``experiment_id`` with ``params``; returns the
        run id (None on the other ranks)."""
        if self.rank != 0:
            return None
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        if run_id:
            mlflow.start_run(run_id=run_id)
        else:
            mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
            if params:
                mlflow.log_params(params)
        return mlflow.active_run().info.run_id

    def report(self, metrics: dict, save: Callable[[Path], None], every_rank_saves: bool = True) -> None:
        """Report ``metrics`` with a checkpoint that ``save(directory)`` writes. Every rank reports (Ray Train needs
        the same number of reports from each worker); with ``every_rank_saves`` each writes its part (sharded
        state, merged by Ray Train into one checkpoint directory), else rank 0 alone holds the state."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if every_rank_saves or self.rank == 0:
                save(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def shard_batches(self, dataset_name: str, column: str, micro_batch: int, cache_mb: int, log=print):
        """Endless ``(prompts, tensors as stored)`` micro-batches from this worker's part of dataset
        ``dataset_name`` (``fit``'s ``datasets``), ``column`` read with ``hiar.io.storage.tensor_column``.

        The first pass streams the shard through Ray Data; when the whole shard fits in ``cache_mb`` MB (as stored)
        it is kept in memory and later epochs replay it in the same order instead of executing the dataset again.
        A shard over the budget streams every epoch.
        """
        import ray.train

        from hiar.io.storage import tensor_column

        shard = ray.train.get_dataset_shard(_part_name(dataset_name, self.rank))
        cache: list | None = [] if cache_mb > 0 else None
        cached_bytes = 0
        while True:
            seen = 0
            for table in shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True):
                prompts, arr = [str(p) for p in table.column("prompt").to_pylist()], tensor_column(table, column)
                if cache is not None:
                    cached_bytes += arr.nbytes
                    if cached_bytes > cache_mb * 2**20:
                        log(f"{dataset_name} shard over the cache budget ({cache_mb} MB): streamed every epoch")
                        cache = None
                    else:
                        cache.append((prompts, arr))
                seen += 1
                yield prompts, arr
            if seen == 0:
                raise RuntimeError(f"worker got no {dataset_name} rows (fewer rows than workers x micro-batch size?)")
            if cache is not None:
                log(f"{dataset_name}: {seen} micro-batches ({cached_bytes / 2**20:.1f} MB) kept in memory; "
                    "later epochs replay them")
                while True:
                    yield from cache

    def fetch_once_per_node(self, uri: str, what: str) -> Path:
        """A local copy of a directory (local path or s3://, ``hiar.io.storage.local_dir``'s per-node cache): the
        first worker of each node fetches it, the others wait at a barrier and then find it cached."""
        import torch.distributed as dist

        from hiar.io.storage import local_dir

        path = local_dir(uri, what) if self.context.get_local_rank() == 0 else None
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return path or local_dir(uri, what)

    def progress(self, done: int, total: int | None, unit: str = "steps") -> None:
        if self.rank == 0:
            report_progress(self.task, done, total, unit)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.rank == 0:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_video(self, frames, file_name: str, artifact_path: str, fps: int, columns: int, upscale: int) -> None:
        if self.rank == 0:
            log_video(frames, file_name, artifact_path, fps, columns, upscale)

    def finish(self) -> None:
        """Rank 0 ends its MLflow run."""
        if self.rank == 0:
            import mlflow

            mlflow.end_run()
