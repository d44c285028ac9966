"""MLflow model logging, registration and resolution of a model bundle (``hiar.io.bundle``).

A distilled generator is logged as an MLflow ``pyfunc`` model whose one artifact is the bundle directory
(diffusers-format transformer + hiar_config.yaml + card; its text encoder and codec by reference: each shared
component is logged once per content hash to experiment ``hiar-components`` and fetched from there by
``resolve_bundle`` on a node that has no copy).  Why pyfunc and not
``mlflow.pytorch``: MLflow 3's default torch.export serialisation needs an input example and returns a
GraphModule, which is wrong for a multi-input DiT with a KV cache (DESIGN §8); the bundle stays loadable by
diffusers and by ``hiar.io.bundle.load_bundle`` with no MLflow at all.

``resolve_bundle(uri)`` turns any of ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/generator``, an
``s3://`` prefix or a local bundle directory into a local directory that ``load_bundle`` reads.  Serving and evaluation both use it.

The registry's state (aliases ``challenger`` / ``champion``, the champion history, promotion tags and the
description log) is read and written through the helpers at the end, which ``hiar.jobs.promote`` drives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from hiar.platform.tracking import experiment_id

MODEL_ARTIFACT = "generator"
BUNDLE_KEY = "bundle"
PIP_REQUIREMENTS = ["torch", "diffusers", "transformers", "numpy", "pyyaml"]


def _pyfunc_model():
    import mlflow.pyfunc

    class HiarGenerator(mlflow.pyfunc.PythonModel):
        """``predict`` a DataFrame of ``prompt``, ``seed``, ``num_blocks`` (and optional ``mode``) -> frames."""

        def load_context(self, context):
            from hiar.io.bundle import load_bundle

            self.bundle = load_bundle(context.artifacts[BUNDLE_KEY])

        def predict(self, context, model_input, params=None):
            from hiar.core.generation import generate_frames

            rows = model_input.to_dict("records")
            return [generate_frames(self.bundle, [r["prompt"]], [int(r["seed"])], int(r["num_blocks"]),
                                    r.get("mode", "hierarchical"))[0] for r in rows]

    return HiarGenerator()


COMPONENT_EXPERIMENT = "hiar-components"
COMPONENT_TAG = "hiar.component_sha256"
COMPONENT_ARTIFACT = "component"


def component_run(name: str, ref: dict, source: Path) -> str:
    """The MLflow run that holds the shared component with this hash, logged by the first bundle that needs it:
    a later version of a student finds it by its tag and uploads nothing."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp_id = experiment_id(COMPONENT_EXPERIMENT)
    found = client.search_runs([exp_id], filter_string=f"tags.`{COMPONENT_TAG}` = '{ref['sha256']}' "
                                                        f"and attributes.status = 'FINISHED'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{name}-{ref['sha256'][:12]}",
                            tags={COMPONENT_TAG: ref["sha256"], "hiar.component": name})
    for part in ref["parts"]:
        path = source / part
        if path.is_file():
            client.log_artifact(run.info.run_id, str(path), COMPONENT_ARTIFACT)
        else:
            client.log_artifacts(run.info.run_id, str(path), f"{COMPONENT_ARTIFACT}/{part}")
    client.set_terminated(run.info.run_id, "FINISHED")  # only a complete upload is ever found by its tag
    return run.info.run_id


def _staged_with_component_runs(bundle_dir: Path, staging: Path) -> Path:
    """A copy of the bundle (hard links) whose locations.json also names the MLflow run holding each shared
    component, so whoever downloads the model from the registry can fetch its text encoder and VAE too."""
    from hiar.io.bundle import LOCATIONS_FILE, component_refs, link_or_copy, open_model_dir

    md = open_model_dir(bundle_dir)  # resolves (and hash-checks) the components before anything is uploaded
    refs, locations = component_refs(bundle_dir)
    out = staging / bundle_dir.name
    shutil.copytree(bundle_dir, out, copy_function=link_or_copy)
    for name, ref in refs.items():
        uri = f"runs:/{component_run(name, ref, md.component_dir(name))}/{COMPONENT_ARTIFACT}"
        locations[name] = [loc for loc in locations.get(name, []) if loc != uri] + [uri]
    (out / LOCATIONS_FILE).unlink(missing_ok=True)  # a link to the original: write a new file, not through it
    (out / LOCATIONS_FILE).write_text(json.dumps(locations, indent=2))
    return out


