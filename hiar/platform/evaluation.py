"""Running an evaluation: the Ray Data actor pool over (prompt, seed) items, the summary, the MLflow run.

``hiar.jobs.evaluate`` runs one from the command line; ``hiar.jobs.promote`` runs the challenger's and the champion's
in-process. One Ray Data item per (prompt, seed) -> ``map_batches`` on an actor pool of :class:`EvalActor` (each
loads the bundle once); the driver summarises the rows (``hiar.eval.summary``) and logs one run of experiment
``hiar-eval`` tagged with the plan's identities (:data:`IDENTITY_TAG`, :data:`CHECKSUM_TAG`,
:data:`GENERATION_TAG`), so that :func:`find_existing` finds it again instead of recomputing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tempfile
import time
from pathlib import Path

from hiar.eval.summary import summarize, summary_table
from hiar.platform.evaluation_plan import EvalPlan
from hiar.platform.progress import report
from hiar.platform.ray_cluster import init_ray
from hiar.platform.tracking import flatten, log_video, new_run, resumed_run

EXPERIMENT = "hiar-eval"
IDENTITY_TAG = "hiar.eval_identity"
CHECKSUM_TAG = "hiar.model_checksum"
GENERATION_TAG = "hiar.generation_hash"
NAME_TAG = "hiar.model_name"
VERSION_TAG = "hiar.model_version"
URI_TAG = "hiar.model_uri"
SAMPLES_TAG = "hiar.per_sample"  # the per-sample artifact's format version, on runs that logged it
SAMPLES_FORMAT = "1"
SAMPLES_ARTIFACT = "per_sample.json"
ORACLE_KEYS = ("caption_consistency", "motion_accuracy", "color_ok", "direction_ok", "background_ok",
               "shape_present", "shape_ok", "speed_ok", "motion", "static", "mean_saturation")


def _print(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------- actor side
def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class EvalActor:
    """A Ray Data actor holding one generator; each call evaluates a batch of (prompt, seed) items in every mode."""

    def __init__(self, bundle_path: str, gen_config: dict, modes: list[str], num_blocks: int, segments: int,
                 use_oracle: bool, weights_dir: str | None, threads: int = 1, use_gpu: bool = False):
        import torch

        from hiar.io.bundle import config_from_dict, load_bundle, runtime_dtypes
        from hiar.eval.learned import learned_scorers

        torch.set_num_threads(max(1, int(threads)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.cfg = config_from_dict(gen_config)
        self.bundle = load_bundle(bundle_path, device=self.device, dtypes=runtime_dtypes(self.cfg, self.device))
        self.modes, self.num_blocks, self.segments = list(modes), int(num_blocks), int(segments)
        self.use_oracle = use_oracle
        # built once: learned scorers load their weights lazily and cache them per instance
        self.scorers = learned_scorers(weights_dir, self.device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from hiar.tiny import oracle
        from hiar.eval.drift import drift_report
        from hiar.core.generation import generate_frames
        from hiar.io.video import to_uint8

        t0 = time.monotonic()
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        results: list[dict] = [{} for _ in prompts]
        frames_out: list[dict] = [{} for _ in prompts]
        for mode in self.modes:
            frames = generate_frames(self.bundle, prompts, seeds, self.num_blocks, mode, cfg=self.cfg)
            for i, (video, prompt) in enumerate(zip(frames, prompts)):
                report = drift_report(video, self.cfg.video.fps, self.segments, scorers=self.scorers,
                                      prompt=prompt)  # the prompt: text-video alignment (clip_text)
                entry = {"report": dataclasses.asdict(report)}
                if self.use_oracle:
                    scores = oracle.score_batch([(video, prompt)])
                    entry["oracle"] = {k: float(scores[k]) for k in ORACLE_KEYS if k in scores}
                results[i][mode] = entry
                if bool(batch["sample"][i]):
                    frames_out[i][mode] = to_uint8(video)
        blobs = []
        for f in frames_out:
            if f:
                buf = io.BytesIO()
                np.savez_compressed(buf, **f)
                blobs.append(buf.getvalue())
            else:
                blobs.append(b"")
        seconds = (time.monotonic() - t0) / max(1, len(prompts))
        return {"index": [int(i) for i in batch["index"]], "prompt": prompts, "seed": seeds,
                "result": [json.dumps(r, default=_jsonable) for r in results], "frames": blobs,
                "seconds": [seconds] * len(prompts)}


# ---------------------------------------------------------------------------------------------- driver side
def find_existing(plan: EvalPlan):
    """A FINISHED ``hiar-eval`` run of the same weights (checksum) and generation config under the same settings
    (identity), or None."""
    import mlflow
    from mlflow import MlflowClient

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{IDENTITY_TAG}` = '{plan.identity()}' and tags.`{CHECKSUM_TAG}` = '{plan.checksum}' "
                      f"and tags.`{GENERATION_TAG}` = '{plan.generation_hash()}' and attributes.status = 'FINISHED' "
                      f"and tags.`{SAMPLES_TAG}` = '{SAMPLES_FORMAT}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _result(plan: EvalPlan, run_id: str, metrics: dict, reused: bool) -> dict:
    """The fields of ``hiar.jobs.results.EvaluationResult`` (this layer returns plain dicts: the typed results
    belong to the jobs above it)."""
    return {"run_id": run_id, "model_uri": plan.model_uri, "model_name": plan.model_name,
            "version": plan.model_version, "checksum": plan.checksum, "eval_identity": plan.identity(),
            "modes": plan.modes, "reused": reused, "metrics": metrics}


def run_evaluation(plan: EvalPlan, parent_run_id: str | None = None, run_name: str | None = None,
                   reuse: bool = False, log=_print, progress_task: str = "evaluate") -> dict:
    """Run (or, with ``reuse``, find) the evaluation; returns the fields of an ``EvaluationResult``. Videos done are
    reported as progress of ``progress_task``."""
    import mlflow

    if reuse:
        found = find_existing(plan)
        if found is not None:
            log(f"[evaluate] reusing finished evaluation run {found.info.run_id} (same weights {plan.checksum}, "
                f"same settings {plan.identity()})")
            return _result(plan, found.info.run_id, dict(found.data.metrics), True)

    import ray

    from hiar.io.storage import storage_env

    init_ray()
    e = plan.eval_settings
    items = plan.items()
    batch_size = max(1, min(int(e["batch_size"]), len(items)))
    log(f"[evaluate] {plan.model_uri} (version {plan.model_version or '-'}, {plan.bundle_path}): "
        f"{len(plan.prompts)} prompts x {len(plan.seeds)} seeds = {len(items)} videos of {plan.latent_frames} latent "
        f"frames ({plan.num_blocks} blocks) in modes {plan.modes}, {e['actors']} actor(s)")
    t0 = time.monotonic()
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = ds.map_batches(
        EvalActor,
        fn_constructor_kwargs={"bundle_path": plan.bundle_path, "gen_config": plan.gen_config, "modes": plan.modes,
                               "num_blocks": plan.num_blocks, "segments": plan.segments, "use_oracle": plan.use_oracle,
                               "weights_dir": plan.weights_dir, "threads": e["threads_per_actor"],
                               "use_gpu": e["gpus_per_actor"] > 0},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=int(e["actors"])),
        num_cpus=float(e["cpus_per_actor"]),
        num_gpus=float(e["gpus_per_actor"]),
        runtime_env={"env_vars": storage_env()},  # scorer weights on s3:// are fetched by the actors
    )
    rows = []
    report(progress_task, 0, len(items), "videos")
    for row in ds.iter_rows():
        rows.append(row)
        report(progress_task, len(rows), len(items), "videos")
    seconds = time.monotonic() - t0
    if len(rows) != len(items):
        raise RuntimeError(f"evaluation returned {len(rows)} results for {len(items)} items")
    metrics, reports, samples, table = summarize(rows, plan.modes)
    metrics["eval/seconds"] = seconds
    metrics["eval/videos_per_s"] = len(items) / seconds if seconds > 0 else 0.0
    metrics["eval/latent_frames"] = float(plan.latent_frames)

    tags = {IDENTITY_TAG: plan.identity(), CHECKSUM_TAG: plan.checksum, GENERATION_TAG: plan.generation_hash(),
            URI_TAG: plan.model_uri, SAMPLES_TAG: SAMPLES_FORMAT}
    if plan.model_name:
        tags.update({NAME_TAG: plan.model_name, VERSION_TAG: str(plan.model_version)})
    name = run_name or f"eval-{plan.model_name + '-v' + str(plan.model_version) if plan.model_name else Path(plan.bundle_path).name}"
    run = new_run(EXPERIMENT, name, parent_run_id, tags)
    gen = plan.gen_config
    params = {"model_uri": plan.model_uri, "model_name": plan.model_name or "", "model_version": plan.model_version or "",
              "model_path": plan.bundle_path, "model_checksum": plan.checksum, "eval_identity": plan.identity(),
              "latent_frames": plan.latent_frames, "num_blocks": plan.num_blocks, "num_prompts": len(plan.prompts),
              "rollout_overrides": ",".join(plan.rollout_overrides),
              **flatten({"eval": e, "generation": {"rollout": gen["rollout"], "schedule": gen["schedule"],
                                                   "video": gen["video"]}})}
    skipped = {m: r.skipped for m, r in reports.items() if r.skipped}
    with resumed_run(run.info.run_id):
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        if skipped:
            mlflow.set_tag("drift.skipped", json.dumps(skipped)[:5000])
        with tempfile.TemporaryDirectory() as tmp:
            from hiar.eval.plots import plot_segments

            mlflow.log_artifact(str(plot_segments(reports, Path(tmp) / "drift_segments.png")), "plots")
        for mode, frames in samples.items():
            log_video(frames, f"{mode}.mp4", "samples", plan.fps, columns=min(4, len(frames)),
                      upscale=max(1, 64 // frames.shape[2]))
        mlflow.log_dict({"prompts": plan.prompts, "seeds": plan.seeds}, "prompts.json")
        mlflow.log_dict(table, SAMPLES_ARTIFACT)
        result = _result(plan, run.info.run_id, metrics, False)
        mlflow.log_dict({**result, "skipped": skipped}, "eval.json")
    log(f"[evaluate] done in {seconds:.1f} s ({metrics['eval/videos_per_s']:.2f} videos/s); MLflow run "
        f"{run.info.run_id}\n" + summary_table(metrics, plan.modes))
    return result


def load_sample_values(run_id: str) -> dict:
    """The per-sample table an evaluation run logged (:data:`SAMPLES_ARTIFACT`); ``FileNotFoundError`` for a run
    without one (from before per-sample values were kept)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{SAMPLES_ARTIFACT}")
    except (MlflowException, OSError) as err:
        raise FileNotFoundError(f"evaluation run {run_id} has no {SAMPLES_ARTIFACT}: {err}") from None


def skip_reasons(run_ids, mode: str) -> dict:
    """``{scorer: why it was skipped}`` in rollout mode ``mode``, from evaluation runs' ``drift.skipped`` tags."""
    from mlflow import MlflowClient

    client = MlflowClient()
    reasons: dict = {}
    for run_id in run_ids:
        try:
            reasons.update(json.loads(client.get_run(run_id).data.tags.get("drift.skipped") or "{}").get(mode, {}))
        except (ValueError, AttributeError):  # a tag cut at 5000 characters: the gate words it without the reason
            pass
    return reasons
