"""The plan of an evaluation: the model resolved to a local bundle, the prompts, seeds, modes and horizon, every
setting checked before any compute (``hiar.jobs.evaluate`` documents what is evaluated and why).

Registry URIs (``models:/name@alias``, ``models:/name/N``) are pinned to one version and downloaded once,
driver-side, into ``<run_dir>/model-cache`` (actors get the local path: on a multi-node cluster ``run_dir`` must be
shared storage). The plan's :meth:`EvalPlan.identity` (everything that determines the numbers except the weights)
and :meth:`EvalPlan.generation_hash` (the bundle's generation config), with the weights' checksum, name an
evaluation: a finished one of the same three is reused instead of recomputed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hiar.identity import identity
from hiar.io.storage import resolve_path


class EvalInputError(ValueError):
    """A problem with the model or the settings, found before any compute (exit code 2)."""


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
        return identity(keep)

    def generation_hash(self) -> str:
        """Hash of the generation config (model, schedule, rollout, video): the bundle's ``hiar_config.yaml`` is not
        part of ``checksum`` (weights only), so equal weights under another rollout are another evaluation."""
        from hiar.io.bundle import config_from_dict

        # as identities hash a config: a key added later at its neutral value renames no stored evaluation
        return identity(config_from_dict(self.gen_config).identity_view("model", "schedule", "rollout", "video"))

    def items(self) -> list[dict]:
        """One Ray Data item per (prompt, seed); the first ``sample_videos`` send their frames back."""
        n_samples = int(self.eval_settings.get("sample_videos", 0))
        pairs = [(p, s) for s in self.seeds for p in self.prompts]
        return [{"index": i, "prompt": p, "seed": int(s), "sample": i < n_samples} for i, (p, s) in enumerate(pairs)]


def generation_config(bundle_path: str | Path, fallback, rollout_overrides: list[str]):
    """The bundle's own config (schedule, rollout, geometry it was trained with), else ``fallback``; then the
    ``rollout.*`` overrides."""
    import yaml

    from hiar.config import _set_path
    from hiar.io.bundle import bundle_config, config_from_dict

    data = (bundle_config(bundle_path) or fallback).to_dict()
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
    final = cache_root / identity(mlflow.get_tracking_uri()) / name / version
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
    from hiar.io.checksums import checksum_dir
    from hiar.io.storage import local_dir
    from hiar.eval.scorers import WEIGHTS_ENV
    from hiar.core.rollout import ROLLOUT_MODES as MODES

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