def log_bundle(bundle_dir: str | Path, registered_model_name: str | None = None):
    """Log a bundle as the active run's ``generator`` model (optionally registering a new version).

    A bundle that references its text encoder and VAE (``hiar.io.bundle``) is logged without them: each shared
    component is logged once per content hash in experiment ``hiar-components``, and the logged bundle's
    ``locations.json`` names that run. Returns MLflow's ``ModelInfo``.
    """
    import mlflow.pyfunc

    from hiar.io.bundle import component_refs, holds_model

    bundle_dir = Path(bundle_dir)
    if not holds_model(bundle_dir):
        raise FileNotFoundError(f"{str(bundle_dir)!r} is not a model bundle (no transformer/ inside)")
    with tempfile.TemporaryDirectory(prefix="hiar-log-") as staging:
        logged = bundle_dir
        if component_refs(bundle_dir)[0]:
            logged = _staged_with_component_runs(bundle_dir, Path(staging))
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=_pyfunc_model(),
            artifacts={BUNDLE_KEY: str(logged)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_model_name,
        )


def fetch_components(bundle: Path) -> None:
    """Download the shared components a registry bundle references through MLflow runs into this node's
    component cache (``hiar.io.bundle.component_cache``), each checked against its hash; others resolve as they are."""
    import mlflow

    from hiar.io.bundle import component_cache, component_refs, component_sha256

    refs, locations = component_refs(bundle)
    for name, ref in refs.items():
        final = component_cache(ref["sha256"])
        if final.exists():
            continue
        uri = next((loc for loc in locations.get(name, []) if loc.startswith("runs:/")), None)
        if uri is None:
            continue  # a local or s3:// location: hiar.io.bundle resolves it
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
            sha = component_sha256(got, ref["parts"])
            if sha != ref["sha256"]:
                raise ValueError(f"component {name} at {uri} has sha256 {sha[:16]}, the bundle references "
                                 f"{ref['sha256'][:16]}")
            os.replace(got, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def is_model_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/"))


def resolve_bundle(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local bundle directory for ``uri`` (downloaded from the tracking server for ``models:/``/``runs:/``)."""
    if uri.startswith("s3://"):
        from hiar.io.storage import local_dir

        return local_dir(uri, "model")  # fetched once per node; its components resolve through hiar.io.bundle
    if not is_model_uri(uri):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"model {uri!r}: not a models:/ or runs:/ URI and no such directory")
        return path
    import mlflow
    from mlflow.exceptions import MlflowException

    dst = Path(cache_dir or tempfile.mkdtemp(prefix="hiar-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as err:
        raise FileNotFoundError(f"cannot resolve model {uri!r} at tracking URI {mlflow.get_tracking_uri()!r}: "
                                f"{err.message}") from None
    bundle = _bundle_path(local)
    if bundle is None or not bundle.is_dir():
        raise FileNotFoundError(f"model {uri!r} has no {BUNDLE_KEY!r} artifact (not logged by hiar.platform.registry)")
    fetch_components(bundle)
    return bundle


def _bundle_path(model_dir: Path) -> Path | None:
    """Where the pyfunc flavor put the bundle artifact (MLflow keeps the logged directory's own name)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.exists():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    entry = (flavor.get("artifacts") or {}).get(BUNDLE_KEY)
    return model_dir / entry["path"] if entry else None


def model_version_for(uri: str):
    """The registry ``ModelVersion`` a ``models:/name@alias`` or ``models:/name/N`` URI points to (else None)."""
    from mlflow import MlflowClient

    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/"):]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = ref.rsplit("/", 1)
    return client.get_model_version(name, version)


def s3_env_for_mlflow() -> dict:
    """Env vars an MLflow client needs for S3 artifacts (endpoint and keys come from the environment only)."""
    keys = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    return {k: os.environ[k] for k in keys if k in os.environ}


# ---------------------------------------------------------------------------------------------- registry state
# What the promotion job keeps on the registered model: the aliases, the champion's history (a registered-model
# tag), model-version tags and a human-readable log in the description. Aliases only, never the deprecated stages.
CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion.history"
DESCRIPTION_HEADER = "HiAR student generator. Registry log (newest last):"


class NotRegistered(LookupError):
    """No registered model of that name, or no such version of it."""


def now_utc() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def registry_client():
    from mlflow import MlflowClient

    return MlflowClient()


def _not_found(err) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def get_registered_model(client, name: str):
    """The registered model ``name``; :class:`NotRegistered` when the tracking server has none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _not_found(err):
            raise NotRegistered(f"no registered model {name!r} at {mlflow.get_tracking_uri()}; register one first "
                                f"(python -m hiar.jobs.promote register --model-dir DIR)") from None
        raise


def get_version(client, name: str, version: str):
    """Version ``version`` of registered model ``name``; :class:`NotRegistered` when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if _not_found(err):
            raise NotRegistered(f"registered model {name!r} has no version {version}") from None
        raise


def version_exists(client, name: str, version: str) -> bool:
    try:
        get_version(client, name, version)
        return True
    except NotRegistered:
        return False


def aliases(rm) -> dict[str, str]:
    """The registered model's aliases as ``{alias: version string}`` (MLflow returns the versions as ints)."""
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def champion_history(rm) -> list[str]:
    """The versions that held ``champion``, oldest first (:data:`HISTORY_TAG`; empty when unreadable)."""
    try:
        return [str(v) for v in json.loads(rm.tags.get(HISTORY_TAG, "[]"))]
    except ValueError:
        return []


def append_description(client, name: str, line: str) -> None:
    """Append a timestamped line to the registered model's description (the registry log; oldest lines drop out
    when it would grow past MLflow's limit)."""
    from hiar.eval.gate import append_line

    rm = client.get_registered_model(name)
    text = rm.description or DESCRIPTION_HEADER
    client.update_registered_model(name, description=append_line(text, f"{now_utc()} {line}"))


def set_version_tags(client, name: str, version: str, tags: dict, current: dict | None = None) -> None:
    """Set the non-empty ``tags`` on a model version, skipping those ``current`` already holds with that value."""
    for key, value in tags.items():
        if value is None or value == "":
            continue
        if current is not None and current.get(key) == str(value):
            continue
        client.set_model_version_tag(name, str(version), key, str(value))


def bundle_config_hash(model_dir: Path) -> str:
    """``HiarConfig.config_hash()`` of the bundle's ``hiar_config.yaml`` ('' when it has none)."""
    from hiar.io.bundle import bundle_config

    cfg = bundle_config(model_dir)
    return cfg.config_hash() if cfg is not None else ""


def config_file_sha(model_dir: Path) -> str:
    """sha256 (16 hex) of the bundle's ``hiar_config.yaml`` bytes ('' without one): ``checksum_dir`` covers the
    weights, tokenizer and codec files only, and the same weights under another schedule/rollout config are another
    model.  The file's bytes, not ``config_hash()``, so that a code update adding config fields does not make an
    unchanged bundle look new."""
    from hiar.io.bundle import CONFIG_FILE

    path = model_dir / CONFIG_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def find_version_by_checksum(client, name: str, checksum: str, config_sha: str = ""):
    """The registered version with this content (``checksum`` and ``config_sha`` tags; lowest number), or None."""
    versions = client.search_model_versions(f"name = '{name}'")
    same = [mv for mv in versions if mv.tags.get("checksum") == checksum and mv.status != "FAILED_REGISTRATION"
            and mv.tags.get("config_sha", "") == config_sha]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def move_champion(client, name: str, version: str, current: str | None) -> list[str]:
    """``champion`` -> ``version``, remembered in the history; returns the new history."""
    from hiar.eval.gate import push_history

    history = push_history(champion_history(client.get_registered_model(name)), version, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return history


def record_decision(client, name: str, version: str, decision: str, reason: str, details: dict,
                    against: str | None, key: str = "", run_id: str = "") -> None:
    """A promotion decision on the version's tags, in ``promotion.last`` and in the description log."""
    now = now_utc()
    tags = {"promotion.decision": decision, "promotion.reason": reason,
            "promotion.metrics": json.dumps(details, sort_keys=True, default=str),
            "promotion.against": against or "", "promotion.time": now, "promotion.key": key,
            "promotion.run_id": run_id}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_tag(name, "promotion.last", json.dumps(
        {"version": version, "decision": decision, "reason": reason[:1000], "against": against, "time": now}))
    vs = f" vs champion v{against}" if against else ""
    append_description(client, name, f"promote v{version}{vs}: {decision.upper()}: {reason}")


__all__ = ["MODEL_ARTIFACT", "log_bundle", "resolve_bundle", "is_model_uri", "model_version_for",
           "s3_env_for_mlflow", "CHALLENGER", "CHAMPION", "HISTORY_TAG", "NotRegistered", "registry_client",
           "get_registered_model", "get_version", "version_exists", "aliases", "champion_history",
           "append_description", "set_version_tags", "bundle_config_hash", "config_file_sha",
           "find_version_by_checksum", "move_champion", "record_decision"]
