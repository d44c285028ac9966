"""Ray Data job: generate ODE pairs or teacher trajectories into Parquet shards on a local path or S3.

    python -m hiar.jobs.generate --preset tiny --kind ode_pairs [--count 256] [--output s3://bucket/ode]

Shards (``data.shard_size`` samples) are the unit of work: Ray Data feeds the shards that are not committed yet --
each item a shard index with its (sample index, prompt) pairs, so the prompts are sharded over the pool and no actor
reads the prompt dataset -- to a pool of teacher actors (``ActorPoolStrategy``, fractional CPUs so the pool never
starves the rest of a small machine); each actor samples its shard and commits it whole (``hiar.io.storage.write_shard``). A rerun,
e.g. after the driver was killed, skips committed shards and computes only the rest. The manifest is written when
every shard is committed and records the prompt set (source, hashes, counts, held-out split). The prompts come from
``data.prompts`` (``hiar.io.prompts``; required for every non-tiny preset), loaded once by the driver; training samples
use its training split only. Errors about the prompts, the destination, the teacher or the count come before any
compute (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


from hiar.io.storage import portable_path, resolve_path
from hiar.jobs.results import DatasetResult, write_result
from hiar.platform.progress import report
from hiar.platform.ray_cluster import init_ray
from hiar.platform.tracking import mlflow_experiment

EXPERIMENT = "hiar-data"


class ShardGenerator:
    """A Ray Data actor holding one teacher; each call turns shards (index, sample indices, their prompts) into
    committed shards."""

    def __init__(self, preset: str, overrides: list[str], kind: str, output: str, teacher_path: str):
        import torch

        from hiar.config import load_config
        from hiar.methods.datagen import TeacherSampler, load_teacher_components

        self.cfg = load_config(preset, overrides)
        torch.set_num_threads(max(1, self.cfg.data.threads_per_actor))
        self.device = "cuda" if self.cfg.data.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        transformer, text = load_teacher_components(self.cfg, teacher_path, self.device)
        self.sampler = TeacherSampler(self.cfg, kind, transformer, text)  # prompts come with items
        self.kind, self.output = kind, output

    def __call__(self, batch: dict) -> dict:
        from hiar.io.storage import TENSOR_COLUMN, rows_to_table, write_shard

        out = {"shard": [], "rows": [], "bytes": [], "seconds": [], "actor": []}
        for shard, indices, prompts in zip(batch["shard"], batch["indices"], batch["prompts"]):
            t0 = time.monotonic()
            rows = self.sampler.rows([int(i) for i in indices], [str(p) for p in prompts])
            table = rows_to_table(rows, TENSOR_COLUMN[self.kind], self.cfg.data.dtype)
            size = write_shard(self.output, int(shard), table)
            for key, value in (("shard", int(shard)), ("rows", len(rows)), ("bytes", size),
                               ("seconds", time.monotonic() - t0), ("actor", os.getpid())):
                out[key].append(value)
        return out


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--kind", required=True, choices=["ode_pairs", "trajectories"])
    parser.add_argument("--count", type=int, default=None, help="samples (default: the preset's count)")
    parser.add_argument("--output", default=None, help="local dir or s3://bucket/prefix (default: <storage>/<kind>)")
    parser.add_argument("--teacher", default=None, help="teacher directory (default: teacher.path)")
    parser.add_argument("--actors", type=int, default=None, help="teacher actors (default: data.actors)")
    parser.add_argument("--output-json", default=None,
                        help="write the DatasetResult (hiar.jobs.results) here when every shard is committed")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)

    from hiar.io.checksums import checksum_dir
    from hiar.io.storage import (ShardPlan, check_writable, complete_shards, dataset_identity, load_manifest, now,
                                 write_manifest, SCHEMA_VERSION)
    from hiar.methods.datagen import generation_settings, kind_count, shard_items
    from hiar.io.prompts import prompt_set

    count = args.count if args.count is not None else kind_count(cfg, args.kind)
    try:
        plan = ShardPlan(count, cfg.data.shard_size)
    except ValueError as err:
        parser.error(str(err))
    storage = cfg.data.storage or str(Path(resolve_path(cfg.run_dir)) / "data")
    output = args.output or f"{storage.rstrip('/')}/{args.kind}"
    if "://" not in output:
        output = str(Path(output).resolve())
    teacher = resolve_path(args.teacher or cfg.teacher.path)
    actors = args.actors or cfg.data.actors
    try:
        prompts = prompt_set(cfg)  # first: a non-tiny preset without a prompt dataset is an error before anything
        from hiar.io.bundle import open_model_dir

        teacher_dir = open_model_dir(teacher, "teacher directory (teacher.path or --teacher)")
        check_writable(output)
        teacher_checksum = checksum_dir(teacher_dir.root)
        identity = dataset_identity(args.kind, generation_settings(cfg, args.kind, prompts), teacher_checksum)
        existing = load_manifest(output)
        if existing and existing.get("identity") != identity:
            raise ValueError(f"{output!r} holds a {existing.get('kind')} dataset made with another config or teacher "
                             f"(identity {existing.get('identity')} != {identity}); use another --output")
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    done = complete_shards(output, plan)  # a shard committed for a smaller count may be short: made again
    pending = [s for s in range(plan.num_shards) if s not in done]
    print(f"[generate] {args.kind}: {count} samples in {plan.num_shards} shards of {cfg.data.shard_size} -> {output}; "
          f"{len(done)} already committed, {len(pending)} to compute with {actors} actor(s)", flush=True)
    t0 = time.monotonic()
    results = {"shard": [], "rows": [], "bytes": [], "seconds": [], "actor": []}
    task = f"generate {args.kind}"
    committed_before = count - sum(len(plan.samples(s)) for s in pending)
    report(task, committed_before, count, "samples")
    if pending:
        import ray

        from hiar.io.storage import storage_env

        init_ray()
        ds = ray.data.from_items(shard_items(prompts.train, pending, plan), override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardGenerator,
            fn_constructor_kwargs={"preset": args.preset, "overrides": args.overrides, "kind": args.kind,
                                   "output": output, "teacher_path": teacher},
            batch_size=1,
            # one shard per actor at a time: by default Ray Data queues several on the first actor that is ready,
            # so with 2 shards (tiny's 64 trajectories) one actor made both, one after the other, while the second
            # stood idle (65 s for the stage instead of about 35)
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=cfg.data.cpus_per_actor,
            num_gpus=cfg.data.gpus_per_actor,
            runtime_env={"env_vars": storage_env()},
        )
        for row in ds.iter_rows():
            for key in results:
                results[key].append(row[key])
            report(task, committed_before + sum(results["rows"]), count, "samples")
    seconds = time.monotonic() - t0

    committed = complete_shards(output, plan)
    missing = [s for s in range(plan.num_shards) if s not in committed]
    if missing:
        print(f"error: shards {missing} are missing after the run", file=sys.stderr)
        return 1
    # what the dataset holds: samples are made by index, so one made for a larger count keeps its later shards
    held = ShardPlan(max(count, int(existing.get("count", 0)) if existing else 0), cfg.data.shard_size)
    manifest = {
        "kind": args.kind, "identity": identity, "config_hash": cfg.config_hash(), "teacher": portable_path(teacher),
        "teacher_checksum": teacher_checksum, "schema_version": SCHEMA_VERSION, "count": held.count,
        "num_shards": held.num_shards, "shard_size": cfg.data.shard_size,
        "settings": generation_settings(cfg, args.kind, prompts), "prompts": prompts.manifest(), "created_at": now(),
    }
    write_manifest(output, manifest)
    made = sum(results["rows"])
    size = sum(results["bytes"])
    rate = made / seconds if seconds > 0 and made else 0.0
    spread = f" on {len(set(results['actor']))} of {actors} actor(s)" if results["shard"] else ""
    print(f"[generate] done: {count} samples committed ({made} generated now in {len(results['shard'])} shards"
          f"{spread}, {size / 1e6:.2f} MB, {rate:.2f} samples/s, {seconds:.1f} s) -> {output}", flush=True)

    import mlflow

    experiment_id = mlflow_experiment(EXPERIMENT, resolve_path(cfg.run_dir))
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"generate-{args.kind}") as run:
        mlflow.log_params({"kind": args.kind, "count": count, "output": output, "identity": identity,
                           "actors": actors, "shard_size": cfg.data.shard_size, "prompts": prompts.source,
                           "prompts_sha256": prompts.sha256, "heldout_sha256": prompts.heldout_sha256,
                           "train_prompts": len(prompts.train), "heldout_prompts": len(prompts.heldout)})
        mlflow.log_metrics({"samples_generated": made, "bytes_written": size, "samples_per_s": rate,
                            "shards_generated": len(results["shard"]), "shards_skipped": plan.num_shards - len(pending)})
    write_result(args.output_json, DatasetResult(kind=args.kind, uri=output, identity=identity, count=count,
                                                 shards_written=len(results["shard"]),
                                                 samples_per_s=rate if made else None, run_id=run.info.run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
