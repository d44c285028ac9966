"""What a model directory is: the one module that decides, checks and loads both layouts the platform reads.

Over 400 lines because it is the one bundle module: opening, the components a bundle references, saving, the
bundle config's one parser and loading all decide together what a model directory is, and nothing else may.

**The public Wan2.1 layout** (a diffusers repository exactly as published, e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``)::

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  scheduler/

**The project's bundle** (the tiny teacher, every trained student)::

    transformer/        CausalWanTransformer3DModel (diffusers WanTransformer3DModel format)
    hiar_config.yaml    the HiarConfig the model was trained with (schedule, rollout, video geometry)
    card.json           provenance and scores; MODEL_CARD.md is its human-readable twin
    components.json     the shared parts by reference: {"text": {sha256, parts}, "codec": {...}}
    locations.json      where copies of them live: {"text": [dir or URI, ...], ...} (not part of the checksum)
      or, embedded (the tiny teacher): tokenizer/  text_encoder/  hiar_text.json  codec/

Where a path is accepted (``teacher.path``, ``teacher.real_score_path``, ``--model``, ``serve.model_uri`` after
the registry resolved it) it may be a local directory or an ``s3://`` prefix (fetched once per node into a
checksummed cache, ``hiar.io.storage.local_dir``), and a path to a repository's ``transformer/`` folder stands for the
repository (the rest is resolved from the parent).

Why students reference their text encoder and VAE instead of carrying them: UMT5-XXL is ~11 GB in fp32 and every
student of one teacher shares it byte for byte. A reference names the component's content hash (sha256 over the
files of its parts) and where copies live: the run's component store (``<run_dir>/components``, written once per
hash), the teacher it came from, an MLflow run that holds it (``hiar.platform.registry`` adds that location when it
logs a bundle). A copy is used only when its hash matches; a verified copy is remembered by its file sizes and
mtimes (``<cache>/verified``), so an 11 GB encoder is hashed once per node, not at every load.

:func:`open_model_dir` is the one validity check (no weights are read): a missing part raises an error that names
the path and what is missing, before any compute. :func:`load_bundle` loads the parts it found onto a device in
the requested dtypes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hiar.config import HiarConfig, _build
from hiar.core.model import CausalWanTransformer3DModel
from hiar.identity import identity
from hiar.io.checksums import LOCATIONS
from hiar.io.codec import CODEC_FILE, load_codec
from hiar.io.storage import cache_root, local_dir, locatable_path, portable_path, resolve_path, tree_sha256
from hiar.io.text import TextEncoder

CARD_FILE = "card.json"
CONFIG_FILE = "hiar_config.yaml"
COMPONENTS_FILE = "components.json"
LOCATIONS_FILE = LOCATIONS
TEXT_META = "hiar_text.json"
WAN_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
EMBEDDED_PARTS = {"text": ("tokenizer", "text_encoder", TEXT_META), "codec": ("codec",)}
WAN_COMPONENT_PARTS = {"text": ("tokenizer", "text_encoder"), "codec": ("vae",)}
COMPONENTS = ("text", "codec")
EXPECTED = (f"expected a Wan2.1 diffusers repository -- model_index.json, transformer/, vae/, text_encoder/, "
            f"tokenizer/ -- or a bundle of this project -- transformer/, {CONFIG_FILE}, {COMPONENTS_FILE}")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: where each part is (local paths) and what layout it came in."""

    source: str  # as given, or the repository root when a transformer/ folder was given
    root: Path  # local copy of ``source``
    layout: str  # "wan" (public diffusers layout) | "bundle" (the project's own)
    components: dict  # name -> (local directory holding the parts, the parts, sha256 or "")

    @property
    def transformer(self) -> Path:
        return self.root / "transformer"

    def component_dir(self, name: str) -> Path:
        return self.components[name][0]

    def transformer_config(self) -> dict:
        return json.loads((self.transformer / "config.json").read_text())

    def text_dim(self) -> int:
        """The text encoder's width (what a transformer's ``text_dim`` must be to use it)."""
        return int(json.loads((self.component_dir("text") / "text_encoder" / "config.json").read_text())["d_model"])

    def latent_channels(self) -> int:
        """Channels of the latents the codec makes (what a transformer's ``in_channels`` must be)."""
        d = self.component_dir("codec")
        if self.components["codec"][1] == ("vae",) or (d / "vae").is_dir():
            return int(json.loads((d / "vae" / "config.json").read_text())["z_dim"])
        meta = json.loads((d / "codec" / CODEC_FILE).read_text())
        return 3 * (int(meta.get("frames_per_latent", 1)) + int(meta.get("history_frames", 0)))

    def reference(self, name: str) -> tuple[dict, list[str]]:
        """``(components.json entry, locations)`` of this directory's component ``name`` (hashed once per node)."""
        where, parts, sha = self.components[name]
        sha = sha or component_sha256(where, parts)
        remote = "://" in self.source and where == self.root  # another node fetches it from the source
        return {"sha256": sha, "parts": list(parts)}, [self.source.rstrip("/") if remote else locatable_path(where)]


