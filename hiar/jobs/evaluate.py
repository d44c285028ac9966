"""Ray Data job: the paper's drift suite on long rollouts of one generator, logged to MLflow.

    python -m hiar.jobs.evaluate --preset tiny --model models:/hiar-student@champion
    python -m hiar.jobs.evaluate --preset tiny --model runs/students/distill-abc123 --set eval.num_prompts=16

What is evaluated.  ``--model`` is a registry URI (``models:/name@alias``, ``models:/name/N``), a ``runs:/`` URI
or a local bundle directory; registry URIs are pinned to one version and downloaded once, driver-side, into
``<run_dir>/model-cache`` (actors get the local path: on a multi-node cluster ``run_dir`` must be shared storage).
Rollouts run at ``video.eval_horizon_factor x video.train_latent_frames`` latent frames (the paper: train on 5 s,
evaluate at 20 s) in every mode of ``eval.rollouts`` (``hierarchical`` and ``block_first``), over the held-out
prompts (``hiar.methods.pretrain.eval_prompts``: tiny world; or the first ``eval.num_prompts`` of the held-out split of
``data.prompts``, ``hiar.io.prompts``, which training never sees) x ``eval.seeds``.  Generation uses the model's own
``hiar_config.yaml`` (schedule, rollout, geometry); ``--set rollout.*`` overrides are applied on top of it (the
paper's t_c ablations), every other ``--set`` is about the evaluation itself.

How.  One Ray Data item per (prompt, seed) -> ``map_batches`` on an actor pool (``eval.actors`` actors with
``eval.cpus_per_actor`` -- fractional, DESIGN §8 -- and ``eval.gpus_per_actor``); each actor loads the bundle
once and, per batch of ``eval.batch_size`` items, generates each mode, computes ``hiar.eval.drift.drift_report``
(per-segment values, per-metric slopes, Drift Score, VBench dynamics) and, for the tiny world, the oracle scores;
the first ``eval.sample_videos`` items also send back their frames (uint8).

Logged (experiment ``hiar-eval``; nested under ``--parent-run-id``): params = model URI, resolved name/version,
checksum and the evaluation config; metrics ``<mode>/drift/*`` (score, per-metric slopes, normalised slopes,
degradations, per-segment values), ``<mode>/dynamics/*``, ``<mode>/alignment/*`` (CLIP text-video alignment with the
prompt, when ``clip/`` weights are given), ``<mode>/oracle/*`` (the tiny preset only); artifacts
``plots/drift_segments.png`` (per-segment curves, one line per mode), ``samples/<mode>.mp4``, ``prompts.json``
and ``eval.json``.  Tags ``hiar.eval_identity`` (hash of everything that determines the numbers except the
weights) and ``hiar.model_checksum`` let ``--reuse`` (and ``promote.py``) find a finished evaluation of the same
weights under the same settings instead of recomputing it.

Noise.  Every one of those metrics is a mean over the ``n = eval/num_videos`` (prompt, seed) samples, and each
carries its standard error ``<key>_se`` (sample standard deviation / sqrt(n), ``hiar.eval.gate.mean_se``; absent for
n = 1) -- plus ``<key>_n`` when fewer samples had a value (a scorer that failed on some videos).  The per-sample
values themselves are the artifact ``per_sample.json`` (``{"keys": [[prompt, seed], ...], "values": {metric key:
[one value per key, null where none]}}``, :func:`sample_values`): the gate pairs the challenger's and the
champion's samples by (prompt, seed) (``hiar.eval.gate``).  Only runs that have it (tag ``hiar.per_sample``) are
reused.

Errors about the model (unknown directory, alias or version, not a bundle) or the settings come before any
compute: ``error: ...`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from hiar.platform.tracking import flatten, tracking_uri
from hiar.platform.ray_cluster import init_ray
from hiar.io.storage import resolve_path

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
NOT_MEANS = ("drift/num_metrics",)  # per-sample values that are counts, reported as such: no standard error
ORACLE_KEYS = ("caption_consistency", "motion_accuracy", "color_ok", "direction_ok", "background_ok",
               "shape_present", "shape_ok", "speed_ok", "motion", "mean_saturation")
SUMMARY_KEYS = ("drift/score", "drift/num_metrics", "drift/saturation_slope", "drift/sharpness_slope",
                "drift/pixel_similarity_slope", "dynamics/dynamic_degree", "dynamics/magnitude_mean",
                "alignment/clip_text", "oracle/caption_consistency", "oracle/motion_accuracy")


def _print(*args) -> None:
    print(*args, flush=True)


class EvalInputError(ValueError):
    """A problem with the model or the settings, found before any compute (exit code 2)."""


# ---------------------------------------------------------------------------------------------- MLflow helpers
def setup_tracking(run_dir: str) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI (a server) or the SQLite store under ``run_dir``; returns the URI."""
    import mlflow

    uri = tracking_uri(resolve_path(run_dir))
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """Create/get an experiment on the current tracking URI.  With the SQLite default its artifacts live next to
    the database (``<run_dir>/mlartifacts``, like ``hiar.platform.tracking.mlflow_experiment``), never in the cwd;
    decided from the URI itself, because MLflow exports MLFLOW_TRACKING_URI once it has been set."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 - created concurrently by another job
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def new_run(experiment: str, run_name: str, parent_run_id: str | None, tags: dict | None = None):
    """A new run (nested under ``parent_run_id`` when given, even across experiments)."""
    from mlflow import MlflowClient

    tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return MlflowClient().create_run(experiment_id(experiment), tags=tags, run_name=run_name)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class EvalPlan:
    """Everything an evaluation needs, resolved and checked before any compute."""

    model_uri: str
    bundle_path: str
    checksum: str
    model_name: str | None
    model_version: str | None
    gen_config: dict  # the HiarConfig the rollouts use (the bundle's own, plus --set rollout.*)
    prompts: list[str]
    seeds: list[int]
    modes: list[str]
    latent_frames: int
    num_blocks: int
    segments: int
    fps: int
    use_oracle: bool
    weights_dir: str | None
    eval_settings: dict  # cfg.eval as a dict
    rollout_overrides: list[str] = field(default_factory=list)

    def identity(self) -> str:
        """Hash of everything that determines the numbers except the weights (paired with the checksum)."""
        keep = {"prompts": self.prompts, "seeds": self.seeds, "modes": self.modes, "latent_frames": self.latent_frames,
                "num_blocks": self.num_blocks, "segments": self.segments, "oracle": self.use_oracle,
                "scorer_weights": self.weights_dir or "", "rollout_overrides": sorted(self.rollout_overrides)}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def generation_hash(self) -> str:
        """Hash of the generation config (model, schedule, rollout, video): the bundle's ``hiar_config.yaml`` is not
        part of ``checksum`` (weights only), so equal weights under another rollout are another evaluation."""
        keep = {k: self.gen_config.get(k) for k in ("model", "schedule", "rollout", "video")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def items(self) -> list[dict]:
        """One Ray Data item per (prompt, seed); the first ``sample_videos`` send their frames back."""
        n_samples = int(self.eval_settings.get("sample_videos", 0))
        pairs = [(p, s) for s in self.seeds for p in self.prompts]
        return [{"index": i, "prompt": p, "seed": int(s), "sample": i < n_samples} for i, (p, s) in enumerate(pairs)]


def generation_config(bundle_path: str | Path, fallback, rollout_overrides: list[str]):
    """The bundle's own config (schedule, rollout, geometry it was trained with), else ``fallback``; then the
    ``rollout.*`` overrides."""
    import yaml

    from hiar.io.bundle import CONFIG_FILE, config_from_dict
    from hiar.config import _set_path

    path = Path(bundle_path) / CONFIG_FILE
    data = yaml.safe_load(path.read_text()) if path.exists() else fallback.to_dict()
    for item in rollout_overrides:
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return config_from_dict(data)


def eval_prompt_list(cfg) -> tuple[list[str], bool]:
    """``(prompts, use_oracle)``: with ``data.prompts`` (required for every non-tiny preset), the first
    ``eval.num_prompts`` of its held-out split (``hiar.io.prompts``: never in the training data) and no oracle; the
    tiny preset without it: the tiny world's held-out prompts (``hiar.methods.pretrain.eval_prompts``), which the oracle
    can score."""
    n = cfg.eval.num_prompts
    if n < 1:
        raise EvalInputError(f"eval.num_prompts must be >= 1, got {n}")
    if cfg.data.prompts or cfg.preset != "tiny":
        from hiar.io.prompts import prompt_set

        try:
            return list(prompt_set(cfg).heldout[:n]), False
        except (ValueError, FileNotFoundError) as err:
            raise EvalInputError(str(err)) from None
    from hiar.methods.pretrain import eval_prompts

    return eval_prompts(n, "heldout"), True


def _cache_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:10]


def resolve_model(uri: str, cache_root: Path) -> tuple[Path, str | None, str | None]:
    """``(local bundle dir, registered name, version)``; registry URIs are pinned to a version and downloaded once
    into ``cache_root`` (keyed by tracking URI, name and version: a version's files never change)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from hiar.platform.registry import is_model_uri, model_version_for, resolve_bundle

    if not uri.startswith("models:/"):
        try:
            path = resolve_bundle(uri)
        except FileNotFoundError as err:
            raise EvalInputError(str(err)) from None
        return (path if is_model_uri(uri) else path.resolve()), None, None
    try:
        mv = model_version_for(uri)
    except MlflowException as err:
        raise EvalInputError(f"cannot resolve model {uri!r} at tracking URI {mlflow.get_tracking_uri()!r}: "
                             f"{err.message}") from None
    except ValueError as err:
        raise EvalInputError(f"malformed model URI {uri!r} ({err}); use models:/name@alias or models:/name/N") from None
    name, version = mv.name, str(mv.version)
    final = cache_root / _cache_key(mlflow.get_tracking_uri()) / name / version
    marker = final / "bundle_path.txt"
    if marker.exists() and (final / marker.read_text().strip()).is_dir():
        return final / marker.read_text().strip(), name, version
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".download-{version}-"))
    try:
        bundle = resolve_bundle(f"models:/{name}/{version}", cache_dir=tmp)
        (tmp / "bundle_path.txt").write_text(str(bundle.relative_to(tmp)))
        shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same download first
            pass
    except FileNotFoundError as err:
        raise EvalInputError(str(err)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / marker.read_text().strip(), name, version


def plan_evaluation(cfg, model_uri: str, overrides=()) -> EvalPlan:
    """Resolve the model and check every setting; raises :class:`EvalInputError` (nothing has been computed)."""
    from hiar.io.bundle import open_model_dir
    from hiar.io.storage import checksum_dir, local_dir
    from hiar.eval.drift import WEIGHTS_ENV
    from hiar.core.generation import MODES

    e = cfg.eval
    for name in ("actors", "batch_size", "threads_per_actor"):
        if getattr(e, name) < 1:
            raise EvalInputError(f"eval.{name} must be >= 1, got {getattr(e, name)}")
    for name in ("cpus_per_actor", "gpus_per_actor"):
        if getattr(e, name) < 0:
            raise EvalInputError(f"eval.{name} must be >= 0, got {getattr(e, name)}")
    if not e.seeds:
        raise EvalInputError("eval.seeds is empty")
    if not e.rollouts:
        raise EvalInputError("eval.rollouts is empty")
    bad = [m for m in e.rollouts if m not in MODES]
    if bad:
        raise EvalInputError(f"unknown rollout mode(s) {bad} in eval.rollouts; valid: {list(MODES)}")
    if cfg.video.eval_horizon_factor < 1:
        raise EvalInputError(f"video.eval_horizon_factor must be >= 1, got {cfg.video.eval_horizon_factor}")
    prompts, use_oracle = eval_prompt_list(cfg)

    cache_root = Path(resolve_path(cfg.run_dir)) / "model-cache"
    bundle_path, name, version = resolve_model(model_uri, cache_root)
    try:
        open_model_dir(bundle_path, f"model {model_uri!r}")
    except (FileNotFoundError, ValueError) as err:
        raise EvalInputError(str(err)) from None
    rollout_overrides = [o for o in overrides if o.split("=", 1)[0].strip().startswith("rollout.")]
    try:
        gen = generation_config(bundle_path, cfg, rollout_overrides)
    except (ValueError, TypeError, KeyError) as err:
        raise EvalInputError(f"the model's hiar_config.yaml (with {rollout_overrides}) is not valid: {err}") from None
    latent_frames = cfg.video.eval_horizon_factor * cfg.video.train_latent_frames
    fpb = gen.rollout.frames_per_block
    if latent_frames % fpb:
        raise EvalInputError(f"evaluation horizon {latent_frames} latent frames (video.eval_horizon_factor x "
                             f"video.train_latent_frames) is not a multiple of the model's frames_per_block ({fpb})")
    if latent_frames < 2 * e.segments:
        raise EvalInputError(f"{latent_frames} latent frames cannot make eval.segments={e.segments} segments of >= 2 "
                             f"frames; raise video.eval_horizon_factor or lower eval.segments")
    weights = e.scorer_weights or os.environ.get(WEIGHTS_ENV, "").strip()
    if weights and "://" in weights:  # s3://: fetched once here, so a bad URI fails before any compute; the plan
        try:                          # keeps the URI and each node's actors reuse (or fetch) their local copy
            local_dir(weights, what="scorer weights (eval.scorer_weights or $" + WEIGHTS_ENV + ")")
        except (OSError, ValueError) as err:
            raise EvalInputError(str(err)) from None
    elif weights:
        weights = resolve_path(weights)  # a missing local directory: every learned scorer reports itself skipped
    return EvalPlan(
        model_uri=model_uri, bundle_path=str(bundle_path), checksum=checksum_dir(bundle_path), model_name=name,
        model_version=version, gen_config=gen.to_dict(), prompts=prompts, seeds=[int(s) for s in e.seeds],
        modes=list(e.rollouts), latent_frames=latent_frames, num_blocks=latent_frames // fpb, segments=e.segments,
        fps=gen.video.fps, use_oracle=use_oracle, weights_dir=weights or None, eval_settings=dataclasses.asdict(e),
        rollout_overrides=rollout_overrides,
    )


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
        from hiar.eval.drift import learned_scorers

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
def sample_values(rows: list[dict], modes: list[str]) -> dict:
    """The per-sample table (``hiar.eval.gate.SampleTable``) of actor rows: ``{"keys": [[prompt, seed], ...],
    "values": {"<mode>/<metric>": [value or None per sample]}}`` in item order, each sample's metrics as
    ``DriftReport.to_metrics`` of its own report plus its oracle scores."""
    from hiar.eval.drift import DriftReport

    rows = sorted(rows, key=lambda r: int(r["index"]))
    per: list[dict] = []
    for r in rows:
        result = json.loads(r["result"])
        one: dict = {}
        for mode in modes:
            one.update({f"{mode}/{k}": float(v) for k, v in DriftReport(**result[mode]["report"]).to_metrics().items()})
            one.update({f"{mode}/oracle/{k}": float(v) for k, v in result[mode].get("oracle", {}).items()})
        per.append(one)
    names = list(dict.fromkeys(k for one in per for k in one))
    return {"keys": [[str(r["prompt"]), int(r["seed"])] for r in rows],
            "values": {k: [one.get(k) for one in per] for k in names}}


def standard_errors(metrics: dict, table: dict) -> dict:
    """``<key>_se`` (n >= 2) for every metric of ``metrics`` that is a mean of ``table``'s per-sample values, and
    ``<key>_n`` where fewer samples than the table's had a value."""
    from hiar.eval.gate import mean_se

    out: dict[str, float] = {}
    for key, values in table["values"].items():
        if key not in metrics or key.split("/", 1)[-1] in NOT_MEANS:
            continue
        _, se, n = mean_se([v for v in values if v is not None])
        if n >= 2:
            out[f"{key}_se"] = se
        if n < len(values):
            out[f"{key}_n"] = float(n)
    return out


def summarize(rows: list[dict], modes: list[str]) -> tuple[dict, dict, dict, dict]:
    """``(metrics, aggregated DriftReport per mode, sample frames per mode [N, T, H, W, 3] uint8, per-sample table)``
    from actor rows; ``metrics`` holds each mean's standard error (:func:`standard_errors`)."""
    import numpy as np

    from hiar.eval.drift import DriftReport, aggregate

    rows = sorted(rows, key=lambda r: int(r["index"]))
    parsed = [json.loads(r["result"]) for r in rows]
    metrics: dict[str, float] = {}
    reports: dict = {}
    for mode in modes:
        reps = [DriftReport(**p[mode]["report"]) for p in parsed]
        reports[mode] = aggregate(reps)
        metrics.update({f"{mode}/{k}": float(v) for k, v in reports[mode].to_metrics().items()})
        oracles = [p[mode]["oracle"] for p in parsed if "oracle" in p[mode]]
        if oracles:
            for key in oracles[0]:
                metrics[f"{mode}/oracle/{key}"] = float(np.mean([o[key] for o in oracles]))
    samples: dict = {mode: [] for mode in modes}
    for r in rows:
        blob = r["frames"]
        if blob:
            with np.load(io.BytesIO(bytes(blob))) as z:
                for mode in modes:
                    if mode in z:
                        samples[mode].append(z[mode])
    samples = {m: np.stack(v) for m, v in samples.items() if v}
    table = sample_values(rows, modes)
    metrics.update(standard_errors(metrics, table))
    metrics["eval/num_videos"] = float(len(rows))
    return metrics, reports, samples, table


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "-"
    se = metrics.get(f"{key}_se")
    return f"{metrics[key]:.5g}" + (f" ± {se:.2g}" if se is not None else "")


def summary_table(metrics: dict, modes: list[str]) -> str:
    """Means (± standard error over the samples) of the headline metrics, one column per mode."""
    keys = [k for k in SUMMARY_KEYS if any(f"{m}/{k}" in metrics for m in modes)]
    width = max(len(k) for k in keys) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{m:>24}" for m in modes)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{_cell(metrics, f'{m}/{k}'):>24}" for m in modes))
    lines.append(f"(mean ± standard error over n = {metrics.get('eval/num_videos', 0):g} (prompt, seed) samples)")
    return "\n".join(lines)


