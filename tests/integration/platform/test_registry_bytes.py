"""The registry stores a student's transformer, not another copy of its teacher's text encoder and VAE.

Registering a second student of the same teacher adds about the bytes of its transformer/ to the artifact store
(the shared parts were uploaded once, with the first, into experiment ``hiar-components``), and ``models:/name/2``
still resolves on a fresh node into a bundle that loads: its components fetched from the MLflow run and
hash-checked. A file-based MLflow (SQLite + a local artifact root under the run directory).
"""

import json
import os
import shutil
from pathlib import Path

import torch

from tests.services import set_args
from tests.wan_checkpoint import PROMPTS, build_wan_checkpoint, cpu_overrides

#: A teacher whose transformer (~4.9 MB) dwarfs the fixed per-version overhead (MLmodel, python_model.pkl, ...).
BIG = dict(num_layers=4, ffn_dim=512, num_attention_heads=4, attention_head_dim=32)


def tree_bytes(root: Path) -> int:
    root = Path(root)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_second_version_stores_only_its_transformer_and_resolves_on_a_fresh_node(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from hiar.io.bundle import component_cache, load_bundle, load_text, load_transformer, open_model_dir, save_bundle
    from hiar.config import load_config
    from hiar.jobs import promote
    from hiar.platform.registry import COMPONENT_EXPERIMENT, COMPONENT_TAG, resolve_bundle
    from tests.conftest import perturbed

    runs = tmp_path / "runs"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may be logged relative to the working directory
    monkeypatch.setenv("HIAR_CACHE_DIR", str(tmp_path / "cache-trainer"))
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    teacher_root = build_wan_checkpoint(tmp_path / "teacher", seed=5, **BIG)
    teacher = open_model_dir(teacher_root, "teacher.path")
    assert teacher.transformer_config()["text_dim"] == teacher.text_dim() == 32  # the transformer fits its UMT5
    overrides = [*cpu_overrides(teacher_root), f"run_dir={json.dumps(str(runs))}"]
    cfg = load_config("wan2.1-1.3b", overrides)
    name = cfg.registry.model_name
    store = runs / "components"
    text = load_text(teacher)

    students = []
    for seed in (1, 2):
        model = perturbed(load_transformer(teacher), scale=0.01, seed=seed)
        students.append(save_bundle(runs / "students" / f"student-{seed}", model, text, None, {"seed": seed}, cfg,
                                    shared=teacher, store=store))
    s1, s2 = students
    transformer_2 = tree_bytes(s2 / "transformer")
    shared = tree_bytes(teacher_root / "text_encoder") + tree_bytes(teacher_root / "tokenizer") + \
        tree_bytes(teacher_root / "vae")

    artifacts = runs / "mlartifacts"
    base = ["--preset", "wan2.1-1.3b", *set_args(overrides)]
    assert promote.main(["register", "--model-dir", str(s1), *base]) == 0
    after_1 = tree_bytes(artifacts)
    assert promote.main(["register", "--model-dir", str(s2), *base]) == 0
    after_2 = tree_bytes(artifacts)
    growth = after_2 - after_1
    print(f"\n[registry bytes] text encoder + tokenizer + VAE: {shared} B; student 2 transformer/: {transformer_2} B")
    print(f"[registry bytes] version 1 added {after_1} B; version 2 added {growth} B "
          f"(= {growth / transformer_2:.4f} x its transformer/, overhead {growth - transformer_2} B); "
          f"sqlite {tree_bytes(runs / 'mlflow.db')} B")
    assert list(cwd.iterdir()) == []
    assert after_1 > tree_bytes(s1 / "transformer") + shared  # version 1 uploaded the text encoder and VAE
    assert transformer_2 <= growth <= 1.05 * transformer_2  # version 2 uploaded its transformer, nothing shared

    client = MlflowClient(tracking_uri=uri)
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] in (["2", "1"], ["1", "2"])
    exp = client.get_experiment_by_name(COMPONENT_EXPERIMENT)
    component_runs = client.search_runs([exp.experiment_id])
    refs = json.loads((s2 / "components.json").read_text())["components"]
    assert sorted(r.data.tags[COMPONENT_TAG] for r in component_runs) == sorted(r["sha256"] for r in refs.values())

    # a fresh node: its own cache, and neither the teacher nor the run's component store where the bundle says
    monkeypatch.setenv("HIAR_CACHE_DIR", str(tmp_path / "cache-server"))
    expected = _state(load_bundle(s2).transformer)
    teacher_embeds = text.encode(PROMPTS[:3])
    os.rename(teacher_root, tmp_path / "teacher-elsewhere")
    os.rename(store, tmp_path / "store-elsewhere")
    try:
        bundle = resolve_bundle(f"models:/{name}/2", cache_dir=tmp_path / "resolved")
        assert bundle.is_relative_to(tmp_path / "resolved")
        locations = json.loads((bundle / "locations.json").read_text())
        for comp, ref in refs.items():
            assert locations[comp][-1].startswith("runs:/")  # the MLflow run holding the component
            assert component_cache(ref["sha256"]).is_relative_to(tmp_path / "cache-server")
        loaded = load_bundle(bundle)
        for comp, ref in refs.items():
            assert loaded.model_dir.component_dir(comp) == component_cache(ref["sha256"])  # fetched, hash-checked
        got = _state(loaded.transformer)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert torch.equal(loaded.text.encode(PROMPTS[:3]), teacher_embeds)
        assert loaded.codec.latent_channels == 16
        assert loaded.config is not None and loaded.config.model.num_layers == BIG["num_layers"]
    finally:
        os.rename(tmp_path / "teacher-elsewhere", teacher_root)
        os.rename(tmp_path / "store-elsewhere", store)
    shutil.rmtree(tmp_path / "resolved", ignore_errors=True)
