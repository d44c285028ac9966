"""The learned drift scorers and their hub-free loaders: DINOv2, CLIP-IQA, LPIPS, MUSIQ and the CLIP text-video
alignment.

Four are learned and never downloaded (:func:`learned_scorers`): each looks for
its weights under ``<weights_dir>/<subdir>`` where ``weights_dir`` is an
argument or the ``HIAR_SCORER_WEIGHTS`` environment variable: a local
directory, or an ``s3://bucket/prefix`` fetched on first use, once per node,
into a checksummed cache (``hiar.io.storage.local_dir``; never a model hub).  When
they are absent, cannot be fetched or loaded, or their
library is not importable, the metric is listed in ``DriftReport.skipped``
with the reason, never reported as 0 or NaN.  Formats, each the library's own:

* ``dinov2/`` -- ``dinov2_similarity``: a ``transformers`` ``Dinov2Model``
  ``save_pretrained`` directory;
* ``clip_iqa/`` -- ``clip_iqa``: a ``transformers`` ``CLIPModel`` plus its
  tokenizer;
* ``lpips/`` -- ``lpips_distance``: ``lpips.pth``, the ``state_dict`` of a whole
  ``lpips.LPIPS`` module (backbone included: nothing is fetched from the
  torchvision model zoo), and optionally ``config.json`` ``{"net": "alex",
  "version": "0.1"}``; needs the ``lpips`` package (and torchvision);
* ``musiq/`` -- ``musiq``: one pyiqa MUSIQ checkpoint ``*.pth`` (the files pyiqa
  publishes); needs the ``pyiqa`` package.

Plus one that needs the prompt and is not a drift metric: ``clip_text``
(:class:`ClipTextAlignmentScorer`, ``clip/``: a ``transformers`` ``CLIPModel``
plus tokenizer, optionally a ``CLIPProcessor`` for its image mean/std),
the text-video alignment -- mean cosine similarity of the prompt's CLIP text
embedding and each frame's image embedding (higher is better).  Its per-segment
values are in ``DriftReport.alignment`` (metrics ``alignment/clip_text``, the
mean, ``alignment/clip_text_slope`` and ``alignment/clip_text_seg<k>``) and never
enter the Drift Score; :func:`drift_report` computes it only when given
``prompt=``.  Any other metric has the loader hook (``loader=`` argument, or
any object following :class:`Scorer`).


Each is a :class:`hiar.eval.scorers.WeightsScorer`: weights from local disk (or a fetched ``s3://`` copy) only,
loaded once, lazily; torch, transformers and the optional ``lpips`` / ``pyiqa`` packages are imported only when a
scorer loads.  Never Ray, MLflow or boto3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

from hiar.eval.scorers import METRIC_FLOORS, Scorer, WeightsScorer

__all__ = [
    "Dinov2SimilarityScorer",
    "ClipIqaScorer",
    "LpipsDistanceScorer",
    "MusiqScorer",
    "ClipTextAlignmentScorer",
    "learned_scorers",
]


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _to_model_input(frames: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray):
    """Frames -> normalised torch ``[t, 3, size, size]`` (whole frame resized, no crop: drift can be anywhere)."""
    import torch

    resized = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in frames])
    resized = (np.clip(resized, 0.0, 1.0) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(0, 3, 1, 2), dtype=np.float32))


def _mean_consecutive_cosine(features) -> float:
    import torch

    feats = torch.nn.functional.normalize(features.float(), dim=-1)
    return float((feats[1:] * feats[:-1]).sum(-1).mean())


class Dinov2SimilarityScorer(WeightsScorer):
    """Mean cosine similarity of DINOv2 CLS embeddings of consecutive frames.

    Weights: a ``transformers`` DINOv2 directory (``config.json`` + weights,
    e.g. a local copy of ``facebook/dinov2-base``) at ``<weights_dir>/dinov2``,
    loaded with ``local_files_only=True``.  Frames are resized to ``input_size``
    (a multiple of the patch size; 224 like DINOv2's evaluation) and
    ImageNet-normalised.
    """

    name = "dinov2_similarity"
    subdir = "dinov2"
    worse = "both"
    floor = METRIC_FLOORS["dinov2_similarity"]
    input_size = 224

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        patch = int(getattr(model.config, "patch_size", 14))
        size = max(patch, round(self.input_size / patch) * patch)

        def score(frames: np.ndarray) -> float:
            with torch.no_grad():
                out = model(pixel_values=_to_model_input(frames, size, _IMAGENET_MEAN, _IMAGENET_STD).to(device))
            return _mean_consecutive_cosine(out.pooler_output)

        return score


class ClipIqaScorer(WeightsScorer):
    """CLIP-IQA (Wang et al. 2023): softmax over the antonym prompts "Good photo." / "Bad photo.", mean over frames.

    Weights: a ``transformers`` CLIP directory (model + tokenizer) at
    ``<weights_dir>/clip_iqa``.  The original uses a ResNet-50 CLIP without
    positional embeddings at native resolution; a ViT CLIP here sees the frame
    resized to its ``image_size``, so values are close to, not identical with,
    the reference implementation.
    """

    name = "clip_iqa"
    subdir = "clip_iqa"
    worse = "down"
    floor = METRIC_FLOORS["clip_iqa"]
    prompts = ("Good photo.", "Bad photo.")

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import torch
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tokens = tokenizer(list(self.prompts), padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            text = model.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text)  # some versions return an output object
            text = torch.nn.functional.normalize(text.float(), dim=-1)
        size = int(model.config.vision_config.image_size)

        def score(frames: np.ndarray) -> float:
            with torch.no_grad():
                pixels = _to_model_input(frames, size, _CLIP_MEAN, _CLIP_STD).to(device)
                image = model.get_image_features(pixel_values=pixels)
                image = getattr(image, "pooler_output", image)
                image = torch.nn.functional.normalize(image.float(), dim=-1)
                probs = (100.0 * image @ text.T).softmax(dim=-1)  # CLIP's logit scale, as in CLIP-IQA
            return float(probs[:, 0].mean())

        return score


def _import_library(module: str, metric: str):
    """``import module``, or ImportError saying which metric needs it (the scorer then reports itself skipped)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken dependency (torchvision) failing at import time
        raise ImportError(f"the {module!r} package is not importable here ({type(exc).__name__}: {exc}); "
                          f"{metric} needs it, or pass loader=...") from exc


class LpipsDistanceScorer(WeightsScorer):
    """LPIPS distance of consecutive frames (lower = more alike), mean over the segment's pairs.

    Weights: ``<weights_dir>/lpips/lpips.pth`` = ``torch.save(lpips.LPIPS(net=...).state_dict())`` (the whole
    module, backbone included, so nothing is fetched from the torchvision model zoo) and optionally
    ``config.json`` ``{"net": "alex" | "vgg" | "squeeze", "version": "0.1"}``.  Needs the ``lpips`` package.
    """

    name = "lpips_distance"
    subdir = "lpips"
    worse = "both"
    floor = METRIC_FLOORS["lpips_distance"]

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import json

        import torch

        lpips = _import_library("lpips", self.name)
        conf = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        state_file = path / "lpips.pth"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} (a state_dict of lpips.LPIPS) is missing")
        # pretrained=False, pnet_rand=True: build the architecture only -- no download of any kind
        model = lpips.LPIPS(net=conf.get("net", "alex"), version=conf.get("version", "0.1"), pretrained=False,
                            pnet_rand=True, verbose=False)
        model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
        model = model.to(device).eval()

        def score(frames: np.ndarray) -> float:
            x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)) * 2.0 - 1.0
            with torch.no_grad():
                return float(model(x[1:].to(device), x[:-1].to(device)).mean())

        return score


