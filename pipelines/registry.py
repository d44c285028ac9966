"""MLflow model logging, registration and resolution of a model bundle (``hiar.bundle``).

A distilled generator is logged as an MLflow ``pyfunc`` model whose one artifact is the bundle directory
(diffusers-format transformer + text encoder + codec + hiar_config.yaml).  Why pyfunc and not
``mlflow.pytorch``: MLflow 3's default torch.export serialisation needs an input example and returns a
GraphModule, which is wrong for a multi-input DiT with a KV cache (DESIGN §8); the bundle stays loadable by
diffusers and by ``hiar.bundle.load_bundle`` with no MLflow at all.

``resolve_bundle(uri)`` turns any of ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/generator`` or a
local bundle directory into a local directory that ``load_bundle`` reads.  Serving and evaluation both use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipelines import common  # noqa: F401  (environment hygiene before mlflow is imported)

MODEL_ARTIFACT = "generator"
BUNDLE_KEY = "bundle"
PIP_REQUIREMENTS = ["torch", "diffusers", "transformers", "numpy", "pyyaml"]


def _pyfunc_model():
    import mlflow.pyfunc

    class HiarGenerator(mlflow.pyfunc.PythonModel):
        """``predict`` a DataFrame of ``prompt``, ``seed``, ``num_blocks`` (and optional ``mode``) -> frames."""

        def load_context(self, context):
            from hiar.bundle import load_bundle

            self.bundle = load_bundle(context.artifacts[BUNDLE_KEY])

        def predict(self, context, model_input, params=None):
            from hiar.generation import generate_frames

            rows = model_input.to_dict("records")
            return [generate_frames(self.bundle, [r["prompt"]], [int(r["seed"])], int(r["num_blocks"]),
                                    r.get("mode", "hierarchical"))[0] for r in rows]

    return HiarGenerator()


def log_bundle(bundle_dir: str | Path, registered_model_name: str | None = None):
    """Log a bundle as the active run's ``generator`` model (optionally registering a new version).

    Returns MLflow's ``ModelInfo`` (``registered_model_version`` is set when registered).
    """
    import mlflow.pyfunc

    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "transformer").is_dir():
        raise FileNotFoundError(f"{str(bundle_dir)!r} is not a model bundle (no transformer/ inside)")
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=_pyfunc_model(),
        artifacts={BUNDLE_KEY: str(bundle_dir)},
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
    )


def is_model_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/"))


def resolve_bundle(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local bundle directory for ``uri`` (downloaded from the tracking server for ``models:/``/``runs:/``)."""
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
        raise FileNotFoundError(f"model {uri!r} has no {BUNDLE_KEY!r} artifact (not logged by pipelines.registry)")
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
