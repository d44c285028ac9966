"""The HTTP contract of the HiAR video service: the request body, its limits and the streamed record format.

Request: ``POST /v1/videos`` with ``Content-Type: application/json`` and a body of at most
``serve.max_request_bytes`` bytes::

    {"prompt": "a red square moves left slowly over a black background",   # required, non-empty
     "num_blocks": 8,          # either num_blocks (latent blocks of k frames) ...
     "seconds": 3.0,           # ... or seconds of video (rounded up to whole blocks); exactly one of the two
     "seed": 0,                # optional, 0 <= seed < 2**63 (default 0)
     "guidance": 1.0,          # optional CFG scale in [0, 20]; default: the model's rollout.guidance_scale
     "stream": true,           # optional: true = NDJSON stream (below), false = one video/mp4 body
     "return_latents": false}  # optional: add each block's clean latents (float32) to its chunk record

Types are strict (``"8"`` or ``8.0`` is not an integer, ``true`` is not a number) and unknown fields are
rejected. Errors are JSON ``{"error": <kind>, "detail": <message or pydantic errors>}`` with status:

    400 body is not valid JSON          413 body larger than serve.max_request_bytes
    415 content type is not JSON        422 wrong types / values, too long (blocks, seconds, prompt
                                            characters or tokens), words the text encoder does not know
    429 serve.max_concurrent_streams streams are already running (retry later; nothing was queued)
    503 the model is not loaded or a pipeline stage failed before the first chunk

Streamed response (``stream: true``, the default): ``200`` with ``Content-Type: application/x-ndjson``, one
JSON object per line, in this order:

``{"type": "start", ...}``
    ``stream_id``, ``model`` (``uri`` as requested, ``pinned`` registry version or path), ``num_blocks``,
    ``num_frames`` (decoded frames in the whole video), ``fps``, ``width``, ``height``, ``seed``,
    ``guidance``, ``stages`` (deployment names, in pipeline order), ``created`` (server wall time, s).
``{"type": "chunk", ...}`` -- one per latent block, in block order, sent as the block leaves the decoder
    ``index`` (block n), ``frame_start``/``frame_end`` (its decoded frames ``[start, end)`` in the video),
    ``mp4`` (base64 of a self-contained H.264 MP4 holding just those frames, playable on its own),
    ``timing``: ``{"t": seconds since the request arrived, "sent": wall time,
    "stages": [{"stage": "Step1", "replica": <Serve replica actor name>, "start": wall, "end": wall,
    "calls": model calls of that stage so far}, ..., {"stage": "Decoder", ...}]}``,
    and with ``return_latents``: ``latents`` = ``{"dtype": "float32", "shape": [1, C, k, H, W],
    "data": base64 of the little-endian bytes}`` (the block's clean latents, before decoding).
``{"type": "end", ...}``
    ``num_blocks``, ``num_frames``, ``elapsed_s``, ``time_to_first_chunk_s``, ``chunks_per_s``,
    ``frames_per_s``, ``model_calls`` (``{stage: calls}``; N per step stage for N blocks: one plain call
    and N - 1 fused KV-write+denoise calls; the trailing context write is skipped because nothing reads it).
``{"type": "error", "status": 503, "error": <kind>, "detail": <message>}``
    instead of ``end`` when the stream fails after it started (for example a stage replica died); the
    stream then ends. Clients must treat a stream without ``end`` as failed.

Non-streamed response (``stream: false``): ``200`` with ``Content-Type: video/mp4`` (the whole video as one
MP4) and headers ``X-HiAR-Num-Frames``, ``X-HiAR-Time-To-First-Block`` and ``X-HiAR-Elapsed``.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "VideoRequest",
    "Limits",
    "RequestError",
    "parse_request",
    "pack_array",
    "unpack_array",
    "record_line",
    "MAX_SEED",
    "MAX_GUIDANCE",
]

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 20.0


class VideoRequest(BaseModel):
    """The body of ``POST /v1/videos`` (see the module docstring for the limits enforced on top)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="what to generate; every word must be in the text vocabulary")
    num_blocks: Optional[int] = Field(default=None, ge=1, description="length in latent blocks (k frames each)")
    seconds: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False,
                                     description="length in seconds, rounded up to whole blocks")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    guidance: Optional[float] = Field(default=None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                      description="classifier-free guidance scale (default: the model's)")
    stream: bool = Field(default=True, description="NDJSON chunks as blocks finish (true) or one MP4 (false)")
    return_latents: bool = Field(default=False, description="include each block's clean latents (float32)")

    @model_validator(mode="after")
    def _one_length(self):
        if (self.num_blocks is None) == (self.seconds is None):
            raise ValueError("give exactly one of num_blocks or seconds")
        return self