def _worker_env() -> dict:
    """The project root on the actors' PYTHONPATH: workers import ``hiar`` whatever the driver's cwd was."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": root + (os.pathsep + path if path and root not in path.split(os.pathsep) else "")}


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
    return {"run_id": run_id, "model_uri": plan.model_uri, "model_name": plan.model_name,
            "version": plan.model_version, "checksum": plan.checksum, "eval_identity": plan.identity(),
            "modes": plan.modes, "reused": reused, "metrics": metrics}


def run_evaluation(plan: EvalPlan, parent_run_id: str | None = None, run_name: str | None = None,
                   reuse: bool = False, log=_print) -> dict:
    """Run (or, with ``reuse``, find) the evaluation; returns ``{"run_id", "model_uri", "version", "metrics", ...}``."""
    import mlflow

    if reuse:
        found = find_existing(plan)
        if found is not None:
            log(f"[evaluate] reusing finished evaluation run {found.info.run_id} (same weights {plan.checksum}, "
                f"same settings {plan.identity()})")
            return _result(plan, found.info.run_id, dict(found.data.metrics), True)

    import ray

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
        runtime_env={"env_vars": _worker_env()},
    )
    rows = ds.take_all()
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
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        if skipped:
            mlflow.set_tag("drift.skipped", json.dumps(skipped)[:5000])
        with tempfile.TemporaryDirectory() as tmp:
            from hiar.eval.drift import plot_segments
            from hiar.io.video import tile, write_mp4

            plot = plot_segments(reports, Path(tmp) / "drift_segments.png")
            mlflow.log_artifact(str(plot), "plots")
            for mode, frames in samples.items():
                h = frames.shape[2]
                path = write_mp4(tile(frames, columns=min(4, len(frames)), upscale=max(1, 64 // h)),
                                 Path(tmp) / f"{mode}.mp4", fps=plan.fps)
                mlflow.log_artifact(str(path), "samples")
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


def evaluate(cfg, model_uri: str, overrides=(), parent_run_id: str | None = None, run_name: str | None = None,
             reuse: bool = False, log=_print) -> dict:
    """Plan + run, for in-process callers (``promote.py``); MLflow's tracking URI must already be set."""
    return run_evaluation(plan_evaluation(cfg, model_uri, overrides), parent_run_id, run_name, reuse, log)


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/N, runs:/<id>/generator or a local bundle directory")
    parser.add_argument("--parent-run-id", default=None, help="nest the evaluation run under this MLflow run")
    parser.add_argument("--output-json", default=None, help="write {run_id, model_uri, version, metrics} here")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="return a finished evaluation of the same weights and settings instead of recomputing")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        setup_tracking(cfg.run_dir)
        plan = plan_evaluation(cfg, args.model, args.overrides)
        if args.parent_run_id:
            MlflowClient().get_run(args.parent_run_id)  # raises when it does not exist
    except (EvalInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:  # an unknown parent run
        print(f"error: --parent-run-id {args.parent_run_id}: {err.message}", file=sys.stderr)
        return 2
    result = run_evaluation(plan, args.parent_run_id, args.run_name, args.reuse)
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
