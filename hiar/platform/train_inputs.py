"""The inputs of a training stage (``hiar.jobs.train``), checked before any compute: the dataset's manifest against
the model config, the teacher and real-score model directories, a ``distill.resume_from`` checkpoint's shapes. They
read manifests, configs and checkpoint metadata only, never weights, so a wrong input fails in seconds with a message
that names the setting.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hiar.io.storage import ShardPlan, resolve_path


def check_dataset(cfg, kind: str, uri: str) -> tuple[dict, ShardPlan]:
    """The dataset's manifest and the plan of the samples a stage trains on (the first ``data.num_ode_pairs`` or
    ``data.num_trajectories``), after checking the dataset exists, holds those samples whole and its tensors fit
    the model (before any compute)."""
    from hiar.io.storage import committed_shards, complete_shards, load_manifest
    from hiar.methods.datagen import COUNT_KEYS, kind_count

    manifest = load_manifest(uri)
    committed = committed_shards(uri)
    if manifest is None or not committed:
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
    plan = ShardPlan(kind_count(cfg, kind), int(manifest["settings"]["shard_size"]))
    missing = sorted(set(range(plan.num_shards)) - complete_shards(uri, plan, committed))
    if missing:
        raise ValueError(f"{kind} at {uri!r} holds {manifest.get('count')} samples, but data.{COUNT_KEYS[kind]} = "
                         f"{plan.count} needs shards 0-{plan.num_shards - 1} whole and {missing[:8]} are not: make "
                         f"them with `python -m hiar.jobs.generate --kind {kind}` and this config (the pipeline's "
                         f"{kind} stage)")
    return manifest, plan


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


def check_resume_checkpoint(cfg, uri: str) -> tuple[str, dict]:
    """``distill.resume_from`` is a distillation checkpoint whose parameter shapes fit this config's model (read
    from its ``trainer.json`` and DCP ``.metadata`` alone, fetched from s3:// when remote), or a distillation run's
    directory (``<run_dir>/train/distill-<identity>``), whose latest checkpoint is taken.

    Returns the checkpoint's URI and what enters the stage identity: the run that wrote the checkpoint (its stage
    identity, which ``trainer.json`` keeps) and its iteration, so the same commands on a fresh clone name the
    resumed student alike, though its checkpoints lie elsewhere under other timestamps. A checkpoint that does not
    name its run (written before it did) enters by its path (``portable_path``) instead."""
    import torch

    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.io.storage import portable_path, resolve_uri
    from hiar.methods.sharding import TRAINER_STATE, check_checkpoint

    fs, path = resolve_uri(uri)
    checkpoint = _latest_checkpoint(fs, path, TRAINER_STATE)
    if checkpoint != path:
        uri = f"{uri.rstrip('/')}/{checkpoint.rsplit('/', 1)[-1]}"
    with tempfile.TemporaryDirectory() as tmp:
        for name in (TRAINER_STATE, ".metadata"):
            try:
                with fs.open_input_stream(f"{checkpoint}/{name}") as src:
                    (Path(tmp) / name).write_bytes(src.read())
            except (FileNotFoundError, OSError) as err:
                raise ValueError(f"distill.resume_from {uri!r} is neither a training checkpoint (no {name}: {err}) "
                                 f"nor a training run's directory of them (no checkpoint_* in it)") from err
        with torch.device("meta"):
            model = CausalWanTransformer3DModel(**cfg.model.kwargs())
        try:
            counters = check_checkpoint(tmp, {"generator": model, "critic": model, "ema": model}, stage="distill")
        except ValueError as err:  # name the setting and the URI, not the temporary copy
            raise ValueError(f"distill.resume_from {uri!r}: {str(err).replace(f'checkpoint {tmp} ', '')}") from None
    origin = {"run": counters["run"]} if counters.get("run") else {"uri": portable_path(uri)}
    return uri, {**origin, "iteration": counters["iteration"]}


def _latest_checkpoint(fs, path: str, state_file: str) -> str:
    """``path`` itself when it holds a checkpoint (``state_file``), else its ``checkpoint_*`` directory with the
    highest iteration (Ray Train names them by time, so the name does not order them), else ``path`` (whose
    check then fails, naming what is missing)."""
    import pyarrow.fs as pafs

    from hiar.io.storage import read_json

    if fs.get_file_info(f"{path}/{state_file}").type == pafs.FileType.File:
        return path
    found = []
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return path
    for entry in entries:
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        try:
            state = read_json(fs, f"{entry.path}/{state_file}")
        except (OSError, ValueError):
            continue  # a checkpoint still being written
        if state is not None:  # None: not a checkpoint
            found.append((int(state.get("iteration", -1)), entry.path))
    return max(found)[1] if found else path
