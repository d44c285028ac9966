"""Ray Train job: ODE-regression init of the causal student, then HiAR distillation (DMD + forward KL).

    python -m hiar.jobs.train --preset tiny --stage ode_init
    python -m hiar.jobs.train --preset tiny --stage distill [--set distill.rollout=block_first]
    python -m hiar.jobs.train --preset tiny --stage all

The maths is ``hiar.methods.distill``; this file wires it into a ``TorchTrainer`` per stage:

* data: the ``ode_pairs`` / ``trajectories`` Parquet datasets (local or ``s3://``, ``data.storage``) through
  Ray Data, one shard of the dataset per worker (``ray.train.get_dataset_shard``);
* ``ScalingConfig(num_workers, use_gpu)`` from ``distill.*``; gradients averaged over workers (gloo on CPU);
* ``RunConfig(storage_path, name)``: the name is a hash of everything that determines the weights, so rerunning
  the same command (or ``full.py`` after a crash) resumes from the latest checkpoint, and ``FailureConfig``
  restarts a killed worker group from it;
* MLflow from rank 0: one parent run per job, a nested run per stage, the whole config as params, losses and
  grad norms, steps/s, sample MP4s of both rollout modes on fixed held-out prompts, and the final generator
  (EMA for distillation) as a logged model bundle.  The stage's run id is found again by its identity tag, so
  a resumed stage keeps writing to the same run.

Errors about the data (missing, wrong shapes), the teacher or the init checkpoint come before any training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


from hiar.platform.tracking import flatten, mlflow_experiment, tracking_uri
from hiar.platform.ray_cluster import init_ray, train_worker_env
from hiar.io.storage import resolve_path

EXPERIMENT = "hiar-train"
STAGES = ("ode_init", "distill")
DATASET_OF = {"ode_init": "ode_pairs", "distill": "trajectories"}
IDENTITY_TAG = "hiar.train_identity"


# ---------------------------------------------------------------------------------------------- worker side
def _batches(dataset_name: str, column: str, micro_batch: int, cache_mb: int, verbose: bool = False):
    """Endless (prompts, states [b, S + 1, C, F, H, W]) micro-batches from this worker's dataset shard.

    The first pass streams the shard through Ray Data; when the whole shard fits in ``cache_mb`` MB (as stored,
    float16 for the default ``data.dtype``) it is kept in memory and later epochs replay it in the same order
    instead of executing the dataset again. A shard over the budget streams every epoch.
    """
    import numpy as np
    import ray.train
    import torch

    from hiar.io.storage import tensor_column

    def to_model(arr):  # [b, S + 1, F, C, H, W] -> the model's [b, S + 1, C, F, H, W], float32
        return torch.from_numpy(np.ascontiguousarray(arr)).float().permute(0, 1, 3, 2, 4, 5).contiguous()

    def log(message: str) -> None:
        if verbose:
            print(message, flush=True)

    shard = ray.train.get_dataset_shard(dataset_name)
    cache: list | None = [] if cache_mb > 0 else None
    cached_bytes = 0
    while True:
        seen = 0
        for table in shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True):
            prompts, arr = [str(p) for p in table.column("prompt").to_pylist()], tensor_column(table, column)
            if cache is not None:
                cached_bytes += arr.nbytes
                if cached_bytes > cache_mb * 2**20:
                    log(f"[train] {dataset_name} shard over distill.dataset_cache_mb={cache_mb}: streamed every epoch")
                    cache = None
                else:
                    cache.append((prompts, arr))
            seen += 1
            yield prompts, to_model(arr)
        if seen == 0:
            raise RuntimeError(f"worker got no {dataset_name} rows (fewer rows than workers x micro_batch_size?)")
        if cache is not None:
            log(f"[train] {dataset_name}: {seen} micro-batches ({cached_bytes / 2**20:.1f} MB) kept in memory; "
                "later epochs replay them")
            while True:
                for prompts, arr in cache:
                    yield prompts, to_model(arr)


def _sample_and_log(model, text, codec, cfg, step: int, tag: str) -> dict:
    """Sample both rollout modes on fixed held-out prompts and seeds; log MP4s and (tiny) oracle scores."""
    import mlflow
    import numpy as np

    from hiar.core.generation import generate_latents
    from hiar.methods.pretrain import eval_prompts
    from hiar.io.video import tile, write_mp4

    n_blocks = cfg.video.train_latent_frames // cfg.rollout.frames_per_block
    prompts = eval_prompts(cfg.distill.sample_prompts) if cfg.preset == "tiny" else []
    if not prompts:
        return {}
    seeds = list(range(len(prompts)))
    metrics = {}
    was_training = model.training
    model.eval()
    for mode in ("hierarchical", "block_first"):
        latents = generate_latents(model, text, cfg, prompts, seeds, n_blocks, mode)
        frames = codec.decode(latents).cpu().numpy()
        from hiar.tiny import oracle

        scores = oracle.score_batch(zip(frames, prompts))
        for k in ("caption_consistency", "motion_accuracy", "color_ok", "direction_ok", "background_ok"):
            metrics[f"samples/{mode}/{k}"] = float(scores[k])
        with tempfile.TemporaryDirectory() as tmp:
            path = write_mp4(tile(np.asarray(frames), columns=len(prompts), upscale=4),
                             Path(tmp) / f"{tag}_{mode}_step{step:06d}.mp4", fps=cfg.video.fps)
            mlflow.log_artifact(str(path), f"samples/{mode}")
    model.train(was_training)
    mlflow.log_metrics(metrics, step=step)
    return metrics


def _fetched(uri: str, ctx) -> Path:
    """A local copy of a checkpoint directory (local path or s3://, hiar.io.storage.local_dir's per-node cache): the
    first worker of each node fetches it, the others wait and then find it cached."""
    import torch.distributed as dist

    from hiar.io.storage import local_dir

    first = ctx.get_local_rank() == 0
    path = local_dir(uri, "distill.resume_from") if first else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return path or local_dir(uri, "distill.resume_from")


def train_loop_per_worker(c: dict) -> None:
    import mlflow
    import ray.train
    import torch

    from hiar.io.bundle import load_bundle, load_text, load_transformer, open_model_dir, runtime_dtypes, save_bundle
    from hiar.config import load_config
    from hiar.methods.distill import Distiller, ODEInit

    cfg = load_config(c["preset"], c["overrides"])
    stage = c["stage"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, world_size)))
    device = torch.device("cuda" if cfg.distill.use_gpu and torch.cuda.is_available() else "cpu")
    d = cfg.distill
    dtypes = runtime_dtypes(cfg, device)

    # the teacher's transformer is trained (the student's init, the critic's init): fp32; the frozen parts run in
    # the configured precision
    teacher_dir = open_model_dir(c["teacher"], "teacher.path")
    teacher = load_transformer(teacher_dir, device)
    text = load_text(teacher_dir, device, dtypes["text_encoder"])
    codec = None
    if stage == "ode_init":
        # the causal student starts from the teacher's weights (same architecture, block-causal attention)
        trainer = ODEInit(cfg, teacher, text, rank, world_size)
        total, micro = d.ode_steps, d.micro_batch_size
    else:
        generator = load_bundle(c["init"], device=str(device)).transformer
        real_score = None
        if c.get("real_score"):
            real_score = load_transformer(open_model_dir(c["real_score"], "teacher.real_score_path"), device,
                                          dtypes["transformer"])
            print(f"[train:{stage}] rank {rank}: real score {c['real_score']} "
                  f"({sum(p.numel() for p in real_score.parameters()) / 1e6:.2f}M parameters, "
                  f"{dtypes['transformer']}); critic initialised from {c['teacher']}", flush=True)
        trainer = Distiller(cfg, generator, teacher, text, rank=rank, world_size=world_size, real_score=real_score)
        total, micro = d.steps, d.micro_batch_size
    step_of = (lambda: trainer.step) if stage == "ode_init" else (lambda: trainer.generator_steps)
    # the model that is sampled and saved (the student; the EMA generator for distillation) as one plain module:
    # with distill.sharding=fsdp gathering it is a collective (every rank calls, rank 0 gets it, others None)
    model_of = trainer.export_model

    print(f"[train:{stage}] rank {rank}/{world_size} pid {os.getpid()} on {device}", flush=True)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # this run's own last checkpoint: a restart after a failure, or a rerun of the command
        with ckpt.as_directory() as dr:
            trainer.load_checkpoint(dr)
        print(f"[train:{stage}] rank {rank}: resumed from checkpoint at step {step_of()}", flush=True)
    elif stage == "distill" and c.get("resume_from"):
        trainer.load_checkpoint(_fetched(c["resume_from"], ctx))
        print(f"[train:{stage}] rank {rank}: resumed from checkpoint at step {step_of()} "
              f"(distill.resume_from {c['resume_from']})", flush=True)

    if rank == 0:
        from hiar.io.bundle import load_model_codec

        codec = load_model_codec(teacher_dir, device, dtypes["vae"])  # rank 0 decodes the sample videos
        mlflow.set_tracking_uri(c["tracking_uri"])
        mlflow.start_run(run_id=c["run_id"])

    def report(metrics: dict) -> None:
        # every rank reports the same number of times, each with a directory holding what it wrote of one sharded
        # checkpoint (torch.distributed.checkpoint: its shards; rank 0 also the metadata): Ray Train merges them into
        # one checkpoint directory under RunConfig.storage_path (local or s3://); it loads with any worker count
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save_checkpoint(tmp)
            ray.train.report({"step": step_of(), **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    batches = _batches(DATASET_OF[stage], "latents" if stage == "ode_init" else "states", micro,
                       d.dataset_cache_mb, verbose=rank == 0)
    t0, steps0 = time.monotonic(), step_of()
    metrics: dict = {}
    while step_of() < total:
        micro_batches = [next(batches) for _ in range(trainer.accum)]
        if stage == "ode_init":
            metrics = trainer.train_step(micro_batches)
            stepped = True
        else:
            log = trainer.iteration_step(micro_batches)
            metrics = {**metrics, **log.metrics}
            stepped = log.generator_updated
        if not stepped:
            continue
        step = step_of()
        if rank == 0 and (step % 5 == 0 or step == total):
            rate = (step - steps0) / max(1e-9, time.monotonic() - t0)
            mlflow.log_metrics({**{k: float(v) for k, v in metrics.items()}, "steps_per_s": rate}, step=step)
            print(f"[train:{stage}] step {step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                                  if isinstance(v, float)), flush=True)
        if d.sample_every and step % d.sample_every == 0 and step < total:
            model = model_of()
            if rank == 0:
                _sample_and_log(model, text, codec, cfg, step, stage)
        if step % d.checkpoint_every == 0 or step == total:
            report({k: float(v) for k, v in metrics.items()})
            if rank == 0:
                print(f"[train:{stage}] checkpoint at step {step}", flush=True)

    final_model = model_of()
    if rank == 0:
        final = _sample_and_log(final_model, text, codec, cfg, step_of(), stage)
        card = {"preset": cfg.preset, "seed": cfg.seed, "steps": step_of(), "stage": stage,
                "rollout": d.rollout, "source_run": c["run_id"], "identity": c["identity"], "samples": final,
                "teacher": c["teacher"], "real_score": c.get("real_score") or c["teacher"], "init": c.get("init", "")}
        # the text encoder and codec are the teacher's: referenced by hash, stored once under the run directory;
        # the bundle is logged as a model once, when it is registered (hiar/jobs/promote.py register)
        out = save_bundle(c["output"], final_model, text, codec, card, cfg, title=f"HiAR student ({stage})",
                          summary=f"Causal Wan-architecture generator after `{stage}` "
                                  f"({d.rollout} self-rollout)." if stage == "distill" else
                                  "Causal student after ODE-regression init.",
                          shared=teacher_dir, store=c["component_store"])
        mlflow.log_dict(card, "card.json")
        mlflow.end_run()
        print(f"[train:{stage}] saved {out} after {step_of()} steps; samples: "
              + " ".join(f"{k}={v:.3f}" for k, v in final.items()), flush=True)


# ---------------------------------------------------------------------------------------------- driver side
def stage_identity(cfg, stage: str, inputs: dict) -> str:
    """Hash of what determines a stage's weights (config sections + input checksums), not its logging."""
    import hashlib

    dd = cfg.to_dict()
    distill = {k: v for k, v in dd["distill"].items()
               if k not in ("sample_every", "sample_prompts", "checkpoint_every", "keep_checkpoints",
                            "max_failures", "storage_path", "num_workers", "cpus_per_worker", "use_gpu",
                            "activation_checkpointing", "real_score_sharding", "resume_from",
                            "dataset_cache_mb")}
    if stage == "ode_init":
        distill = {k: distill[k] for k in ("ode_steps", "lr_ode", "ode_batch_size", "micro_batch_size", "betas",
                                           "grad_clip")}
    keep = {"stage": stage, "seed": dd["seed"], "model": dd["model"], "schedule": dd["schedule"],
            "rollout": dd["rollout"], "video": dd["video"], "teacher": dd["teacher"], "distill": distill,
            "inputs": inputs}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def check_dataset(cfg, kind: str, uri: str) -> dict:
    """The dataset's manifest, after checking it exists and its tensors fit the model (before any compute)."""
    from hiar.io.storage import committed_shards, load_manifest

    manifest = load_manifest(uri)
    if manifest is None or not committed_shards(uri):
        raise ValueError(f"no {kind} dataset at {uri!r} (no manifest.json / shards); create it with "
                         f"`python -m hiar.jobs.generate --kind {kind}` or set data.storage")
    v = cfg.video
    want = [v.train_latent_frames, v.latent_channels, v.latent_height, v.latent_width]
    have = manifest.get("settings", {}).get("latent_shape")
    if have != want:
        raise ValueError(f"{kind} at {uri!r} has latents of shape [F, C, H, W] = {have}, but the model config "
                         f"expects {want} (video.train_latent_frames / latent_channels / latent_height / latent_width)")
    n_sigmas = len(cfg.schedule.sigmas())
    if len(manifest["settings"].get("student_sigmas", [])) != n_sigmas:
        raise ValueError(f"{kind} at {uri!r} was made for {len(manifest['settings']['student_sigmas'])} schedule "
                         f"points, the config has {n_sigmas}")
    return manifest


def find_or_create_run(experiment_id: str, identity: str, name: str, parent_run_id: str | None, params: dict):
    """The MLflow run of this stage identity (resumed when it exists and is unfinished), else a new nested one."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{IDENTITY_TAG}` = '{identity}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id, True
    tags = {IDENTITY_TAG: identity, "mlflow.runName": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    items = list(params.items())
    for i in range(0, len(items), 100):
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
    return run.info.run_id, False


def check_models(cfg, teacher: str):
    """The teacher (and the real score, when it is its own model) open as model directories, the config's
    ``model.*`` describes the teacher, and the real score fits the teacher's text encoder and VAE (no weights read).
    Returns the two ``ModelDir``s (the real score's is None when it is the teacher)."""
    from hiar.io.bundle import check_model_config, check_real_score, open_model_dir

    teacher_dir = open_model_dir(teacher, "teacher.path")
    check_model_config(teacher_dir, cfg)
    real_dir = None
    if cfg.teacher.real_score_path:
        real_dir = open_model_dir(resolve_path(cfg.teacher.real_score_path), "teacher.real_score_path")
        check_real_score(teacher_dir, real_dir)
    return teacher_dir, real_dir


def check_resume_checkpoint(cfg, uri: str) -> dict:
    """``distill.resume_from`` is a distillation checkpoint whose parameter shapes fit this config's model (read
    from its ``trainer.json`` and DCP ``.metadata`` alone, fetched from s3:// when remote); returns what enters
    the stage identity."""
    import torch

    from hiar.io.storage import resolve_uri
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.sharding import TRAINER_STATE, check_checkpoint

    fs, path = resolve_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (TRAINER_STATE, ".metadata"):
            try:
                with fs.open_input_stream(f"{path}/{name}") as src:
                    (Path(tmp) / name).write_bytes(src.read())
            except (FileNotFoundError, OSError) as err:
                raise ValueError(f"distill.resume_from {uri!r} is not a training checkpoint (no {name}: {err})") from err
        with torch.device("meta"):
            model = CausalWanTransformer3DModel(**cfg.model.kwargs())
        try:
            counters = check_checkpoint(tmp, {"generator": model, "critic": model, "ema": model}, stage="distill")
        except ValueError as err:  # name the setting and the URI, not the temporary copy
            raise ValueError(f"distill.resume_from {uri!r}: {str(err).replace(f'checkpoint {tmp} ', '')}") from None
    return {"uri": uri, "iteration": counters["iteration"]}


def plan_stage(cfg, stage: str, storage: str, teacher: str, init: str | None, output: str | None = None) -> dict:
    """Inputs checked, identity and output directory of a stage (no compute): errors come before training."""
    from hiar.io.bundle import check_model_config, open_model_dir

    kind = DATASET_OF[stage]
    uri = f"{storage.rstrip('/')}/{kind}"
    manifest = check_dataset(cfg, kind, uri)
    check_models(cfg, teacher)
    inputs = {"data": manifest["identity"], "teacher": manifest.get("teacher_checksum")}
    if stage == "distill":
        card_path = Path(init or "") / "card.json"
        if not init or not card_path.exists():
            raise ValueError(f"no ODE-init student at {init!r}; run `--stage ode_init` first or pass --init")
        inputs["init"] = json.loads(card_path.read_text()).get("identity")
        check_model_config(open_model_dir(init, "--init"), cfg, key="--init")
        if cfg.distill.resume_from:
            inputs["resume_from"] = check_resume_checkpoint(cfg, resolve_path(cfg.distill.resume_from))
    identity = stage_identity(cfg, stage, inputs)
    out = Path(output) if output else Path(resolve_path(cfg.run_dir)) / "students" / f"{stage}-{identity}"
    card = out / "card.json"
    done = card.exists() and json.loads(card.read_text()).get("identity") == identity
    return {"kind": kind, "uri": uri, "manifest": manifest, "identity": identity, "output": out, "done": done}


def run_stage(cfg, args, stage: str, storage: str, teacher: str, init: str | None, experiment_id: str,
              parent_run_id: str | None) -> Path:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from hiar.io.storage import TENSOR_COLUMN, shard_paths

    plan = plan_stage(cfg, stage, storage, teacher, init, args.output if stage == args.stages[-1] else None)
    kind, uri, manifest, identity, output = (plan[k] for k in ("kind", "uri", "manifest", "identity", "output"))
    run_dir = Path(resolve_path(cfg.run_dir))
    name = f"{stage}-{identity}"
    if plan["done"]:
        print(f"[train] {stage}: {output} already holds this stage's result (identity {identity}); skipping",
              flush=True)
        return output

    run_id, resumed = find_or_create_run(experiment_id, identity, name, parent_run_id, flatten(cfg.to_dict()))
    print(f"[train] {stage}: {kind} from {uri} ({manifest['count']} samples), teacher {teacher}, "
          f"MLflow run {run_id}{' (resumed)' if resumed else ''}, output {output}", flush=True)

    fs, paths = shard_paths(uri)
    column = TENSOR_COLUMN[kind]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["prompt", column])
    d = cfg.distill
    storage_path = d.storage_path or str(run_dir / "train")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"preset": args.preset, "overrides": args.overrides, "stage": stage, "teacher": teacher,
                           "init": init, "output": str(output), "tracking_uri": tracking_uri(str(run_dir)),
                           "real_score": resolve_path(cfg.teacher.real_score_path) if cfg.teacher.real_score_path else "",
                           "component_store": str(run_dir / "components"),
                           "resume_from": resolve_path(cfg.distill.resume_from) if cfg.distill.resume_from else "",
                           "run_id": run_id, "identity": identity},
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker={"CPU": d.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            worker_runtime_env=train_worker_env(),
        ),
        datasets={kind: ds},
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{stage} failed: {result.error}")
    if not (output / "card.json").exists():
        raise RuntimeError(f"{stage} finished but wrote no model to {output}")
    return output


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--stage", default="all", choices=[*STAGES, "all"])
    parser.add_argument("--init", default=None, help="ODE-init student bundle for --stage distill "
                                                     "(default: this config's ode_init output)")
    parser.add_argument("--output", default=None, help="where the last stage's model bundle goes")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run (full.py passes its own)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    args.stages = list(STAGES) if args.stage == "all" else [args.stage]

    import mlflow

    run_dir = resolve_path(cfg.run_dir)
    storage = cfg.data.storage or str(Path(run_dir) / "data")
    teacher = resolve_path(cfg.teacher.path)
    try:
        init_ray()
        experiment_id = mlflow_experiment(EXPERIMENT, run_dir)
        parent = args.parent_run_id
        own_parent = None
        if parent is None:
            own_parent = mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{args.stage}")
            parent = own_parent.info.run_id
        init = args.init
        if args.stage == "distill" and init is None:
            init = str(plan_stage(cfg, "ode_init", storage, teacher, None)["output"])
        out = None
        for stage in args.stages:
            out = run_stage(cfg, args, stage, storage, teacher, init, experiment_id, parent)
            init = str(out)
        if own_parent is not None:
            mlflow.end_run()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if mlflow.active_run():
            mlflow.end_run(status="FAILED")
        return 2
    print(f"[train] done: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
