"""Ray Train job: ODE-regression init of the causal student, then HiAR distillation (DMD + forward KL).

    python -m hiar.jobs.train --preset tiny --stage ode_init
    python -m hiar.jobs.train --preset tiny --stage distill [--set distill.rollout=block_first]
    python -m hiar.jobs.train --preset tiny --stage all

The maths is ``hiar.methods.distill``; this file wires it into a ``TorchTrainer`` per stage:

* data: the ``ode_pairs`` / ``trajectories`` Parquet datasets (local or ``s3://``, ``data.storage``) through
  Ray Data, a fixed part of the dataset per worker (``hiar.platform.training.dataset_parts``), so a rerun
  repeats its weights;
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
import time
from pathlib import Path

from hiar.core.rollout import ROLLOUT_MODES
from hiar.identity import identity as content_identity
from hiar.io.checksums import fingerprint_dir
from hiar.io.storage import portable_path, resolve_path
from hiar.jobs.results import TrainResult, write_result
from hiar.methods.datagen import kind_count
from hiar.platform.ray_cluster import init_ray
from hiar.platform.train_inputs import check_dataset, check_models, check_resume_checkpoint
from hiar.platform.tracking import find_or_create_run, flatten, mlflow_experiment, tracking_uri
from hiar.platform.training import WorkerSession, dataset_parts, fit

EXPERIMENT = "hiar-train"
STAGES = ("ode_init", "distill")
DATASET_OF = {"ode_init": "ode_pairs", "distill": "trajectories"}
#: How many samples a stage trains on enters its identity (a dataset's identity names how its samples are made, not
#: how many there are: it grows by sample index). Every identity published before the count entered them (the
#: README's students, the pins in tests/unit/jobs/test_identities.py) trained on the tiny preset's 384 ODE pairs and
#: 64 trajectories, so those counts are left out, as ``hiar.config.added_later`` leaves a new key out at its neutral
#: value: no stored student is renamed, and every other count names its own student.
SAMPLES_LEFT_OUT = {"ode_pairs": 384, "trajectories": 64}
IDENTITY_TAG = "hiar.train_identity"


# ---------------------------------------------------------------------------------------------- worker side
def _batches(session: WorkerSession, dataset_name: str, column: str, micro_batch: int, cache_mb: int):
    """Endless (prompts, states [b, S + 1, C, F, H, W] float32) micro-batches from this worker's dataset shard
    (kept in memory after the first pass when it fits in ``distill.dataset_cache_mb``)."""
    import numpy as np
    import torch

    def log(message: str) -> None:
        if session.rank == 0:
            print(f"[train] {message}", flush=True)

    for prompts, arr in session.shard_batches(dataset_name, column, micro_batch, cache_mb, log):
        # stored [b, S + 1, F, C, H, W] -> the model's [b, S + 1, C, F, H, W]
        yield prompts, torch.from_numpy(np.ascontiguousarray(arr)).float().permute(0, 1, 3, 2, 4, 5).contiguous()


def _sample_and_log(session: WorkerSession, model, text, codec, cfg, step: int, tag: str) -> dict:
    """Rank 0: sample both rollout modes on fixed held-out prompts and seeds; log MP4s and (tiny) oracle scores."""
    import numpy as np

    from hiar.core.generation import generate_latents
    from hiar.methods.pretrain import eval_prompts

    n_blocks = cfg.video.train_latent_frames // cfg.rollout.frames_per_block
    prompts = eval_prompts(cfg.distill.sample_prompts) if cfg.preset == "tiny" else []
    if not prompts:
        return {}
    seeds = list(range(len(prompts)))
    metrics = {}
    was_training = model.training
    model.eval()
    for mode in ROLLOUT_MODES:
        latents = generate_latents(model, text, cfg, prompts, seeds, n_blocks, mode)
        frames = codec.decode(latents).cpu().numpy()
        from hiar.tiny import oracle

        scores = oracle.score_batch(zip(frames, prompts))
        for k in ("caption_consistency", "motion_accuracy", "color_ok", "direction_ok", "background_ok"):
            metrics[f"samples/{mode}/{k}"] = float(scores[k])
        session.log_video(np.asarray(frames), f"{tag}_{mode}_step{step:06d}.mp4", f"samples/{mode}", cfg.video.fps,
                          columns=len(prompts), upscale=4)
    model.train(was_training)
    session.log_metrics(metrics, step=step)
    return metrics


def losses_of(metrics: dict) -> dict:
    """The loss values among a step's metrics (what the bundle card and ``TrainResult.losses`` keep)."""
    return {k: float(v) for k, v in metrics.items() if "loss" in k}


