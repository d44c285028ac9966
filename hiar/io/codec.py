"""Latent codecs: video <-> the latents the DiT denoises, behind one interface.

Every stage that touches pixels (data generation, evaluation, the serving decoder) goes through a
:class:`Codec`, so the same code runs the ``tiny`` preset (pixel space, :class:`PixelCodec`) and
``wan2.1-1.3b`` (Wan2.1's causal 3-D VAE, :class:`WanVAECodec`) without branching on the preset.

Layouts (fixed here so nobody has to guess):

* video: float32 ``[B, T, H, W, 3]`` in ``[0, 1]`` -- what ``hiar.tiny.world`` renders, with a batch axis;
  channels last because that is how frames are drawn, stored and written to MP4.
* latents: float32 ``[B, C, F, H', W']`` -- what ``WanTransformer3DModel`` consumes, already *normalised*
  (roughly zero mean, unit variance per channel), so the noise schedule means the same thing for both codecs.

``load_codec`` picks the codec from what a directory holds: ``codec.json`` (pixel) or a diffusers
``AutoencoderKLWan`` folder (directly or as the ``vae/`` subfolder of a pipeline root).
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Iterable, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["Codec", "PixelCodec", "WanVAECodec", "load_codec", "CODEC_FILE", "VAE_SUBFOLDER"]

PathLike = Union[str, os.PathLike]
VideoLike = Union[torch.Tensor, np.ndarray]

#: Metadata file of a PixelCodec directory.
CODEC_FILE = "codec.json"
#: The VAE's folder inside a diffusers pipeline directory.
VAE_SUBFOLDER = "vae"

_LOAD_HELP = (
    f"expected a directory with {CODEC_FILE} (written by PixelCodec.save_pretrained), a diffusers "
    f"AutoencoderKLWan folder (config.json + weights), or a pipeline root containing {VAE_SUBFOLDER}/; "
    f"or the kind 'pixel'"
)


def _as_video(video: VideoLike) -> torch.Tensor:
    """Check the ``[B, T, H, W, 3]`` layout and return a float32 tensor (numpy accepted, as the world renders)."""
    v = torch.as_tensor(video)
    if v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(
            f"video must be [B, T, H, W, 3] (batched, RGB channels last), got shape {tuple(v.shape)}; "
            f"add a batch axis with video[None] for a single clip"
        )
    return v.to(torch.float32)


def _check_latents(latents: torch.Tensor, channels: int) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if hasattr(latents, "shape") else type(latents).__name__
        raise ValueError(f"latents must be a [B, {channels}, F, H', W'] tensor, got {shape}")
    return latents


class Codec(abc.ABC):
    """The interface every codec implements (see the module docstring for layouts)."""

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """``C`` of the latents (the DiT's ``in_channels``)."""

    @abc.abstractmethod
    def encode(self, video: VideoLike) -> torch.Tensor:
        """``[B, T, H, W, 3]`` in [0, 1] -> normalised latents ``[B, C, F, H', W']`` (deterministic)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents ``[B, C, F, H', W']`` -> video ``[B, T, H, W, 3]`` (clamped to [0, 1] if asked)."""

    @abc.abstractmethod
    def latent_shape(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        """``(C, F, H', W')`` of the latents of a ``num_frames x height x width`` clip; ValueError if invalid."""

    @abc.abstractmethod
    def num_frames_for(self, latent_frames: int) -> int:
        """How many video frames ``latent_frames`` latent frames decode to."""

    @abc.abstractmethod
    def save_pretrained(self, directory: PathLike) -> Path:
        """Write the codec so that :func:`load_codec` on ``directory`` restores it."""


# --------------------------------------------------------------------------
# Pixel space (tiny preset)
# --------------------------------------------------------------------------


class PixelCodec(Codec):
    """Identity codec with a per-RGB-channel affine normalisation: ``latent = (pixel - mean) / std``.

    Why not raw pixels: the diffusion schedule assumes data of roughly unit scale, like a VAE's normalised
    latents; a per-channel standardisation fitted on sample clips (:meth:`fit`) gives that while staying
    exactly invertible, so any artefact in a decoded video is the model's, not the codec's. There is no
    spatial compression.

    ``frames_per_latent = k`` packs ``k`` consecutive frames into one latent frame of ``3k`` channels (channel
    ``3 * i + c`` is colour ``c`` of the latent frame's ``i``-th video frame), a lossless stand-in for the
    temporal compression of Wan's VAE (x4).

    ``history_frames = h`` appends, after those, the ``h`` video frames *before* the latent frame's first one
    (channel ``3k + 3j + c`` is colour ``c`` of frame ``k * f - 1 - j``; before the clip starts, frame 0 is
    repeated), so a latent frame has ``3 (k + h)`` channels; ``decode`` reads only the latent frame's own
    frames. Latent frame ``f`` still depends only on frames up to its own, so causal rollouts, the KV cache and
    streaming decode are unchanged.

    Why either exists: with one frame per latent frame the *direction* of a motion exists only between tokens
    of different frames, and a small teacher has to learn it through attention; it does not (the tiny teacher's
    loss did not depend on the sign of the direction word even after 28k steps). With the previous frame in
    the same token the direction is part of what one token looks like. Packing (``k = 2``) gets that but halves
    the number of latent frames, and shapes formed more slowly. History keeps one latent frame per video frame,
    and the copy it adds is plain (channels ``3..5`` of frame ``f`` equal channels ``0..2`` of frame ``f - 1``).
    That is what made the tiny teacher follow its captions (issue 3): see ``hiar/assets/tiny-teacher/MODEL_CARD.md``.

    The default ``mean = std = 0.5`` maps [0, 1] to [-1, 1], the pixel convention of Wan's VAE.
    """

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 frames_per_latent: int = 1, history_frames: int = 0) -> None:
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {mean} and {std}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean}, std={std}")
        if int(frames_per_latent) != frames_per_latent or frames_per_latent < 1:
            raise ValueError(f"frames_per_latent must be an integer >= 1, got {frames_per_latent!r}")
        if int(history_frames) != history_frames or history_frames < 0:
            raise ValueError(f"history_frames must be an integer >= 0, got {history_frames!r}")
        self.mean = mean
        self.std = std
        self.frames_per_latent = int(frames_per_latent)
        self.history_frames = int(history_frames)

    @classmethod
    def fit(cls, videos: Union[VideoLike, Iterable[VideoLike]], min_std: float = 1e-3,
            frames_per_latent: int = 1, history_frames: int = 0) -> "PixelCodec":
        """Per-channel mean and (population) std over every pixel of sample clips.

        ``videos``: a ``[..., 3]`` array/tensor (e.g. ``[B, T, H, W, 3]``) or an iterable of them (e.g. clips
        ``[T, H, W, 3]`` streamed from the world). Accumulates in float64 so many clips do not lose precision.
        ``min_std`` floors the std so a constant channel (e.g. a single-colour sample) cannot divide by zero.
        """
        if isinstance(videos, (torch.Tensor, np.ndarray)):
            videos = [videos]
        total = np.zeros(3)
        total_sq = np.zeros(3)
        count = 0
        for v in videos:
            arr = torch.as_tensor(v).detach().to("cpu", torch.float64).numpy()
            if arr.ndim < 1 or arr.shape[-1] != 3:
                raise ValueError(f"fit needs RGB-last clips [..., 3], got shape {arr.shape}")
            flat = arr.reshape(-1, 3)
            total += flat.sum(0)
            total_sq += (flat * flat).sum(0)
            count += flat.shape[0]
        if count == 0:
            raise ValueError("fit needs at least one pixel")
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return cls(mean=mean.tolist(), std=np.maximum(std, min_std).tolist(), frames_per_latent=frames_per_latent,
                   history_frames=history_frames)

    @property
    def latent_channels(self) -> int:
        return 3 * (self.frames_per_latent + self.history_frames)

    @property
    def history_lead(self) -> int:
        """The video frames before a latent frame that its history channels hold, rounded up to whole latent
        frames: what a window that does not start its video is encoded with, then dropped
        (``hiar.methods.pretrain.window_latents``)."""
        k = self.frames_per_latent
        return k * -(-self.history_frames // k)

    def _stats(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device)
        return mean, std

    def encode(self, video: VideoLike) -> torch.Tensor:
        v = _as_video(video)
        b, t, h, w, _ = v.shape
        k = self.frames_per_latent
        self.latent_shape(t, h, w)  # the frame count must be a multiple of k
        mean, std = self._stats(v)
        z = (v - mean) / std
        own = z.view(b, t // k, k, h, w, 3).permute(0, 2, 5, 1, 3, 4).reshape(b, 3 * k, t // k, h, w)
        first = torch.arange(0, t, k, device=z.device)  # each latent frame's first video frame
        history = [z[:, (first - j).clamp(min=0)].permute(0, 4, 1, 2, 3) for j in range(1, self.history_frames + 1)]
        return torch.cat([own, *history], dim=1).contiguous()

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        z = _check_latents(latents, self.latent_channels).to(torch.float32)
        b, _, f, h, w = z.shape
        k = self.frames_per_latent
        mean, std = self._stats(z)
        own = z[:, : 3 * k].reshape(b, k, 3, f, h, w)  # the history channels are not decoded
        video = own.permute(0, 3, 1, 4, 5, 2).reshape(b, f * k, h, w, 3) * std + mean
        return (video.clamp(0.0, 1.0) if clamp else video).contiguous()

    def latent_shape(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        if min(int(num_frames), int(height), int(width)) < 1:
            raise ValueError(f"frames, height and width must be >= 1, got {num_frames}, {height}, {width}")
        k = self.frames_per_latent
        if int(num_frames) % k:
            raise ValueError(f"{num_frames} frames cannot be packed {k} to a latent frame (frames_per_latent={k}); "
                             f"use a multiple of {k}")
        return (self.latent_channels, int(num_frames) // k, int(height), int(width))

    def num_frames_for(self, latent_frames: int) -> int:
        if int(latent_frames) < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return int(latent_frames) * self.frames_per_latent

    def save_pretrained(self, directory: PathLike) -> Path:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        payload = {"type": "pixel", "mean": list(self.mean), "std": list(self.std),
                   "frames_per_latent": self.frames_per_latent, "history_frames": self.history_frames}
        (root / CODEC_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        return root

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> "PixelCodec":
        path = Path(directory) / CODEC_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} not found; expected {CODEC_FILE} written by PixelCodec.save_pretrained"
            )
        payload = json.loads(path.read_text())
        if payload.get("type") != "pixel":
            raise ValueError(f"{str(path)!r} describes a {payload.get('type')!r} codec, not 'pixel'")
        # codec.json files written before these keys existed hold one frame per latent frame and no history
        return cls(mean=payload["mean"], std=payload["std"], frames_per_latent=payload.get("frames_per_latent", 1),
                   history_frames=payload.get("history_frames", 0))

    def __repr__(self) -> str:
        fmt = lambda xs: "(" + ", ".join(f"{x:.4g}" for x in xs) + ")"  # noqa: E731
        return (f"PixelCodec(mean={fmt(self.mean)}, std={fmt(self.std)}, frames_per_latent={self.frames_per_latent}, "
                f"history_frames={self.history_frames})")


# --------------------------------------------------------------------------
# Wan2.1 VAE (wan2.1-1.3b preset)
# --------------------------------------------------------------------------


def _resolve_vae_dir(directory: PathLike) -> Path:
    """Accept either the VAE folder itself or a pipeline root holding ``vae/``."""
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"codec path {str(root)!r} does not exist; {_LOAD_HELP}")
    for candidate in (root / VAE_SUBFOLDER, root):
        cfg = candidate / "config.json"
        if cfg.is_file():
            cls_name = json.loads(cfg.read_text()).get("_class_name")
            if cls_name not in (None, "AutoencoderKLWan"):
                raise ValueError(f"{str(cfg)!r} is a {cls_name}, not an AutoencoderKLWan")
            return candidate
    raise FileNotFoundError(
        f"no AutoencoderKLWan config.json in {str(root)!r} or {str(root / VAE_SUBFOLDER)!r}; {_LOAD_HELP}"
    )


class WanVAECodec(Codec):
    """Wan2.1's causal 3-D VAE (diffusers ``AutoencoderKLWan``) with WanPipeline's latent normalisation.

    * Pixels go to the VAE in [-1, 1] (``2 * video - 1``) and come back the same way.
    * ``encode`` takes the posterior *mode*, not a sample: data generation must be deterministic (the same
      clip always gives the same latents), and the Wan posterior is narrow enough that sampling adds nothing.
    * Latents are normalised with the config's ``latents_mean``/``latents_std``: ``(z - mean) / std`` on
      encode, ``z * std + mean`` before decoding -- the inverse of what ``WanPipeline`` does after denoising.
    * Compression: temporal x4 (the first frame alone, then groups of 4: T = 1 + 4k frames <-> 1 + k latent
      frames) and spatial x8, read from ``vae.config.scale_factor_temporal/spatial`` when present, otherwise
      derived from the down-sampling layout.
    """

    def __init__(self, vae) -> None:
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.temporal_factor = int(
            getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        )
        self.spatial_factor = int(
            getattr(cfg, "scale_factor_spatial", None)
            or 2 ** (len(cfg.dim_mult) - 1) * int(getattr(cfg, "patch_size", None) or 1)
        )
        z = int(cfg.z_dim)
        if len(cfg.latents_mean) != z or len(cfg.latents_std) != z:
            raise ValueError(
                f"vae config latents_mean/latents_std need z_dim={z} values, "
                f"got {len(cfg.latents_mean)} and {len(cfg.latents_std)}"
            )
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    @classmethod
    def from_pretrained(
        cls, directory: PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> "WanVAECodec":
        """Load a local ``AutoencoderKLWan`` (the ``vae/`` folder, or a pipeline root containing it); offline."""
        vae_dir = _resolve_vae_dir(directory)  # before the import, so a bad path fails fast

        from diffusers import AutoencoderKLWan  # deferred: importing diffusers costs seconds

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only is the real guard
        vae = AutoencoderKLWan.from_pretrained(str(vae_dir), local_files_only=True, torch_dtype=dtype)
        return cls(vae.to(device))

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write ``directory/vae/`` in diffusers layout (so the directory can also hold the other parts)."""
        root = Path(directory)
        self.vae.save_pretrained(str(root / VAE_SUBFOLDER))
        return root

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def _vae_param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def latent_shape(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        t, s = self.temporal_factor, self.spatial_factor
        num_frames, height, width = int(num_frames), int(height), int(width)
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(
                f"Wan VAE needs 1 + {t}k frames (1, {1 + t}, {1 + 2 * t}, ...), got {num_frames}; "
                f"the first frame is encoded alone, then groups of {t}"
            )
        if height < 1 or width < 1 or height % s or width % s:
            raise ValueError(f"Wan VAE needs height and width divisible by {s}, got {height}x{width}")
        return (self.latent_channels, 1 + (num_frames - 1) // t, height // s, width // s)

    def num_frames_for(self, latent_frames: int) -> int:
        if int(latent_frames) < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + self.temporal_factor * (int(latent_frames) - 1)

    def encode(self, video: VideoLike) -> torch.Tensor:
        v = _as_video(video)
        self.latent_shape(*v.shape[1:4])  # validates frame count and size with a clear message
        p = self._vae_param()
        x = (v.permute(0, 4, 1, 2, 3) * 2.0 - 1.0).to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mode().to(torch.float32)
        return (z - self._mean.to(z.device)) / self._std.to(z.device)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents -> video. Note the Wan decoder already clamps to [-1, 1], so its output is in [0, 1] anyway;
        ``clamp`` only guards the final affine map against rounding."""
        z = _check_latents(latents, self.latent_channels).to(torch.float32)
        z = z * self._std.to(z.device) + self._mean.to(z.device)
        p = self._vae_param()
        with torch.no_grad():
            x = self.vae.decode(z.to(device=p.device, dtype=p.dtype)).sample.to(torch.float32)
        video = ((x + 1.0) / 2.0).permute(0, 2, 3, 4, 1)
        return (video.clamp(0.0, 1.0) if clamp else video).contiguous()

    def __repr__(self) -> str:
        return (
            f"WanVAECodec(z_dim={self.latent_channels}, temporal x{self.temporal_factor}, "
            f"spatial x{self.spatial_factor})"
        )


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------


def load_codec(path_or_kind: PathLike, **kwargs) -> Codec:
    """The codec a directory holds, or ``"pixel"`` for the default :class:`PixelCodec`.

    ``codec.json`` wins when present (an explicit statement); otherwise a diffusers ``AutoencoderKLWan``
    folder (or a pipeline root with ``vae/``) gives a :class:`WanVAECodec` (``kwargs``: its ``dtype`` and
    ``device``).

    Raises:
        FileNotFoundError: the path does not exist or holds neither layout (the message says what was expected).
    """
    if isinstance(path_or_kind, str) and path_or_kind == "pixel" and not Path(path_or_kind).exists():
        return PixelCodec()
    root = Path(path_or_kind)
    if not root.exists():
        raise FileNotFoundError(f"codec path {str(root)!r} does not exist; {_LOAD_HELP}")
    if (root / CODEC_FILE).is_file():
        kind = json.loads((root / CODEC_FILE).read_text()).get("type")
        if kind == "pixel":
            return PixelCodec.from_pretrained(root)
        raise ValueError(f"{str(root / CODEC_FILE)!r} has unknown codec type {kind!r}; known: 'pixel'")
    return WanVAECodec.from_pretrained(root, **kwargs)