class RequestError(Exception):
    """A rejected request: HTTP ``status`` with a JSON body ``{"error": kind, "detail": detail}``."""

    def __init__(self, status: int, kind: str, detail):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail

    def body(self) -> dict:
        return {"error": self.kind, "detail": self.detail}


class Limits:
    """What one model + serve config allows, and the length arithmetic (blocks <-> decoded frames)."""

    def __init__(self, *, max_blocks: int, frames_per_block: int, fps: int, num_frames_for, max_prompt_chars: int,
                 max_request_bytes: int, max_concurrent_streams: int):
        self.max_blocks, self.k, self.fps = int(max_blocks), int(frames_per_block), int(fps)
        self.num_frames_for = num_frames_for  # latent frames -> decoded frames (the codec's rule)
        self.max_prompt_chars, self.max_request_bytes = int(max_prompt_chars), int(max_request_bytes)
        self.max_concurrent_streams = int(max_concurrent_streams)

    def frames(self, num_blocks: int) -> int:
        return int(self.num_frames_for(num_blocks * self.k))

    @property
    def max_seconds(self) -> float:
        return self.frames(self.max_blocks) / self.fps

    def blocks_for_seconds(self, seconds: float) -> int:
        """The fewest blocks whose decoded frames cover ``seconds``."""
        needed = max(1, math.ceil(seconds * self.fps - 1e-9))
        if needed > self.frames(self.max_blocks):
            return self.max_blocks + 1
        n = 1
        while self.frames(n) < needed:
            n += 1
        return n

    def describe(self) -> dict:
        return {"max_blocks": self.max_blocks, "max_seconds": self.max_seconds, "frames_per_block": self.k,
                "fps": self.fps, "max_prompt_chars": self.max_prompt_chars,
                "max_request_bytes": self.max_request_bytes, "max_concurrent_streams": self.max_concurrent_streams,
                "max_seed": MAX_SEED, "max_guidance": MAX_GUIDANCE}


def _json_safe_errors(err: ValidationError) -> list:
    out = []
    for e in err.errors(include_url=False):
        item = {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")}
        out.append(item)
    return out


def parse_request(body: bytes, content_type: str | None, limits: Limits) -> tuple[VideoRequest, int]:
    """Validate a raw request: returns (request, num_blocks) or raises :class:`RequestError` (a 4xx)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, "unsupported_media_type",
                           f"Content-Type must be application/json, got {content_type or 'none'!r}")
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, "request_too_large",
                           f"the body is {len(body)} bytes; the limit is {limits.max_request_bytes}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_request", f"the body must be a JSON object, got {type(data).__name__}")
    try:
        req = VideoRequest.model_validate(data)
    except ValidationError as err:
        raise RequestError(422, "invalid_request", _json_safe_errors(err)) from None
    if len(req.prompt) > limits.max_prompt_chars:
        raise RequestError(422, "prompt_too_long",
                           f"the prompt has {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}")
    if not req.prompt.strip():
        raise RequestError(422, "invalid_request", "the prompt is blank")
    if req.num_blocks is not None:
        num_blocks = req.num_blocks
        if num_blocks > limits.max_blocks:
            raise RequestError(422, "too_long", f"num_blocks={num_blocks} exceeds the limit of {limits.max_blocks} "
                                                f"blocks ({limits.max_seconds:.3g} s)")
    else:
        num_blocks = limits.blocks_for_seconds(req.seconds)
        if num_blocks > limits.max_blocks:
            raise RequestError(422, "too_long", f"seconds={req.seconds} exceeds the limit of "
                                                f"{limits.max_seconds:.3g} s ({limits.max_blocks} blocks)")
    return req, num_blocks


# ---------------------------------------------------------------------- records
def pack_array(arr: np.ndarray) -> dict:
    """A float32 array as ``{"dtype", "shape", "data"}`` (base64 of its little-endian bytes)."""
    a = np.ascontiguousarray(arr, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack_array(packed: dict) -> np.ndarray:
    if packed.get("dtype") != "float32":
        raise ValueError(f"unsupported dtype {packed.get('dtype')!r}")
    return np.frombuffer(base64.b64decode(packed["data"]), dtype="<f4").reshape(packed["shape"]).astype(np.float32)


def record_line(record: dict) -> bytes:
    """One NDJSON line."""
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