def train_loop_per_worker(c: dict) -> None:
    import mlflow
    import torch

    from hiar.io.bundle import load_bundle, load_text, load_transformer, open_model_dir, runtime_dtypes, save_bundle
    from hiar.config import load_config
    from hiar.methods.distill import Distiller, ODEInit

    cfg = load_config(c["preset"], c["overrides"])
    stage = c["stage"]
    session = WorkerSession(f"train {stage}")
    rank, world_size = session.rank, session.world_size
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
        total, micro = d.ode_steps, d.micro_batch("ode_init")
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
        total, micro = d.steps, d.micro_batch("distill")
    step_of = (lambda: trainer.step) if stage == "ode_init" else (lambda: trainer.generator_steps)
    # the model that is sampled and saved (the student; the EMA generator for distillation) as one plain module:
    # with distill.sharding=fsdp gathering it is a collective (every rank calls, rank 0 gets it, others None)
    model_of = trainer.export_model

    print(f"[train:{stage}] rank {rank}/{world_size} pid {os.getpid()} on {device}", flush=True)
    if session.resume(trainer.load_checkpoint):
        print(f"[train:{stage}] rank {rank}: resumed from checkpoint at step {step_of()}", flush=True)
    elif stage == "distill" and c.get("resume_from"):
        trainer.load_checkpoint(session.fetch_once_per_node(c["resume_from"], "distill.resume_from"))
        print(f"[train:{stage}] rank {rank}: resumed from checkpoint at step {step_of()} "
              f"(distill.resume_from {c['resume_from']})", flush=True)

    if rank == 0:
        from hiar.io.bundle import load_model_codec

        codec = load_model_codec(teacher_dir, device, dtypes["vae"])  # rank 0 decodes the sample videos
    session.start_tracking(c["tracking_uri"], run_id=c["run_id"])

    def report(metrics: dict) -> None:
        # each rank writes its part of one sharded checkpoint (torch.distributed.checkpoint: its shards; rank 0 also
        # the metadata); Ray Train merges them under RunConfig.storage_path, and it loads with any worker count
        # each checkpoint names this run, so a run resumed from it (distill.resume_from) is named after it
        session.report({"step": step_of(), **metrics},
                       lambda path: trainer.save_checkpoint(path, run=c["identity"]))

    batches = _batches(session, DATASET_OF[stage], "latents" if stage == "ode_init" else "states", micro,
                       d.dataset_cache_mb)
    t0, steps0 = time.monotonic(), step_of()
    every = d.ode_checkpoint_every if stage == "ode_init" else d.checkpoint_every
    metrics: dict = {}
    session.progress(steps0, total)
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
        session.progress(step, total)
        if rank == 0 and (step % 5 == 0 or step == total):
            rate = (step - steps0) / max(1e-9, time.monotonic() - t0)
            session.log_metrics({**metrics, "steps_per_s": rate}, step=step)
            print(f"[train:{stage}] step {step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                                  if isinstance(v, float)), flush=True)
        if d.sample_every and step % d.sample_every == 0 and step < total:
            model = model_of()
            if rank == 0:
                _sample_and_log(session, model, text, codec, cfg, step, stage)
        if step % every == 0 or step == total:
            report({k: float(v) for k, v in metrics.items()})
            if rank == 0:
                print(f"[train:{stage}] checkpoint at step {step}", flush=True)

    final_model = model_of()
    if rank == 0:
        final = _sample_and_log(session, final_model, text, codec, cfg, step_of(), stage)
        card = {"preset": cfg.preset, "seed": cfg.seed, "steps": step_of(), "stage": stage,
                "rollout": d.rollout, "source_run": c["run_id"], "identity": c["identity"], "samples": final,
                "losses": losses_of(metrics),  # the driver's TrainResult reads them here
                # as identities write them: a job runs from Ray's copy of the checkout, so the shipped teacher's
                # resolved path is a session directory that is gone once the cluster stops
                "teacher": portable_path(c["teacher"]),
                "real_score": portable_path(c.get("real_score") or c["teacher"]), "init": c.get("init", "")}
        # the text encoder and codec are the teacher's: referenced by hash, stored once under the run directory;
        # the bundle is logged as a model once, when it is registered (hiar/jobs/promote.py register)
        out = save_bundle(c["output"], final_model, text, codec, card, cfg, title=f"HiAR student ({stage})",
                          summary=f"Causal Wan-architecture generator after `{stage}` "
                                  f"({d.rollout} self-rollout)." if stage == "distill" else
                                  "Causal student after ODE-regression init.",
                          shared=teacher_dir, store=c["component_store"])
        mlflow.log_dict(card, "card.json")
        print(f"[train:{stage}] saved {out} after {step_of()} steps; samples: "
              + " ".join(f"{k}={v:.3f}" for k, v in final.items()), flush=True)
    session.finish()


# ---------------------------------------------------------------------------------------------- driver side
def stage_identity(cfg, stage: str, inputs: dict) -> str:
    """Identity of what determines a stage's weights (config sections + input checksums), not its logging.

    Config keys enter as ``HiarConfig.identity_view`` gives them (a key added later is left out at its neutral
    value), and model paths as ``portable_path`` writes them, so the same command names the same student in any
    checkout: ``hiar/assets/tiny-teacher`` and ``/home/me/hiar/hiar/assets/tiny-teacher`` are one teacher."""
    dd = cfg.identity_view("seed", "model", "schedule", "rollout", "video", "teacher", "distill")
    dd["teacher"].update(path=portable_path(dd["teacher"]["path"]),
                         real_score_path=portable_path(dd["teacher"]["real_score_path"]))
    distill = dd["distill"]  # without its run settings (workers, checkpoints, sampling: hiar.config.run_setting)
    # the ODE init's micro batch under its old name, whichever key set it (a distillation has it in inputs["init"])
    distill.pop("ode_micro_batch_size", None)
    if stage == "ode_init":
        distill = {**{k: distill[k] for k in ("ode_steps", "lr_ode", "ode_batch_size", "betas", "grad_clip")},
                   "micro_batch_size": cfg.distill.micro_batch("ode_init")}
    count = kind_count(cfg, DATASET_OF[stage])  # the first that many samples of its dataset (run_stage reads them)
    if count != SAMPLES_LEFT_OUT[DATASET_OF[stage]]:
        inputs = {**inputs, "samples": count}
    keep = {"stage": stage, **dd, "distill": distill, "inputs": inputs}
    return content_identity(keep)


def plan_stage(cfg, stage: str, storage: str, teacher: str, init: str | None, output: str | None = None) -> dict:
    """Inputs checked, identity and output directory of a stage (no compute): errors come before training."""
    from hiar.io.bundle import check_model_config, open_model_dir

    cfg.distill.accumulation_steps(stage, cfg.distill.num_workers)  # a worker would find it after start-up
    kind = DATASET_OF[stage]
    uri = f"{storage.rstrip('/')}/{kind}"
    manifest, samples = check_dataset(cfg, kind, uri)
    _, real_dir = check_models(cfg, teacher)
    inputs = {"data": manifest["identity"], "teacher": manifest.get("teacher_checksum")}
    resume_from = ""
    if stage == "distill":
        card_path = Path(init or "") / "card.json"
        if not init or not card_path.exists():
            raise ValueError(f"no ODE-init student at {init!r}; run `--stage ode_init` first or pass --init")
        inputs["init"] = json.loads(card_path.read_text()).get("identity")
        check_model_config(open_model_dir(init, "--init"), cfg, key="--init")
        if real_dir is not None:  # its weights, not only its path: a real score retrained in place renames
            inputs["real_score"] = fingerprint_dir(real_dir.transformer)
        if cfg.distill.resume_from:
            resume_from, inputs["resume_from"] = check_resume_checkpoint(cfg, resolve_path(cfg.distill.resume_from))
    identity = stage_identity(cfg, stage, inputs)
    out = Path(output) if output else Path(resolve_path(cfg.run_dir)) / "students" / f"{stage}-{identity}"
    card = out / "card.json"
    done = card.exists() and json.loads(card.read_text()).get("identity") == identity
    return {"kind": kind, "uri": uri, "manifest": manifest, "samples": samples, "identity": identity, "output": out,
            "done": done, "resume_from": resume_from}


def run_stage(cfg, args, stage: str, storage: str, teacher: str, init: str | None, experiment_id: str,
              parent_run_id: str | None) -> Path:
    from hiar.io.storage import TENSOR_COLUMN

    plan = plan_stage(cfg, stage, storage, teacher, init, args.output if stage == args.stages[-1] else None)
    kind, uri, samples, identity, output = (plan[k] for k in ("kind", "uri", "samples", "identity", "output"))
    run_dir = Path(resolve_path(cfg.run_dir))
    name = f"{stage}-{identity}"
    if plan["done"]:
        print(f"[train] {stage}: {output} already holds this stage's result (identity {identity}); skipping",
              flush=True)
        return output

    init_ray()  # only a stage that trains joins the cluster: a rerun whose every stage is done needs none
    run_id, resumed = find_or_create_run(experiment_id, IDENTITY_TAG, identity, name, parent_run_id,
                                         flatten(cfg.to_dict()))
    print(f"[train] {stage}: {kind} from {uri} ({samples.count} samples), teacher {teacher}, "
          f"MLflow run {run_id}{' (resumed)' if resumed else ''}, output {output}", flush=True)

    column = TENSOR_COLUMN[kind]
    d = cfg.distill
    parts = dataset_parts(uri, samples, ["prompt", column], d.num_workers)
    storage_path = d.storage_path or str(run_dir / "train")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    result = fit(
        train_loop_per_worker,
        {"preset": args.preset, "overrides": args.overrides, "stage": stage, "teacher": teacher,
                           "init": init, "output": str(output), "tracking_uri": tracking_uri(str(run_dir)),
                           "real_score": resolve_path(cfg.teacher.real_score_path) if cfg.teacher.real_score_path else "",
                           "component_store": str(run_dir / "components"),
                           "resume_from": plan["resume_from"],  # a checkpoint (a run directory's latest)
                           "run_id": run_id, "identity": identity},
        name=name, storage_path=storage_path, num_workers=d.num_workers, use_gpu=d.use_gpu,
        cpus_per_worker=d.cpus_per_worker, keep_checkpoints=d.keep_checkpoints, max_failures=d.max_failures,
        datasets={kind: parts},
    )
    if result.error:
        raise RuntimeError(f"{stage} failed: {result.error}")
    if not (output / "card.json").exists():
        raise RuntimeError(f"{stage} finished but wrote no model to {output}")
    return output


def stage_result(output: Path) -> TrainResult:
    """What a finished stage hands on, from its bundle's card (rank 0 wrote the last losses there)."""
    card = json.loads((Path(output) / "card.json").read_text())
    return TrainResult(stage=card["stage"], output=str(output), identity=card["identity"], steps=int(card["steps"]),
                       losses=card.get("losses", {}), run_id=card.get("source_run"))


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--stage", default="all", choices=[*STAGES, "all"])
    parser.add_argument("--init", default=None, help="ODE-init student bundle for --stage distill "
                                                     "(default: this config's ode_init output)")
    parser.add_argument("--output", default=None, help="where the last stage's model bundle goes")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run (full.py passes its own)")
    parser.add_argument("--output-json", default=None,
                        help="write the last stage's TrainResult (hiar.jobs.results) here when it succeeds")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    args.stages = list(STAGES) if args.stage == "all" else [args.stage]

    import mlflow

    run_dir = resolve_path(cfg.run_dir)
    storage = cfg.data.storage or str(Path(run_dir) / "data")
    teacher = resolve_path(cfg.teacher.path)
    try:
        init = args.init
        if args.stage == "distill" and init is None:
            init = str(plan_stage(cfg, "ode_init", storage, teacher, None)["output"])
        # the first stage's inputs (data, teacher, init, resume checkpoint) and every stage's dataset, checked before
        # MLflow or Ray start (Ray: only for a stage that trains, run_stage): a bad input fails in seconds, with
        # nothing created
        plan_stage(cfg, args.stages[0], storage, teacher, init)
        for stage in args.stages[1:]:
            check_dataset(cfg, DATASET_OF[stage], f"{storage.rstrip('/')}/{DATASET_OF[stage]}")  # raises if unfit
        experiment_id = mlflow_experiment(EXPERIMENT, run_dir)
        parent = args.parent_run_id
        own_parent = None
        if parent is None:
            own_parent = mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{args.stage}")
            parent = own_parent.info.run_id
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
    write_result(args.output_json, stage_result(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
