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
rejected. Everything is checked by :class:`VideoRequest` (given the served model's :class:`Limits` as pydantic
validation context) before any compute. Errors are JSON ``{"error": <kind>, "detail": <message or pydantic
errors>}``; pydantic errors are ``[{"loc": [field, ...], "type": ..., "msg": ...}]`` (the offending value is
never echoed). Status and kind:

    400 invalid_json             the body is not JSON (bad syntax, not UTF-8/16/32 text, nested too deeply)
    413 request_too_large        the body is larger than serve.max_request_bytes
    415 unsupported_media_type   the content type is missing or not application/json
    422 invalid_request          wrong types or values: NaN/Infinity, zero, negative or out-of-range numbers,
                                 integers of thousands of digits, a blank prompt (only whitespace or invisible
                                 format characters), control characters or unpaired surrogates in the prompt,
                                 a key given twice, an unknown field, not exactly one of num_blocks/seconds
    422 too_long                 num_blocks or seconds beyond the served length (``loc`` names which)
    422 prompt_too_long          more than serve.max_prompt_chars characters
    422 invalid_prompt           words the text encoder does not know, or more tokens than it takes
    429 too_many_streams         serve.max_concurrent_streams streams are already running (retry later;
                                 nothing was queued)
    503 stream_failed            the model is not loaded or a pipeline stage failed before the first chunk

Streamed response (``stream: true``, the default): ``200`` with ``Content-Type: application/x-ndjson``, one
JSON object per line, in this order:

``{"type": "start", ...}``
    ``stream_id``, ``model`` (``uri`` as requested, ``pinned`` registry version or path), ``num_blocks``,
    ``num_frames`` (decoded frames in the whole video), ``fps``, ``width``, ``height``, ``seed``,
    ``guidance``, ``stages`` (deployment names, in pipeline order), ``topology`` (``per_step`` or
    ``diagonal``), ``created`` (server wall time, s).
