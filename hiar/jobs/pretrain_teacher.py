"""Ray Train job: flow-matching pretraining of the tiny teacher on the synthetic world.

    python -m hiar.jobs.pretrain_teacher --preset tiny --output hiar/assets/tiny-teacher --set pretrain.max_minutes=30

The logic is ``hiar.methods.pretrain``; this file wires it into a ``TorchTrainer`` (CPU workers, DDP over gloo when
``pretrain.num_workers > 1``), checkpoints every ``pretrain.checkpoint_every`` steps, and logs to MLflow from rank 0
(the run id travels in the checkpoint, so a resumed job keeps writing to the same run). Rerunning the same command
resumes from the last checkpoint: the Ray run name is derived from the config hash. Training time is counted
without evaluation time; evaluations (held-out prompts, oracle scores, an MP4) happen every
``pretrain.eval_every_minutes`` of training and give the time-to-quality curve written to the model card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hiar.identity import identity
from hiar.io.storage import portable_path, resolve_path
from hiar.jobs.results import TeacherResult, write_result
from hiar.platform.ray_cluster import init_ray
from hiar.platform.tracking import flatten, mlflow_experiment, tracking_uri
from hiar.platform.training import WorkerSession, fit

EXPERIMENT = "hiar-teacher"
PROGRESS_TASK = "pretrain_teacher"


def train_loop_per_worker(loop_config: dict) -> None:
    import mlflow
    import ray.train
    import torch
    import torch.distributed as dist

    from hiar.config import load_config
    from hiar.methods.pretrain import TeacherPretraining, build_world_components, count_params, time_budget_left
    from hiar.methods.parallel import collective_device

    cfg = load_config(loop_config["preset"], loop_config["overrides"])
    session = WorkerSession(PROGRESS_TASK)
    rank, world_size = session.rank, session.world_size
    torch.set_num_threads(cfg.pretrain.threads_per_worker or max(1, (os.cpu_count() or 2) // world_size))

    world, text, codec = build_world_components(cfg)
    wrap = ray.train.torch.prepare_model if world_size > 1 else (lambda m: m)
    trainer = TeacherPretraining(cfg, world, text, codec, rank=rank, world_size=world_size, wrap_model=wrap)

    # the MLflow run id travels in the checkpoint, so a resumed job keeps writing to the same run
    meta = {"run_id": None, "curve": [], "next_eval": cfg.pretrain.eval_every_minutes}

    def load(directory: Path) -> None:
        trainer.load_state_dict(torch.load(directory / "state.pt", weights_only=False))
        meta.update(json.loads((directory / "meta.json").read_text()))

    if session.resume(load):
        print(f"[pretrain] rank {rank}: resumed at step {trainer.step} ({trainer.elapsed / 60:.1f} min trained)")
    elif loop_config["init_from"]:
        trainer.init_from(loop_config["init_from"])
        print(f"[pretrain] rank {rank}: initialised from {loop_config['init_from']}")

    meta["run_id"] = session.start_tracking(
        loop_config["tracking_uri"], run_id=meta["run_id"], experiment_id=loop_config["experiment_id"],
        run_name=loop_config["run_name"],
        params={**flatten(cfg.to_dict()), "teacher.params": count_params(trainer.raw)}) or meta["run_id"]

    def evaluate_and_log() -> dict:
        scores, frames, prompts = trainer.evaluate()
        minutes = trainer.elapsed / 60.0
        point = {"minutes": round(minutes, 2), "step": trainer.step, **{k: float(v) for k, v in scores.items()}}
        meta["curve"].append(point)
        mlflow.log_metrics({f"eval/{k}": float(v) for k, v in scores.items()}, step=trainer.step)
        session.log_video(frames, f"samples_step{trainer.step:06d}.mp4", "samples", cfg.video.fps, columns=4,
                          upscale=4)
        print(f"[pretrain] eval at {minutes:.1f} min, step {trainer.step}: caption_consistency="
              f"{scores['caption_consistency']:.3f} background_ok={scores['background_ok']:.3f} "
              f"color_ok={scores['color_ok']:.3f} direction_ok={scores['direction_ok']:.3f} "
              f"motion_accuracy={scores['motion_accuracy']:.3f}", flush=True)
        return point

    def keep_going(started: float) -> bool:
        flag = torch.tensor([1.0 if time_budget_left(trainer, started) else 0.0])
        if dist.is_available() and dist.is_initialized():
            flag = flag.to(collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank stops at the same step
        return bool(flag.item())

    def save(directory: Path) -> None:
        torch.save(trainer.state_dict(), directory / "state.pt")
        (directory / "meta.json").write_text(json.dumps(meta))

    def save_checkpoint(loss: float) -> None:
        # the model is replicated (DDP): rank 0's state is the whole checkpoint
        session.report({"step": trainer.step, "loss": loss}, save, every_rank_saves=False)

    started = time.monotonic()
    window_t0, window_steps = time.monotonic(), 0
    metrics = {"loss": float("nan")}
    max_steps = cfg.pretrain.max_steps or None  # the time budget may end training first
    session.progress(trainer.step, max_steps)
    while keep_going(started):
        metrics = trainer.train_step()
        window_steps += 1
        session.progress(trainer.step, max_steps)
        if trainer.step % 10 == 0:
            session.log_metrics({**metrics, "steps_per_s": window_steps / (time.monotonic() - window_t0)},
                                step=trainer.step)
            window_t0, window_steps = time.monotonic(), 0
        if trainer.step % cfg.pretrain.checkpoint_every == 0:
            trainer.elapsed += time.monotonic() - started
            started = time.monotonic()
            if rank == 0 and trainer.elapsed / 60.0 >= meta["next_eval"]:
                evaluate_and_log()
                meta["next_eval"] = trainer.elapsed / 60.0 + cfg.pretrain.eval_every_minutes
                started = time.monotonic()  # evaluation time is not training time
            save_checkpoint(metrics["loss"])
            print(f"[pretrain] step {trainer.step} loss {metrics['loss']:.4f} "
                  f"({trainer.elapsed / 60:.1f} min trained)", flush=True)
    trainer.elapsed += time.monotonic() - started
    session.progress(trainer.step, trainer.step)  # done, whichever budget ended it
    if trainer.step % cfg.pretrain.checkpoint_every:
        save_checkpoint(metrics["loss"])  # the last steps too, so a longer budget resumes exactly here

    if rank == 0:
        final = evaluate_and_log()
        card = {
            "preset": cfg.preset, "seed": cfg.seed, "steps": trainer.step,
            "train_minutes": round(trainer.elapsed / 60.0, 2), "params": count_params(trainer.raw),
            "config": cfg.to_dict(), "oracle": {k: v for k, v in final.items() if k not in ("minutes", "step")},
            "curve": meta["curve"], "mlflow_run_id": meta["run_id"],
            "sampler": {"num_steps": cfg.pretrain.eval_num_steps, "shift": cfg.teacher.shift,
                        "guidance_scale": cfg.teacher.guidance_scale, "eval_prompts": cfg.pretrain.eval_prompts},
        }
        out = trainer.save_teacher(loop_config["output"], card)
        mlflow.log_artifacts(str(out), "teacher")
        print(f"[pretrain] saved teacher to {out}: {trainer.step} steps, {trainer.elapsed / 60:.1f} min, "
              f"held-out caption consistency {final['caption_consistency']:.3f}", flush=True)
    session.finish()


def training_identity(cfg) -> str:
    """Identity of what determines the trained weights, without the budget: raising ``pretrain.max_minutes`` (or
    ``max_steps``) and rerunning continues the same run from its last checkpoint instead of starting over."""
    d = cfg.identity_view("seed", "model", "video", "world", "pretrain", "rollout")  # added keys at neutral: left out
    for key in ("max_minutes", "max_steps"):
        d["pretrain"].pop(key)
    d["pretrain"]["init_from"] = portable_path(d["pretrain"]["init_from"])
    return identity(d)


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--output", default=None, help="where the trained teacher goes (default: teacher.path)")
    parser.add_argument("--output-json", default=None,
                        help="write the TeacherResult (hiar.jobs.results) here when training succeeds")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    if cfg.preset != "tiny" and not cfg.teacher.path.startswith("assets/"):
        parser.error("teacher pretraining exists for the tiny preset only; Wan teachers are loaded from teacher.path")
    output = resolve_path(args.output or cfg.teacher.path or "hiar/assets/tiny-teacher")
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
        probe = Path(output) / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        parser.error(f"cannot write the teacher to {output!r}: {err}")
    init_from = resolve_path(cfg.pretrain.init_from) if cfg.pretrain.init_from else ""
    if init_from and not Path(init_from).exists():
        from hiar.methods.pretrain import missing_init_from

        parser.error(missing_init_from(cfg.pretrain.init_from))

    run_dir = resolve_path(cfg.run_dir)
    experiment_id = mlflow_experiment(EXPERIMENT, run_dir)
    name = f"pretrain-teacher-{training_identity(cfg)}"
    init_ray()
    workers = cfg.pretrain.num_workers
    result = fit(
        train_loop_per_worker,
        {"preset": args.preset, "overrides": args.overrides, "output": output,
         "tracking_uri": tracking_uri(run_dir), "experiment_id": experiment_id, "run_name": name,
         "init_from": init_from},
        name=name, storage_path=str(Path(run_dir, "ray").resolve()), num_workers=workers,
        cpus_per_worker=1.0 / workers, keep_checkpoints=2, max_failures=2,
    )
    if result.error:
        print(f"error: teacher pretraining failed: {result.error}", file=sys.stderr)
        return 1
    print(f"[pretrain] done: {result.metrics}")
    card = json.loads((Path(output) / "card.json").read_text())
    write_result(args.output_json, TeacherResult(bundle=output, steps=int(card["steps"]),
                                                 caption_consistency=card["oracle"].get("caption_consistency"),
                                                 run_id=card.get("mlflow_run_id")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
