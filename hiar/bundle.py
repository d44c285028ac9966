"""A model bundle: one directory that holds everything needed to run a generator (or a teacher).

Layout (diffusers-style subfolders, so each part loads with its own library's ``from_pretrained``)::

    transformer/        CausalWanTransformer3DModel (diffusers WanTransformer3DModel format)
    tokenizer/          transformers tokenizer
    text_encoder/       UMT5 encoder
    codec/              latent codec (codec.json for the pixel codec, or an AutoencoderKLWan folder)
    hiar_config.yaml    the HiarConfig the model was trained with (schedule, rollout, video geometry)
    card.json           provenance and scores; MODEL_CARD.md is its human-readable twin

The tiny teacher (``assets/tiny-teacher``), every distilled student checkpoint, the MLflow logged model and
what Ray Serve loads are all this one layout.  A missing part raises an error that names the path and the
parts expected, never a crash deep inside a loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hiar.codec import load_codec
from hiar.config import HiarConfig, _build
from hiar.model import CausalWanTransformer3DModel
from hiar.text import TextEncoder

CARD_FILE = "card.json"
CONFIG_FILE = "hiar_config.yaml"
PARTS = ("transformer/", "tokenizer/", "text_encoder/", "codec/")


@dataclass
class ModelBundle:
    transformer: CausalWanTransformer3DModel
    text: TextEncoder
    codec: object
    card: dict = field(default_factory=dict)
    config: HiarConfig | None = None
    path: Path | None = None


def save_bundle(directory: str | Path, transformer, text: TextEncoder, codec, card: dict,
                config: HiarConfig | None = None, title: str = "HiAR model", summary: str = "") -> Path:
    """Write a bundle; ``card`` keys ``preset, seed, steps, train_minutes, params, oracle, sampler, curve``
    are rendered into MODEL_CARD.md when present."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out / "transformer")
    text.save_pretrained(out)
    codec.save_pretrained(out / "codec")
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


def load_bundle(directory: str | Path, device: str = "cpu") -> ModelBundle:
    """Load a bundle written by :func:`save_bundle` (transformer in eval mode, on ``device``)."""
    root = Path(directory)
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"no model bundle at {str(root)!r}: missing {missing}; a bundle holds {list(PARTS)} and "
            f"{CARD_FILE} (written by hiar.bundle.save_bundle: the tiny teacher, a distilled student checkpoint)"
        )
    transformer = CausalWanTransformer3DModel.from_pretrained(root / "transformer").eval().to(device)
    text = TextEncoder.from_pretrained(root).to(device)
    codec = load_codec(root / "codec")
    if transformer.config.in_channels != codec.latent_channels:
        raise ValueError(
            f"model bundle {str(root)!r}: transformer/ takes {transformer.config.in_channels}-channel latents but "
            f"codec/ ({codec!r}) makes {codec.latent_channels}-channel ones; the two parts come from different models"
        )
    card = json.loads((root / CARD_FILE).read_text()) if (root / CARD_FILE).exists() else {}
    config = None
    if (root / CONFIG_FILE).exists():
        config = _build(HiarConfig, _known_fields(HiarConfig, yaml.safe_load((root / CONFIG_FILE).read_text())), "")
    return ModelBundle(transformer, text, codec, card, config, root)


__all__ = ["ModelBundle", "save_bundle", "load_bundle", "render_card", "CARD_FILE", "CONFIG_FILE"]