``{"type": "chunk", ...}`` -- one per latent block, in block order, sent as the block leaves the decoder
    ``index`` (block n), ``frame_start``/``frame_end`` (its decoded frames ``[start, end)`` in the video),
    ``mp4`` (base64 of a self-contained H.264 MP4 holding just those frames, playable on its own),
    ``timing``: ``{"t": seconds since the request arrived, "sent": wall time,
    "stages": [{"stage": "Step1", "replica": <Serve replica actor name>, "start": wall, "end": wall,
    "calls": model calls of that stage so far, "batch": blocks of concurrent streams in that forward,
    "queued_s": how long the block waited for it}, ..., {"stage": "Decoder", ...}]}`` (the diagonal
    topology has one denoising entry, ``"Diagonal"``, whose ``calls`` count the stream's packed forwards),
    and with ``return_latents``: ``latents`` = ``{"dtype": "float32", "shape": [1, C, k, H, W],
    "data": base64 of the little-endian bytes}`` (the block's clean latents, before decoding).
``{"type": "end", ...}``
    ``num_blocks``, ``num_frames``, ``elapsed_s``, ``time_to_first_chunk_s``, ``chunks_per_s``,
    ``frames_per_s``, ``model_calls`` (``{stage: calls}``; N per step stage for N blocks: one plain call
    and N - 1 fused KV-write+denoise calls; the trailing context write is skipped because nothing reads it;
    the diagonal topology: N + S - 1 packed forwards).
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
import sys
import unicodedata
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

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
#: Control characters a prompt may hold (ordinary whitespace); any other (NUL, ESC, DEL, C1 ...) is rejected.
_PROMPT_WHITESPACE_CONTROLS = frozenset("\t\n\r")
#: Kinds of the length errors that keep their own ``error`` kind (the module docstring's table).
_LENGTH_KINDS = ("too_long", "prompt_too_long")


class _IntegerTooLong:
    """An integer literal with more digits than Python converts (``sys.get_int_max_str_digits()``): json.loads
    would raise a bare ValueError that names no field; this stand-in lets the model reject it by field."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(literal: str):
    digits = len(literal.lstrip("-"))
    limit = sys.get_int_max_str_digits()
    return _IntegerTooLong(digits) if limit and digits > limit else int(literal)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook``: a key given twice is ambiguous (json.loads would keep the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _brief(number: int) -> str:
    """An integer for an error message: a 4000-digit one (within the body limit) is named by its length."""
    text = str(number)
    return text if len(text) <= 24 else f"<an integer of {len(text)} digits>"


def _limits_of(info: ValidationInfo) -> "Limits | None":
    return (info.context or {}).get("limits")


class VideoRequest(BaseModel):
    """The body of ``POST /v1/videos``.

    Validate with ``VideoRequest.model_validate(data, context={"limits": limits})`` to also check the served
    model's :class:`Limits` (length in blocks or seconds, prompt characters); without them only the fixed
    bounds below apply. Every failure is a pydantic error whose ``loc`` names the field.
    """

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

    @field_validator("*", mode="before")
    @classmethod
    def _no_huge_integer_literal(cls, value):
        if isinstance(value, _IntegerTooLong):
            raise PydanticCustomError("integer_too_long", "an integer of {digits} digits is far outside the "
                                                          "allowed range", {"digits": value.digits})
        return value

    @field_validator("prompt")
    @classmethod
    def _printable_prompt(cls, prompt: str, info: ValidationInfo) -> str:
        limits = _limits_of(info)
        if limits is not None and len(prompt) > limits.max_prompt_chars:  # before scanning it character by character
            raise PydanticCustomError("prompt_too_long", "the prompt has {chars} characters; the limit is {limit}",
                                      {"chars": len(prompt), "limit": limits.max_prompt_chars})
        visible = False
        for position, char in enumerate(prompt):
            category = unicodedata.category(char)
            if category == "Cc" and char not in _PROMPT_WHITESPACE_CONTROLS:
                raise PydanticCustomError("prompt_control_character",
                                          "the prompt holds the control character U+{code} at position {position}",
                                          {"code": f"{ord(char):04X}", "position": position})
            # zero-width spaces, joiners, BOMs (category Cf) print nothing: a prompt of only those is blank too
            visible = visible or not (char.isspace() or category == "Cf")
        if not visible:
            raise PydanticCustomError("prompt_blank", "the prompt is blank (only whitespace or invisible characters)")
        return prompt

    @field_validator("num_blocks")
    @classmethod
    def _num_blocks_within_limits(cls, num_blocks: Optional[int], info: ValidationInfo) -> Optional[int]:
        limits = _limits_of(info)
        if num_blocks is not None and limits is not None and num_blocks > limits.max_blocks:
            raise PydanticCustomError("too_long", "num_blocks={num_blocks} exceeds the limit of {max_blocks} blocks "
                                                  "({max_seconds} s)",
                                      {"num_blocks": _brief(num_blocks), "max_blocks": limits.max_blocks,
                                       "max_seconds": f"{limits.max_seconds:.3g}"})
        return num_blocks

    @field_validator("seconds")
    @classmethod
    def _seconds_within_limits(cls, seconds: Optional[float], info: ValidationInfo) -> Optional[float]:
        limits = _limits_of(info)
        if seconds is not None and limits is not None and limits.blocks_for_seconds(seconds) > limits.max_blocks:
            raise PydanticCustomError("too_long", "seconds={seconds} exceeds the limit of {max_seconds} s "
                                                  "({max_blocks} blocks)",
                                      {"seconds": f"{seconds:.6g}", "max_blocks": limits.max_blocks,
                                       "max_seconds": f"{limits.max_seconds:.3g}"})
        return seconds

    @field_validator("guidance")
    @classmethod
    def _no_negative_zero(cls, guidance: Optional[float]) -> Optional[float]:
        return None if guidance is None else guidance + 0.0  # -0.0 -> 0.0: the start record echoes the scale

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
        """The fewest blocks whose decoded frames cover ``seconds``; ``max_blocks + 1`` when none do."""
        wanted = seconds * self.fps - 1e-9
        # compared before math.ceil: 1e308 s is inf frames, which ceil cannot turn into an int
        if not wanted <= self.frames(self.max_blocks):
            return self.max_blocks + 1
        needed = max(1, math.ceil(wanted))
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
    """pydantic's errors without ``input`` and ``ctx``: the client's own value is never echoed back (it may be
    NaN, 100 kB of text or an unpaired surrogate, none of which a JSON response can carry)."""
    return [{"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")}
            for e in err.errors(include_url=False)]


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
        data = json.loads(body, parse_int=_parse_int, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise RequestError(422, "invalid_request", [{"loc": [err.key], "type": "duplicate_key",
                                                     "msg": "the key is given more than once"}]) from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_request", f"the body must be a JSON object, got {type(data).__name__}")
    try:
        req = VideoRequest.model_validate(data, context={"limits": limits})
    except ValidationError as err:
        errors = _json_safe_errors(err)
        kinds = {e["type"] for e in errors}
        kind = kinds.pop() if len(kinds) == 1 and kinds <= set(_LENGTH_KINDS) else "invalid_request"
        raise RequestError(422, kind, errors) from None
    num_blocks = req.num_blocks if req.num_blocks is not None else limits.blocks_for_seconds(req.seconds)
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
