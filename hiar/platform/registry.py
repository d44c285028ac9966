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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import hiar.platform  # noqa: F401  (environment hygiene before mlflow is imported)

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
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(COMPONENT_EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else _create_experiment(COMPONENT_EXPERIMENT)
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


def _create_experiment(name: str) -> str:
    import mlflow

    uri = mlflow.get_tracking_uri()
    artifacts = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts") if uri.startswith("sqlite:///") \
        else None
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 - created concurrently
        return mlflow.get_experiment_by_name(name).experiment_id


def _staged_with_component_runs(bundle_dir: Path, staging: Path) -> Path:
    """A copy of the bundle (hard links) whose locations.json also names the MLflow run holding each shared
    component, so whoever downloads the model from the registry can fetch its text encoder and VAE too."""
    from hiar.io.bundle import COMPONENTS_FILE, LOCATIONS_FILE, link_or_copy, open_model_dir

    md = open_model_dir(bundle_dir)  # resolves (and hash-checks) the components before anything is uploaded
    refs = json.loads((bundle_dir / COMPONENTS_FILE).read_text())["components"]
    locations = json.loads((bundle_dir / LOCATIONS_FILE).read_text()) if (bundle_dir / LOCATIONS_FILE).is_file() else {}
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

    from hiar.io.bundle import COMPONENTS_FILE

    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "transformer").is_dir():
        raise FileNotFoundError(f"{str(bundle_dir)!r} is not a model bundle (no transformer/ inside)")
    with tempfile.TemporaryDirectory(prefix="hiar-log-") as staging:
        logged = bundle_dir
        if (bundle_dir / COMPONENTS_FILE).is_file():
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

    from hiar.io.bundle import COMPONENTS_FILE, LOCATIONS_FILE, component_cache, component_sha256

    if not (bundle / COMPONENTS_FILE).is_file():
        return
    refs = json.loads((bundle / COMPONENTS_FILE).read_text())["components"]
    locations = json.loads((bundle / LOCATIONS_FILE).read_text()) if (bundle / LOCATIONS_FILE).is_file() else {}
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


__all__ = ["MODEL_ARTIFACT", "log_bundle", "resolve_bundle", "is_model_uri", "model_version_for",
           "s3_env_for_mlflow"]
