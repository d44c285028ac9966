"""What a model directory is (hiar.io.bundle): both layouts, local and s3://, the checks made before any compute,
bundles that reference their text encoder and VAE by hash, and the real score DMD uses. Over 400 lines because
it mirrors hiar/io/bundle.py, one module, as one file.

Every test points HIAR_CACHE_DIR at its own temporary directory, so no test shares (or trusts) the node cache.
"""

import copy
import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from tests.wan_checkpoint import (
    GEOMETRY,
    PROMPTS,
    cpu_overrides,
)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from tests.services import random_bundle

    return random_bundle(tmp_path_factory.mktemp("tiny") / "bundle", seed=0)


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch):
    """Each test its own node cache (fetched s3:// directories, verified component hashes)."""
    cache = tmp_path / "hiar-cache"
    monkeypatch.setenv("HIAR_CACHE_DIR", str(cache))
    return cache


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _student(teacher_dir, out: Path, seed: int, store: Path | None, cfg=None) -> Path:
    """A student bundle of the miniature: the teacher's transformer, perturbed, with its parts by reference."""
    from hiar.io.bundle import load_text, load_transformer, save_bundle
    from tests.conftest import perturbed

    model = perturbed(load_transformer(teacher_dir), scale=0.01, seed=seed)
    return save_bundle(out, model, load_text(teacher_dir), None, {"seed": seed}, cfg, shared=teacher_dir, store=store)