@dataclass
class ModelBundle:
    transformer: CausalWanTransformer3DModel
    text: TextEncoder
    codec: object
    card: dict = field(default_factory=dict)
    config: HiarConfig | None = None
    path: Path | None = None
    model_dir: ModelDir | None = None


# ---------------------------------------------------------------------------------------------- opening
def _repository_uri(uri: str) -> str:
    """A path to a repository's ``transformer/`` folder stands for the repository itself."""
    stripped = uri.rstrip("/")
    if "://" in stripped:  # one spelling per prefix: ``s3://b/wan/`` must not re-fetch the cached ``s3://b/wan``
        return stripped.rsplit("/", 1)[0] if stripped.rsplit("/", 1)[-1] == "transformer" else stripped
    if stripped.rsplit("/", 1)[-1] != "transformer":
        return uri
    p = Path(stripped)
    return str(p.parent) if (p / "config.json").is_file() else uri


def open_model_dir(uri: str | Path, what: str = "model directory") -> ModelDir:
    """Check a model directory (either layout, local or ``s3://``) without loading weights.

    Raises ``FileNotFoundError`` naming the path and the missing parts, or ``ValueError`` for a component whose
    copies all fail their hash.
    """
    source = _repository_uri(str(uri))
    try:
        root = local_dir(source, what)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} ({EXPECTED})") from None
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {source!r} is a file, not a directory ({EXPECTED})")
    if (root / "model_index.json").is_file() or (root / "vae").is_dir():
        missing = [f"{p}/" for p in WAN_PARTS if not (root / p).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{what} {source!r} is not a Wan2.1 diffusers repository: missing {missing} (expected, as published: "
                f"model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
        comps = {name: (root, parts, "") for name, parts in WAN_COMPONENT_PARTS.items()}
        return ModelDir(source, root, "wan", comps)
    if not holds_model(root):
        raise FileNotFoundError(f"{what} {source!r} holds no model: missing ['transformer/'] ({EXPECTED})")
    refs, locations = component_refs(root)
    comps = {}
    for name in COMPONENTS:
        if name in refs:
            ref = refs[name]
            where = resolve_component(name, ref, locations.get(name, []), what=f"{what} {source!r}")
            comps[name] = (where, tuple(ref["parts"]), ref["sha256"])
            continue
        parts = tuple(p for p in EMBEDDED_PARTS[name] if (root / p).exists())
        need = [p for p in EMBEDDED_PARTS[name] if p != TEXT_META]
        missing = [f"{p}/" for p in need if p not in parts]
        if missing:
            raise FileNotFoundError(
                f"{what} {source!r}: missing {missing} and no {name!r} entry in {COMPONENTS_FILE} (a bundle holds "
                f"transformer/ plus its text encoder and codec, embedded or referenced by hash)")
        comps[name] = (root, parts, "")
    return ModelDir(source, root, "bundle", comps)


def component_refs(root: str | Path) -> tuple[dict, dict]:
    """``(references, locations)`` of a bundle directory: ``components.json``'s ``{name: {sha256, parts}}`` and
    ``locations.json``'s ``{name: [where to fetch it]}``; empty for a bundle that embeds its components."""
    root = Path(root)
    refs = json.loads((root / COMPONENTS_FILE).read_text()).get("components", {}) \
        if (root / COMPONENTS_FILE).is_file() else {}
    locations = json.loads((root / LOCATIONS_FILE).read_text()) if (root / LOCATIONS_FILE).is_file() else {}
    return refs, locations


def holds_model(path: str | Path) -> bool:
    """Whether the local directory ``path`` holds a model (its ``transformer/``): the cheap test of "is this already a
    model directory here" before resolving or downloading one; :func:`open_model_dir` is the full check."""
    return (Path(path) / "transformer").is_dir()


# ---------------------------------------------------------------------------------------------- components
def _verified_marker(where: Path, parts) -> Path:
    key = identity([str(where.resolve()), list(parts)])
    return cache_root() / "verified" / f"{key}.json"


def _fingerprint(where: Path, parts) -> list:
    files = []
    for part in parts:
        p = where / part
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            st = f.stat()
            files.append([f.relative_to(where).as_posix(), st.st_size, st.st_mtime_ns])
    return files


def component_sha256(where: Path, parts) -> str:
    """The component's content hash; remembered per node by file sizes and mtimes (hashing 11 GB takes a while)."""
    marker = _verified_marker(where, parts)
    prints = _fingerprint(where, parts)
    try:
        record = json.loads(marker.read_text())
        if record["files"] == prints:
            return record["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    sha = tree_sha256(where, parts)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps({"path": str(where.resolve()), "parts": list(parts), "files": prints, "sha256": sha}))
    os.replace(tmp, marker)
    return sha


def component_cache(sha: str) -> Path:
    """Where a fetched component with this hash lives on this node (``hiar.platform.registry`` downloads into it)."""
    return cache_root() / "components" / sha[:32]


def resolve_component(name: str, ref: dict, locations: list[str], what: str = "bundle") -> Path:
    """A local directory holding the referenced component's parts with the referenced hash.

    Tries the node cache, then each location in order (local directories, ``s3://`` prefixes); ``runs:/`` locations
    are MLflow's and are fetched into :func:`component_cache` by ``hiar.platform.registry`` before this runs."""
    sha, parts = ref["sha256"], tuple(ref["parts"])
    tried = []
    for where in [str(component_cache(sha)), *locations]:
        if "://" in where and not where.startswith("s3://"):
            tried.append(f"{where} (fetched by the registry)")
            continue
        try:
            path = local_dir(resolve_path(where), f"{name} component")
        except (FileNotFoundError, OSError) as err:
            tried.append(f"{where} ({err})")
            continue
        if not all((path / p).exists() for p in parts):
            tried.append(f"{where} (no {list(parts)})")
            continue
        got = component_sha256(path, parts)
        if got != sha:
            tried.append(f"{where} (sha256 {got[:12]}, not {sha[:12]})")
            continue
        return path
    raise FileNotFoundError(f"{what}: its {name} component (sha256 {sha[:16]}, parts {list(parts)}) is at none of "
                            f"its locations: {'; '.join(tried)}")


def store_component(store: Path, name: str, ref: dict, src: Path) -> str:
    """Copy a component into the run's store once per hash (hard links where the filesystem allows)."""
    dst = Path(store) / f"{name}-{ref['sha256'][:16]}"
    if not dst.exists():
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex}")
        for part in ref["parts"]:
            s, d = src / part, tmp / part
            d.parent.mkdir(parents=True, exist_ok=True)
            if s.is_file():
                link_or_copy(s, d)
            else:
                shutil.copytree(s, d, copy_function=link_or_copy)
        try:
            os.replace(tmp, dst)
        except OSError:  # another writer finished first: theirs is the same content
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dst.resolve())


def _portable_name_or_path(config_json: Path) -> None:
    """diffusers records where the weights were loaded from (``_name_or_path``); written as identities write paths
    (``portable_path``), so a student initialised from the shipped teacher inside a Ray job does not name Ray's
    session copy of the checkout."""
    cfg = json.loads(config_json.read_text())
    if cfg.get("_name_or_path") and "://" not in cfg["_name_or_path"]:
        cfg["_name_or_path"] = portable_path(cfg["_name_or_path"])
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def link_or_copy(src, dst) -> None:
    """A hard link where the filesystem allows (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------- saving
def save_bundle(directory: str | Path, transformer, text: TextEncoder, codec, card: dict,
                config: HiarConfig | None = None, title: str = "HiAR model", summary: str = "", *,
                shared: ModelDir | None = None, store: str | Path | None = None) -> Path:
    """Write a bundle. With ``shared`` (the teacher's model directory) the text encoder and codec are referenced,
    not copied (``store``: the run's component store, which gets one copy per hash); without it they are embedded
    (the tiny teacher). ``card`` keys ``preset, seed, steps, train_minutes, params, oracle, sampler, curve`` are
    rendered into MODEL_CARD.md when present."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out / "transformer")
    _portable_name_or_path(out / "transformer" / "config.json")
    if shared is None:
        text.save_pretrained(out)
        codec.save_pretrained(out / "codec")
    else:
        refs, locations = {}, {}
        for name in COMPONENTS:
            refs[name], locations[name] = shared.reference(name)
            if store is not None:
                locations[name].insert(0, store_component(Path(store), name, refs[name], shared.component_dir(name)))
        (out / COMPONENTS_FILE).write_text(json.dumps({"schema": 1, "components": refs}, indent=2))
        (out / LOCATIONS_FILE).write_text(json.dumps(locations, indent=2))
    if config is not None:
        (out / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    (out / "MODEL_CARD.md").write_text(render_card(card, title, summary))
    return out


def render_card(card: dict, title: str, summary: str = "") -> str:
    lines = [f"# {title}", ""] + ([summary, ""] if summary else [])
    for key in ("preset", "seed", "steps", "train_minutes", "params", "source_run", "teacher_checksum"):
        if key in card:
            lines.append(f"- {key}: {card[key]}")
    if "oracle" in card:
        s = card.get("sampler", {})
        lines += ["", f"Oracle scores (held-out prompts, {s.get('num_steps', '?')} Euler steps, shift "
                      f"{s.get('shift', '?')}, CFG {s.get('guidance_scale', '?')}):", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in sorted(card["oracle"].items()) if isinstance(v, float)]
    if "curve" in card:
        lines += ["", "| minutes | steps | caption consistency | motion accuracy |", "|---|---|---|---|"]
        lines += [f"| {c['minutes']:.1f} | {c['step']} | {c['caption_consistency']:.3f} | {c['motion_accuracy']:.3f} |"
                  for c in card["curve"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- configs
def _known_fields(cls, data: dict) -> dict:
    """Drop fields this version's config does not know: a bundle written by a newer version still loads
    (its model, schedule and geometry fields are what matter here)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            out[f.name] = _known_fields(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) else value
    return out


def config_from_dict(data: dict) -> HiarConfig:
    """A bundle's config (``hiar_config.yaml`` contents), fields unknown to this version dropped."""
    return _build(HiarConfig, _known_fields(HiarConfig, data), "")


def bundle_config(md: ModelDir | str | Path) -> HiarConfig | None:
    """The config a bundle was trained with (``hiar_config.yaml``, parsed by :func:`config_from_dict`), or None for a
    directory without one (a Wan2.1 repository)."""
    path = (md.root if isinstance(md, ModelDir) else Path(md)) / CONFIG_FILE
    return config_from_dict(yaml.safe_load(path.read_text())) if path.is_file() else None


MODEL_FIELDS_CHECKED = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                        "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps")


def check_model_config(md: ModelDir, cfg: HiarConfig, key: str = "teacher.path") -> None:
    """The config's ``model.*`` must describe the checkpoint it loads: a mismatch names both values."""
    have = md.transformer_config()
    want = cfg.model.kwargs()
    bad = []
    for name in MODEL_FIELDS_CHECKED:
        if name not in have:
            continue
        a, b = want[name], have[name]
        if isinstance(b, list):
            a, b = list(a), list(b)
        if (abs(a - b) > 1e-12 * max(1.0, abs(b))) if isinstance(b, float) else a != b:
            bad.append(f"model.{name} = {want[name]!r} but {md.source}/transformer/config.json says {have[name]!r}")
    if bad:
        raise ValueError(f"the config does not describe the checkpoint at {key}: " + "; ".join(bad))


def check_real_score(teacher: ModelDir, real: ModelDir) -> None:
    """The real score shares the teacher's text encoder and VAE: its text and latent widths must fit them."""
    rc = real.transformer_config()
    problems = []
    if int(rc["text_dim"]) != teacher.text_dim():
        problems.append(f"its text_dim is {rc['text_dim']} but the shared text encoder ({teacher.source}) makes "
                        f"{teacher.text_dim()}-wide embeddings")
    channels = teacher.latent_channels()
    for k in ("in_channels", "out_channels"):
        if int(rc[k]) != channels:
            problems.append(f"its {k} is {rc[k]} but the shared codec ({teacher.source}) makes {channels}-channel "
                            f"latents")
    if problems:
        raise ValueError(f"teacher.real_score_path {real.source!r} does not fit the teacher: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- loading
def runtime_dtypes(cfg: HiarConfig | None, device: str | torch.device) -> dict[str, torch.dtype]:
    """The dtypes each part runs in on ``device``: ``precision.*`` on a GPU; float32 on the CPU."""
    if torch.device(device).type != "cuda" or cfg is None:
        return {"transformer": torch.float32, "text_encoder": torch.float32, "vae": torch.float32}
    p = cfg.precision
    return {"transformer": DTYPES[p.transformer], "text_encoder": DTYPES[p.text_encoder], "vae": DTYPES[p.vae]}


def load_transformer(md: ModelDir, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> CausalWanTransformer3DModel:
    model = CausalWanTransformer3DModel.from_pretrained(md.transformer, torch_dtype=dtype)
    return model.eval().to(device)


def load_text(md: ModelDir, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    return TextEncoder.from_pretrained(md.component_dir("text"), dtype=dtype, device=device)


def load_model_codec(md: ModelDir, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    where = md.component_dir("codec")
    if (where / "codec" / CODEC_FILE).is_file():
        return load_codec(where / "codec")
    return load_codec(where, dtype=dtype, device=device)


def load_bundle(directory: str | Path | ModelDir, device: str = "cpu",
                dtypes: dict[str, torch.dtype] | None = None) -> ModelBundle:
    """Load a model directory of either layout (transformer in eval mode, every part on ``device``)."""
    md = directory if isinstance(directory, ModelDir) else open_model_dir(directory)
    dt = dtypes or runtime_dtypes(None, device)
    transformer = load_transformer(md, device, dt["transformer"])
    text = load_text(md, device, dt["text_encoder"])
    codec = load_model_codec(md, device, dt["vae"])
    if transformer.config.in_channels != codec.latent_channels:
        raise ValueError(
            f"model directory {md.source!r}: transformer/ takes {transformer.config.in_channels}-channel latents but "
            f"{md.components['codec'][1][0]}/ ({codec!r}) makes {codec.latent_channels}-channel ones; the two parts "
            f"come from different models"
        )
    card = json.loads((md.root / CARD_FILE).read_text()) if (md.root / CARD_FILE).exists() else {}
    return ModelBundle(transformer, text, codec, card, bundle_config(md), md.root, md)


__all__ = ["ModelDir", "ModelBundle", "open_model_dir", "holds_model", "save_bundle", "load_bundle", "load_transformer",
           "load_text", "load_model_codec", "render_card", "check_model_config", "check_real_score", "runtime_dtypes",
           "resolve_component", "component_cache", "component_sha256", "config_from_dict", "bundle_config",
           "CARD_FILE", "CONFIG_FILE", "COMPONENTS_FILE", "LOCATIONS_FILE", "component_refs", "holds_model"]