class MusiqScorer(WeightsScorer):
    """MUSIQ image quality (0..100), mean over frames.

    Weights: exactly one pyiqa MUSIQ checkpoint ``<weights_dir>/musiq/*.pth`` (pyiqa's own release format, e.g.
    ``musiq_koniq_ckpt-*.pth``), loaded with ``pretrained_model_path`` so pyiqa downloads nothing.  Needs the
    ``pyiqa`` package.
    """

    name = "musiq"
    subdir = "musiq"
    worse = "down"
    floor = METRIC_FLOORS["musiq"]

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import torch

        _import_library("pyiqa", self.name)
        from pyiqa.archs.musiq_arch import MUSIQ

        ckpts = sorted(path.glob("*.pth"))
        if len(ckpts) != 1:
            raise FileNotFoundError(f"expected exactly one pyiqa MUSIQ checkpoint (*.pth) in {path}, found "
                                    f"{[c.name for c in ckpts]}")
        model = MUSIQ(pretrained_model_path=str(ckpts[0])).to(device).eval()

        def score(frames: np.ndarray) -> float:
            x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32))
            with torch.no_grad():
                return float(model(x.to(device)).mean())

        return score


def _clip_normalisation(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``image_mean`` / ``image_std`` of a saved image processor, else CLIP's: ``preprocessor_config.json`` (an
    image processor's ``save_pretrained``) or ``processor_config.json``'s ``image_processor`` (a ``CLIPProcessor``'s,
    transformers >= 5).  Read as JSON: the processor class itself would need torchvision."""
    import json

    conf: Dict[str, Any] = {}
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        if (path / name).is_file():
            data = json.loads((path / name).read_text())
            conf = data.get(key, {}) if key else data
            if "image_mean" in conf:
                break
    mean = np.asarray(conf.get("image_mean", _CLIP_MEAN), dtype=np.float32)
    std = np.asarray(conf.get("image_std", _CLIP_STD), dtype=np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError(f"{path}: image_mean / image_std must be 3 values (std > 0)")
    return mean, std


class ClipTextAlignmentScorer(WeightsScorer):
    """Text-video alignment: mean cosine similarity of the prompt's CLIP text embedding and the frames' image
    embeddings (in [-1, 1], higher is better), per segment.

    Weights: a ``transformers`` ``CLIPModel`` plus its tokenizer at ``<weights_dir>/clip`` (``save_pretrained``
    of both, or of a ``CLIPProcessor``, whose ``image_mean`` / ``image_std`` are then used), loaded with
    ``local_files_only=True``.  Frames are resized whole to the vision tower's ``image_size`` (no crop: drift can
    be anywhere); prompts longer than the text tower's positions are truncated.  Needs the prompt, so it is
    scored through :meth:`score_prompt_segment` (``needs_prompt``), and it is not a drift metric: its values go to
    ``DriftReport.alignment``, never into the Drift Score.
    """

    name = "clip_text"
    subdir = "clip"
    worse = "down"
    floor = 0.05
    needs_prompt = True

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray, str], float]:
        import torch
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        mean, std = _clip_normalisation(path)
        size = int(model.config.vision_config.image_size)
        max_length = int(model.config.text_config.max_position_embeddings)
        texts: Dict[str, Any] = {}

        def text_embedding(prompt: str):
            if prompt not in texts:
                tokens = tokenizer([prompt], padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt").to(device)
                with torch.no_grad():
                    text = model.get_text_features(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens.get("attention_mask"))
                text = getattr(text, "pooler_output", text)  # some versions return an output object
                texts[prompt] = torch.nn.functional.normalize(text.float(), dim=-1)[0]
            return texts[prompt]

        def score(frames: np.ndarray, prompt: str) -> float:
            text = text_embedding(prompt)
            with torch.no_grad():
                image = model.get_image_features(pixel_values=_to_model_input(frames, size, mean, std).to(device))
                image = getattr(image, "pooler_output", image)
                image = torch.nn.functional.normalize(image.float(), dim=-1)
            return float((image @ text).mean())

        return score

    def score_segment(self, frames: np.ndarray) -> float:
        raise TypeError(f"{self.name} needs the prompt: call score_prompt_segment(frames, prompt)")

    def score_prompt_segment(self, frames: np.ndarray, prompt: str) -> float:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(f"{self.name} is not available: {reason}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{self.name} needs a non-empty prompt, got {prompt!r}")
        assert self._fn is not None
        return float(self._fn(frames, prompt))


def learned_scorers(weights_dir: Optional[os.PathLike | str] = None, device: str = "cpu") -> List[Scorer]:
    """The paper's four learned metrics plus the text-video alignment (``clip_text``), each looking for its weights
    under ``weights_dir`` (or ``$HIAR_SCORER_WEIGHTS``)."""
    return [
        cls(weights_dir, device)
        for cls in (Dinov2SimilarityScorer, LpipsDistanceScorer, MusiqScorer, ClipIqaScorer, ClipTextAlignmentScorer)
    ]
