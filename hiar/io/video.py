"""MP4 writing/reading with PyAV (H.264 from the wheel's libx264; no system ffmpeg needed)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] (clipped) -> uint8."""
    return (np.clip(np.asarray(frames, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def tile(videos: np.ndarray, columns: int = 4, upscale: int = 1) -> np.ndarray:
    """[N, T, H, W, 3] -> one [T, rows*H, columns*W, 3] grid video (blank cells black)."""
    n, t, h, w, c = videos.shape
    rows = -(-n // columns)
    grid = np.zeros((t, rows * h, columns * w, c), dtype=videos.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = videos[i]
    if upscale > 1:
        grid = grid.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return grid


def _prepare(frames: np.ndarray) -> np.ndarray:
    arr = frames if frames.dtype == np.uint8 else to_uint8(frames)
    _, h, w, _ = arr.shape
    return np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def _mux_h264(container, arr: np.ndarray, fps: int) -> None:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = arr.shape[2], arr.shape[1]
    stream.pix_fmt = "yuv420p"
    # one encoder thread: libx264's frame threads make the bitstream depend on timing (under CPU load 1 encode
    # in 150 of the same frames came out different), and the MP4 segments are promised deterministic
    stream.options = {"crf": "18", "threads": "1"}
    for frame in arr:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write [T, H, W, 3] frames (float in [0, 1] or uint8) as H.264 (yuv420p needs even sizes: padded)."""
    arr = _prepare(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        _mux_h264(container, arr, fps)
    return path


def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """Like :func:`write_mp4`, into memory: a self-contained MP4 file as bytes (deterministic for equal input)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        _mux_h264(container, _prepare(frames), fps)
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """Decode every frame of an in-memory MP4 as uint8 [T, H, W, 3]."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode every frame as uint8 [T, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
