"""The command's input, checked before anything is written: where the run directory is, that every destination can
be written, that the models open and fit the config, that there is a prompt dataset. Every failure is an
:class:`~hiar.pipeline.outcome.InputError` that names the valid choices (``full.main`` turns it into exit code 2).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hiar.io.storage import PACKAGE_PARENT, resolve_path
from hiar.pipeline.outcome import InputError
from hiar.pipeline.plans import is_bundle


def resolve_run_dir(arg: str | None, cfg_run_dir: str) -> Path:
    """``--run-dir``, else HIAR_RUN_DIR, else the config's run_dir. A relative one inside a ``ray job submit
    --working-dir`` copy (which disappears with the cluster) is put under ``~/hiar/``."""
    raw = arg or os.environ.get("HIAR_RUN_DIR") or cfg_run_dir
    if "://" in raw:
        raise InputError(f"run_dir must be a local directory (it holds the MLflow SQLite store and model bundles), "
                         f"got {raw!r}; put datasets on S3 with data.storage=s3://... and checkpoints with "
                         f"distill.storage_path=s3://...")
    path = Path(raw).expanduser()
    if not path.is_absolute() and "runtime_resources" in PACKAGE_PARENT.parts:
        path = Path.home() / "hiar" / path
        print(f"[full] running from a Ray working_dir copy; outputs go to {path} (set --run-dir to choose)",
              flush=True)
    return Path(resolve_path(str(path))).resolve()


def check_destinations(uris: list[str]) -> None:
    """Each destination writable (hiar.io.storage.check_writable); on a failure, directories this check created are
    removed again, so a rejected command leaves nothing behind."""
    from hiar.io.storage import check_writable

    created: list[Path] = []
    try:
        for uri in uris:
            if "://" not in uri:
                p = Path(uri).resolve()
                first_missing = None
                while not p.exists():
                    first_missing, p = p, p.parent
                if first_missing is not None:
                    created.append(first_missing)
            try:
                check_writable(uri)
            except ValueError as err:
                raise InputError(f"{err} (storage must be a writable local directory or s3://bucket/prefix)") from None
    except InputError:
        for p in reversed(created):
            if p.exists() and not any(f.is_file() for f in p.rglob("*")):
                shutil.rmtree(p, ignore_errors=True)
        raise


def preflight_models(cfg, stages: list[str], retrain_teacher: bool) -> None:
    """Before any stage runs: the teacher and the real score open as model directories (local or s3://, either
    layout; ``hiar.io.bundle``), the config's ``model.*`` describes the teacher and the real score fits its text
    encoder and VAE. The tiny preset may train its teacher first (stage ``teacher``): then there is nothing to
    check yet."""
    from hiar.platform.train_inputs import check_models

    if not set(stages) - {"deploy", "teacher"}:
        return
    teacher = resolve_path(cfg.teacher.path) if cfg.teacher.path else ""
    if cfg.preset == "tiny" and (retrain_teacher or not is_bundle(teacher)) and "teacher" in stages:
        return
    if not teacher:
        raise InputError(f"the {cfg.preset} preset needs teacher.path: a Wan2.1 diffusers repository as published "
                         f"(model_index.json, transformer/, vae/, text_encoder/, tokenizer/), local or s3://")
    try:
        check_models(cfg, teacher)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None


def check_prompts(cfg, stages: list[str]) -> None:
    """A non-tiny preset without a prompt dataset (or with a bad one) is an error before anything runs."""
    if not set(stages) - {"deploy"}:
        return
    from hiar.io.prompts import prompt_set

    try:
        prompt_set(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from None


def check_input(cfg, stages: list[str], run_dir: Path, retrain_teacher: bool) -> None:
    destinations = [str(run_dir)] + [uri for uri in (cfg.data.storage, cfg.distill.storage_path) if uri]
    preflight_models(cfg, stages, retrain_teacher)
    check_prompts(cfg, stages)
    check_destinations(destinations)