def _outputs(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = model.config.in_channels
    x = torch.randn(1, c, 3, GEOMETRY["latent_height"], GEOMETRY["latent_width"], generator=g)
    text = torch.randn(1, 7, model.config.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, attention_mode="bidirectional").sample


# ---------------------------------------------------------------------------------------------- 1. layouts
def test_open_model_dir_on_a_repository_its_transformer_folder_and_a_bundle(wan_ckpt, tiny_bundle):
    from hiar.io.bundle import open_model_dir

    md = open_model_dir(wan_ckpt)
    via_transformer = open_model_dir(wan_ckpt / "transformer")
    assert md == via_transformer  # a transformer/ folder stands for its repository
    assert md.layout == "wan" and md.root == wan_ckpt and md.source == str(wan_ckpt)
    assert via_transformer.root == wan_ckpt and via_transformer.transformer == wan_ckpt / "transformer"
    assert md.components == {"text": (wan_ckpt, ("tokenizer", "text_encoder"), ""), "codec": (wan_ckpt, ("vae",), "")}
    assert md.text_dim() == 32 and md.latent_channels() == 16
    assert open_model_dir(str(wan_ckpt / "transformer") + "/") == md  # a trailing slash changes nothing

    b = open_model_dir(tiny_bundle)
    assert b.layout == "bundle" and b.root == tiny_bundle
    assert b.components == {"text": (tiny_bundle, ("tokenizer", "text_encoder", "hiar_text.json"), ""),
                            "codec": (tiny_bundle, ("codec",), "")}  # embedded, no hash recorded
    assert open_model_dir(tiny_bundle / "transformer") == b
    from hiar.config import load_config

    tiny = load_config("tiny")
    assert b.text_dim() == tiny.model.text_dim and b.latent_channels() == tiny.video.latent_channels


# ---------------------------------------------------------------------------------------------- 2. bad input
def _copy_without(wan_ckpt: Path, dest: Path, part: str) -> Path:
    shutil.copytree(wan_ckpt, dest)
    shutil.rmtree(dest / part)
    return dest


def test_a_repository_missing_a_part_is_named_with_its_path(wan_ckpt, tmp_path):
    from hiar.io.bundle import open_model_dir

    no_vae = _copy_without(wan_ckpt, tmp_path / "no-vae", "vae")
    with pytest.raises(FileNotFoundError) as err:
        open_model_dir(no_vae, "teacher.path")
    msg = str(err.value)
    assert "vae/" in msg and str(no_vae) in msg and "teacher.path" in msg
    assert "transformer/" not in msg.split("missing", 1)[1].split("(", 1)[0]  # only what is missing is listed

    no_transformer = _copy_without(wan_ckpt, tmp_path / "no-transformer", "transformer")
    with pytest.raises(FileNotFoundError, match=r"missing \['transformer/'\]") as err:
        open_model_dir(no_transformer)
    assert str(no_transformer) in str(err.value)

    no_text = _copy_without(wan_ckpt, tmp_path / "no-text", "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"missing \['text_encoder/'\]"):
        open_model_dir(no_text)


def test_a_missing_path_and_an_empty_directory_are_named(tmp_path):
    from hiar.io.bundle import open_model_dir

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        open_model_dir(missing, "teacher.real_score_path")
    assert str(missing) in str(err.value) and "teacher.real_score_path" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no model: missing \['transformer/'\]") as err:
        open_model_dir(empty)
    assert str(empty) in str(err.value)

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        open_model_dir(a_file)


def test_an_empty_s3_prefix_is_named(s3_server, monkeypatch):
    from hiar.io.bundle import open_model_dir

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = f"empty-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/prefix"
    with pytest.raises(FileNotFoundError, match="no objects under this S3 prefix") as err:
        open_model_dir(uri, "teacher.path")
    assert uri in str(err.value) and "teacher.path" in str(err.value)


def test_a_student_of_the_shipped_teacher_names_it_by_the_package_not_by_where_it_was_imported(tmp_path, monkeypatch):
    """Under ``ray job submit`` the package is imported from Ray's session copy of the checkout, gone once the cluster
    stops: the bundle's locations and the transformer's ``_name_or_path`` must name the teacher by the package."""
    from hiar.io.bundle import load_bundle, load_text, load_transformer, open_model_dir, save_bundle
    from hiar.io.storage import PACKAGE_PARENT

    teacher = open_model_dir(PACKAGE_PARENT / "hiar" / "assets" / "tiny-teacher")
    bundle = load_bundle(teacher)
    student = save_bundle(tmp_path / "student", load_transformer(teacher), load_text(teacher), bundle.codec,
                          {"seed": 0}, shared=teacher)
    locations = json.loads((student / "locations.json").read_text())
    assert locations == {"text": ["hiar/assets/tiny-teacher"], "codec": ["hiar/assets/tiny-teacher"]}
    name = json.loads((student / "transformer" / "config.json").read_text())["_name_or_path"]
    assert name.startswith("hiar/assets/tiny-teacher"), name
    monkeypatch.chdir(tmp_path)  # another working directory: the location still resolves beside the package
    loaded = load_bundle(student)
    assert loaded.model_dir.component_dir("text") == (PACKAGE_PARENT / "hiar" / "assets" / "tiny-teacher")


def test_a_bundle_whose_referenced_component_is_gone_or_altered(wan_ckpt, tmp_path):
    from hiar.io.bundle import open_model_dir

    teacher = shutil.copytree(wan_ckpt, tmp_path / "teacher")  # a private copy: this test deletes and alters it
    store = tmp_path / "components"
    student = _student(open_model_dir(teacher), tmp_path / "student", seed=1, store=store)
    refs = json.loads((student / "components.json").read_text())["components"]
    locations = json.loads((student / "locations.json").read_text())
    stored = {name: Path(locations[name][0]) for name in refs}
    assert locations["text"] == [str(stored["text"]), str(teacher.resolve())]  # the store first, then the teacher
    assert open_model_dir(student).components["text"][0] == stored["text"]

    # altered: every copy of the VAE fails its hash (replaced, not written through: the store holds hard links)
    for where in (stored["codec"], teacher):
        f = where / "vae" / "diffusion_pytorch_model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.unlink()
        f.write_bytes(bytes(data))
    with pytest.raises(FileNotFoundError) as err:
        open_model_dir(student, "model bundle")
    msg = str(err.value)
    sha = refs["codec"]["sha256"]
    assert "its codec component" in msg and sha[:16] in msg and str(student) in msg
    assert f"not {sha[:12]}" in msg and msg.count("(sha256 ") == 3  # the component's, and one per altered copy

    # gone: no copy of the text encoder anywhere
    shutil.rmtree(stored["text"])
    shutil.rmtree(teacher)
    with pytest.raises(FileNotFoundError) as err:
        open_model_dir(student)
    msg = str(err.value)
    assert "its text component" in msg and refs["text"]["sha256"][:16] in msg
    assert str(stored["text"]) in msg and str(teacher.resolve()) in msg  # every location tried is named


# ---------------------------------------------------------------------------------------------- 3. s3://
def _upload(client, bucket: str, root: Path, prefix: str) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")


def test_an_s3_repository_is_fetched_once_and_loads_like_the_local_one(wan_ckpt, s3_server, monkeypatch, node_cache):
    import hiar.io.storage
    from hiar.io.bundle import load_bundle, open_model_dir

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    client = s3_server.client()
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    _upload(client, bucket, wan_ckpt, "wan")
    uri = f"s3://{bucket}/wan"

    reads = []
    real_fs = hiar.io.storage.s3_filesystem

    class CountingFS:
        def __init__(self):
            self.fs = real_fs()

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_input_stream(self, path, *a, **k):
            reads.append(path)
            return self.fs.open_input_stream(path, *a, **k)

    monkeypatch.setattr(hiar.io.storage, "s3_filesystem", CountingFS)

    md = open_model_dir(uri, "teacher.path")
    assert md.layout == "wan" and md.source == uri
    assert md.root.is_relative_to(node_cache)
    assert _files(md.root) == sorted(_files(wan_ckpt) + [".hiar-fetch.json"])
    for f in _files(wan_ckpt):
        assert (md.root / f).read_bytes() == (wan_ckpt / f).read_bytes(), f
    assert len(reads) == len(_files(wan_ckpt))
    record = md.root / ".hiar-fetch.json"
    before = (record.read_text(), record.stat().st_mtime_ns, md.root.stat().st_ino)

    again = open_model_dir(uri)
    assert again.root == md.root and len(reads) == len(_files(wan_ckpt))  # nothing downloaded the second time
    assert (record.read_text(), record.stat().st_mtime_ns, md.root.stat().st_ino) == before

    via_transformer = open_model_dir(f"{uri}/transformer")
    assert via_transformer.source == uri and via_transformer.root == md.root and via_transformer.layout == "wan"
    assert open_model_dir(f"{uri}/") == md  # one spelling per prefix: a trailing slash does not fetch it again
    assert len(reads) == len(_files(wan_ckpt))
    assert (record.read_text(), record.stat().st_mtime_ns, md.root.stat().st_ino) == before

    remote, local = load_bundle(uri), load_bundle(wan_ckpt)
    assert len(reads) == len(_files(wan_ckpt))
    assert torch.equal(_outputs(remote.transformer), _outputs(local.transformer))
    assert torch.equal(remote.text.encode(PROMPTS[:2]), local.text.encode(PROMPTS[:2]))
    assert remote.codec.latent_channels == local.codec.latent_channels == 16
    # a bundle referencing an s3:// teacher's parts names the URI (another node fetches it), not this node's cache
    ref, where = md.reference("text")
    assert where == [uri] and ref["parts"] == ["tokenizer", "text_encoder"]


# ---------------------------------------------------------------------------------------------- 4-5. checks
def test_check_model_config_names_the_field_and_both_values(wan_ckpt):
    from hiar.io.bundle import check_model_config, open_model_dir
    from hiar.config import load_config

    md = open_model_dir(wan_ckpt)
    check_model_config(md, load_config("wan2.1-1.3b", cpu_overrides(wan_ckpt)))
    bad = load_config("wan2.1-1.3b", [*cpu_overrides(wan_ckpt), "model.num_layers=3"])
    with pytest.raises(ValueError) as err:
        check_model_config(md, bad)
    msg = str(err.value)
    assert "model.num_layers = 3" in msg and "says 2" in msg and str(wan_ckpt) in msg and "teacher.path" in msg
    assert msg.count("model.") == 1  # only the field that differs


def test_check_real_score_names_text_dim_48_and_32(wan_ckpt, wan_real_scores):
    from hiar.io.bundle import check_real_score, open_model_dir

    teacher = open_model_dir(wan_ckpt)
    standin, incompatible = wan_real_scores
    check_real_score(teacher, open_model_dir(standin))
    with pytest.raises(ValueError) as err:
        check_real_score(teacher, open_model_dir(incompatible))
    msg = str(err.value)
    assert "text_dim is 48" in msg and "32-wide" in msg and str(incompatible) in msg
    assert "in_channels" not in msg  # its latent channels fit: only what is wrong is named


# ---------------------------------------------------------------------------------------------- 6. references
def test_students_reference_the_teachers_parts_stored_once_per_hash(wan_ckpt, tmp_path):
    from hiar.io.bundle import load_bundle, load_text, open_model_dir
    from hiar.config import load_config
    from hiar.io.checksums import checksum_dir
    from hiar.io.storage import tree_sha256

    teacher = open_model_dir(wan_ckpt)
    store = tmp_path / "components"
    cfg = load_config("wan2.1-1.3b", cpu_overrides(wan_ckpt))
    s1 = _student(teacher, tmp_path / "student-1", seed=1, store=store, cfg=cfg)
    assert sorted(p.name for p in s1.iterdir()) == ["MODEL_CARD.md", "card.json", "components.json",
                                                    "hiar_config.yaml", "locations.json", "transformer"]
    refs = json.loads((s1 / "components.json").read_text())
    assert refs["schema"] == 1
    refs = refs["components"]
    assert refs["text"] == {"sha256": tree_sha256(wan_ckpt, ["tokenizer", "text_encoder"]),
                            "parts": ["tokenizer", "text_encoder"]}
    assert refs["codec"] == {"sha256": tree_sha256(wan_ckpt, ["vae"]), "parts": ["vae"]}
    stored = sorted(p.name for p in store.iterdir())
    assert stored == sorted([f"text-{refs['text']['sha256'][:16]}", f"codec-{refs['codec']['sha256'][:16]}"])
    text_copy = store / f"text-{refs['text']['sha256'][:16]}"
    assert _files(text_copy) == sorted(f"{p}/{f}" for p in ("tokenizer", "text_encoder") for f in _files(wan_ckpt / p))
    assert _files(store / f"codec-{refs['codec']['sha256'][:16]}") == [f"vae/{f}" for f in _files(wan_ckpt / "vae")]

    s2 = _student(teacher, tmp_path / "student-2", seed=2, store=store, cfg=cfg)
    assert sorted(p.name for p in store.iterdir()) == stored  # nothing new in the store
    assert json.loads((s2 / "components.json").read_text())["components"] == refs

    b = load_bundle(s1)
    assert b.model_dir.layout == "bundle" and b.model_dir.component_dir("text") == text_copy
    assert b.config is not None and b.config.model.num_layers == 2
    ref_text = load_text(teacher)
    assert torch.equal(b.text.encode(PROMPTS), ref_text.encode(PROMPTS))
    assert b.codec.latent_channels == 16
    assert not torch.equal(_outputs(b.transformer), _outputs(load_bundle(s2).transformer))

    # locations are where copies live on this machine, not what the model is
    before = checksum_dir(s1)
    (s1 / "locations.json").write_text(json.dumps({"text": ["/elsewhere"], "codec": []}))
    assert checksum_dir(s1) == before
    assert checksum_dir(s1) != checksum_dir(s2)


# ---------------------------------------------------------------------------------------------- 7. real score
#: the tiny preset at its smallest (one block pair of 2x2-token frames, one layer): a Distiller step takes seconds
TINY = ["distill.batch_size=2", "distill.micro_batch_size=2", "distill.ode_micro_batch_size=null",
        "distill.ode_batch_size=2", "distill.fkl_weight=0",
        "video.train_latent_frames=6", "video.latent_height=8", "video.latent_width=8", "model.num_layers=1",
        "model.ffn_dim=64", "model.num_attention_heads=2", "model.attention_head_dim=16"]


def _generator_step(cfg, generator, teacher, text, prompts, states, real_score=None):
    """One Distiller iteration (iteration 0 updates the generator); its gradients, parameters and metrics."""
    from hiar.methods.distill import Distiller

    d = Distiller(cfg, copy.deepcopy(generator), copy.deepcopy(teacher), text, real_score=real_score)
    log = d.iteration_step([(prompts, states)])
    assert log.generator_updated
    grads = [p.grad.detach().clone() for p in d.generator.parameters()]
    params = [p.detach().clone() for p in d.generator.parameters()]
    return grads, params, log.metrics


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_dmd_gradient_comes_from_the_named_real_score():
    """real_score=None is the teacher: a copy of the teacher gives the same update bit for bit; another model
    changes the DMD gradient (and so the updated generator)."""
    from hiar.config import load_config
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.io.text import TextEncoder
    from hiar.tiny.captions import train_prompts, vocabulary
    from tests.conftest import perturbed

    cfg = load_config("tiny", TINY)
    torch.manual_seed(0)
    teacher = perturbed(CausalWanTransformer3DModel(**cfg.model.kwargs()), seed=0)
    generator = perturbed(copy.deepcopy(teacher), scale=0.02, seed=1)
    other = perturbed(copy.deepcopy(teacher), scale=0.05, seed=2)
    text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length)
    prompts = train_prompts()[:2]
    c = cfg.video.latent_channels
    v = cfg.video
    states = torch.randn(2, cfg.schedule.sigmas().numel(), c, v.train_latent_frames, v.latent_height, v.latent_width,
                         generator=torch.Generator().manual_seed(3))

    g_a, p_a, m_a = _generator_step(cfg, generator, teacher, text, prompts, states)
    g_b, p_b, m_b = _generator_step(cfg, generator, teacher, text, prompts, states, real_score=copy.deepcopy(teacher))
    g_c, p_c, m_c = _generator_step(cfg, generator, teacher, text, prompts, states, real_score=copy.deepcopy(other))
    assert "fkl_loss" not in m_a  # the generator's gradient is DMD's alone
    assert _same(g_a, g_b) and _same(p_a, p_b) and m_a["dmd_loss"] == m_b["dmd_loss"]
    assert not _same(g_a, g_c) and not _same(p_a, p_c) and m_a["dmd_loss"] != m_c["dmd_loss"]
    diff = max((x - y).abs().max().item() for x, y in zip(g_a, g_c))
    assert diff > 1e-6 * max(x.abs().max().item() for x in g_a)


def test_the_real_score_path_is_checked_loaded_and_used_for_the_wan_miniature(wan_ckpt, wan_real_scores):
    """Through the loading path: check_models returns the real score's directory only when real_score_path is
    set; the stand-in loaded from it changes the DMD gradient; empty (= the teacher) equals passing None."""
    from hiar.io.bundle import load_text, load_transformer
    from hiar.config import load_config
    from hiar.platform.train_inputs import check_models

    standin, incompatible = wan_real_scores
    cfg_teacher = load_config("wan2.1-1.3b", [*cpu_overrides(wan_ckpt), "distill.fkl_weight=0"])
    cfg_real = load_config("wan2.1-1.3b", [*cpu_overrides(wan_ckpt, real_score=standin), "distill.fkl_weight=0"])
    teacher_dir, real_dir = check_models(cfg_teacher, cfg_teacher.teacher.path)
    assert teacher_dir.layout == "wan" and real_dir is None
    teacher_dir, real_dir = check_models(cfg_real, cfg_real.teacher.path)
    assert real_dir is not None and real_dir.root == standin and real_dir.transformer_config()["num_layers"] == 3
    bad = load_config("wan2.1-1.3b", cpu_overrides(wan_ckpt, real_score=incompatible))
    with pytest.raises(ValueError, match="text_dim is 48"):
        check_models(bad, bad.teacher.path)

    teacher = load_transformer(teacher_dir)
    text = load_text(teacher_dir)
    generator = load_transformer(teacher_dir)
    real = load_transformer(real_dir)
    assert sum(p.numel() for p in real.parameters()) != sum(p.numel() for p in teacher.parameters())
    cfg = load_config("wan2.1-1.3b", [*cpu_overrides(wan_ckpt), "distill.fkl_weight=0", "distill.batch_size=2",
                                      "distill.micro_batch_size=2"])
    g = GEOMETRY
    states = torch.randn(2, cfg.schedule.sigmas().numel(), 16, g["train_latent_frames"], g["latent_height"],
                         g["latent_width"], generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:2]
    g_none, p_none, _ = _generator_step(cfg, generator, teacher, text, prompts, states)
    g_self, p_self, _ = _generator_step(cfg, generator, teacher, text, prompts, states, real_score=teacher)
    g_real, p_real, _ = _generator_step(cfg, generator, teacher, text, prompts, states, real_score=real)
    assert _same(g_none, g_self) and _same(p_none, p_self)
    assert not _same(g_none, g_real) and not _same(p_none, p_real)


def test_a_wan_checkpoint_runs_in_bf16_where_the_gpu_precision_asks_for_it(wan_ckpt):
    """The GPU path (``precision.*`` = bf16) forced on the CPU: diffusers keeps Wan's time embedder and norms in
    fp32 inside a bf16 model; the velocity takes float32 latents in and gives float32 out, close to the fp32 model."""
    from hiar.io.bundle import load_bundle, runtime_dtypes
    from hiar.config import load_config
    from hiar.core.velocity import GuidedVelocity
    from tests.wan_checkpoint import PROMPTS, cpu_overrides

    cfg = load_config("wan2.1-1.3b", cpu_overrides(wan_ckpt))
    assert runtime_dtypes(cfg, "cpu")["transformer"] == torch.float32  # the CPU stays fp32 whatever the config
    bf16 = {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16, "vae": torch.float32}
    fast, exact = load_bundle(wan_ckpt, dtypes=bf16), load_bundle(wan_ckpt)
    assert fast.transformer.patch_embedding.weight.dtype == torch.bfloat16
    embeds = fast.text.encode(PROMPTS[:1])
    assert embeds.dtype == torch.float32
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    null = torch.zeros_like(embeds)
    a = GuidedVelocity(exact.transformer, embeds, null, guidance_scale=3.0)(x, 0.5)
    b = GuidedVelocity(fast.transformer, embeds, null, guidance_scale=3.0)(x, 0.5)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    cache = fast.transformer.new_kv_cache(3, None, 0, True)
    causal = GuidedVelocity(fast.transformer, embeds)
    assert causal(x, 0.5, cache=cache).dtype == torch.float32  # block-causal with a KV cache too
