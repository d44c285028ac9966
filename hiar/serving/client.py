"""A small client for the HiAR video service: stream a video, save it as one MP4, report latency and rate.

    python -m hiar.serving.client --url http://127.0.0.1:8000 --prompt "a red square moves left slowly over a black background" \\
        --seconds 3 --seed 0 --out video.mp4

prints the time to the first chunk, chunks/s and frames/s as the client saw them. The chunks (one
self-contained MP4 per latent block, see ``hiar.serving.schema``) are joined without re-encoding: their H.264
packets are remuxed into one file (every chunk starts with a keyframe and uses the same encoder settings);
``--reencode`` decodes and re-encodes instead.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import requests


class StreamError(RuntimeError):
    """The service rejected the request (``status`` set) or the stream ended with an error record."""

    def __init__(self, message: str, status: int | None = None, body=None):
        super().__init__(message)
        self.status, self.body = status, body


@dataclass
class StreamResult:
    start: dict
    chunks: list[dict] = field(default_factory=list)
    end: dict | None = None
    received: list[float] = field(default_factory=list)  # client wall time each chunk arrived
    sent_at: float = 0.0

    @property
    def time_to_first_chunk(self) -> float:
        return self.received[0] - self.sent_at

    @property
    def elapsed(self) -> float:
        return self.received[-1] - self.sent_at

    def segments(self) -> list[bytes]:
        return [base64.b64decode(c["mp4"]) for c in self.chunks]


def iter_records(url: str, body: dict, timeout: float = 600.0, session=None) -> Iterator[dict]:
    """POST ``body`` to ``url/v1/videos`` and yield the NDJSON records as they arrive.

    Raises :class:`StreamError` for a non-200 answer (with its status and JSON body).
    """
    http = session or requests
    with http.post(f"{url.rstrip('/')}/v1/videos", json={**body, "stream": True}, stream=True,
                   timeout=timeout) as resp:
        if resp.status_code != 200:
            try:
                detail = resp.json()
            except ValueError:
                detail = resp.text
            raise StreamError(f"HTTP {resp.status_code}: {detail}", resp.status_code, detail)
        for line in resp.iter_lines():
            if line:
                yield json.loads(line)


def stream_video(url: str, body: dict, timeout: float = 600.0) -> StreamResult:
    """Read a whole stream; raises :class:`StreamError` on rejection, an error record or a truncated stream."""
    sent = time.time()
    result = None
    for rec in iter_records(url, body, timeout):
        kind = rec.get("type")
        if kind == "start":
            result = StreamResult(start=rec, sent_at=sent)
        elif kind == "chunk":
            result.chunks.append(rec)
            result.received.append(time.time())
        elif kind == "end":
            result.end = rec
        elif kind == "error":
            raise StreamError(f"stream failed: {rec.get('detail')}", rec.get("status"), rec)
    if result is None or result.end is None:
        raise StreamError("the stream ended without an end record")
    return result


def served_model(url: str, timeout: float = 5.0) -> str | None:
    """The model version the service at ``url`` has pinned (``GET /v1/limits``: ``models:/name/N``), or None when
    nothing (or something else) answers there."""
    try:
        resp = requests.get(f"{url.rstrip('/')}/v1/limits", timeout=timeout)
        return resp.json().get("model", {}).get("pinned") if resp.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError):
        return None


@dataclass
class WholeVideo:
    mp4: bytes
    num_frames: int  # decoded from the MP4, equal to what the server promised (X-HiAR-Num-Frames)
    seconds: float  # request to last byte


def fetch_video(url: str, body: dict, timeout: float = 600.0) -> WholeVideo:
    """POST ``body`` with ``"stream": false`` and check the answer: one MP4 that decodes to the number of frames
    the server promised. Raises :class:`StreamError` for a non-200 answer, another content type or a short
    video."""
    from hiar.io.video import decode_mp4

    sent = time.monotonic()
    resp = requests.post(f"{url.rstrip('/')}/v1/videos", json={**body, "stream": False}, timeout=timeout)
    seconds = time.monotonic() - sent
    if resp.status_code != 200 or resp.headers.get("content-type", "").split(";")[0] != "video/mp4":
        raise StreamError(f"POST {url}/v1/videos answered HTTP {resp.status_code}: {resp.text[:500]}",
                          resp.status_code, resp.text[:2000])
    promised = int(resp.headers.get("X-HiAR-Num-Frames", "-1"))
    try:
        frames = len(decode_mp4(resp.content))
    except ValueError as err:  # PyAV's InvalidDataError is one; so is an MP4 without frames
        raise StreamError(f"the MP4 does not decode: {err}") from None
    if frames != promised or frames <= 0:
        raise StreamError(f"the MP4 decodes to {frames} frames, the server promised {promised}")
    return WholeVideo(mp4=resp.content, num_frames=frames, seconds=seconds)


def join_segments(segments: list[bytes], reencode: bool = False, fps: int | None = None) -> bytes:
    """One MP4 from per-chunk MP4s: H.264 packets remuxed with continuous timestamps (or re-encoded)."""
    import av
    import numpy as np

    from hiar.io.video import decode_mp4, encode_mp4

    if reencode:
        frames = np.concatenate([decode_mp4(s) for s in segments])
        return encode_mp4(frames, fps or 8)
    out_buf = io.BytesIO()
    with av.open(out_buf, mode="w", format="mp4") as out:
        ostream, offset = None, 0
        for seg in segments:
            with av.open(io.BytesIO(seg)) as src:
                istream = src.streams.video[0]
                if ostream is None:
                    ostream = out.add_stream_from_template(istream)
                last = 0
                for pkt in src.demux(istream):
                    if pkt.dts is None:  # the demuxer's flush packet
                        continue
                    duration = pkt.duration or 0
                    last = max(last, pkt.pts + duration, pkt.dts + duration)
                    pkt.pts += offset
                    pkt.dts += offset
                    pkt.stream = ostream
                    out.mux(pkt)
                offset += last
    return out_buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--prompt", required=True)
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--seconds", type=float)
    length.add_argument("--blocks", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", default="video.mp4")
    parser.add_argument("--reencode", action="store_true", help="decode and re-encode instead of remuxing")
    args = parser.parse_args(argv)
    body = {"prompt": args.prompt, "seed": args.seed}
    body.update({"seconds": args.seconds} if args.seconds is not None else {"num_blocks": args.blocks})
    if args.guidance is not None:
        body["guidance"] = args.guidance
    try:
        res = stream_video(args.url, body)
    except StreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except requests.RequestException as err:
        print(f"error: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    data = join_segments(res.segments(), reencode=args.reencode, fps=res.start["fps"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(data)
    n, frames = len(res.chunks), res.end["num_frames"]
    span = res.elapsed - res.time_to_first_chunk
    rate = (n - 1) / span if n > 1 and span > 0 else float("nan")
    print(f"saved {args.out}: {frames} frames ({frames / res.start['fps']:.2f} s at {res.start['fps']} fps) "
          f"in {n} chunks, model {res.start['model']['pinned']}")
    print(f"time to first chunk {res.time_to_first_chunk:.3f} s; {n / res.elapsed:.2f} chunks/s overall "
          f"({rate:.2f} chunks/s after the first), {frames / res.elapsed:.1f} frames/s; "
          f"server: ttfc {res.end['time_to_first_chunk_s']:.3f} s, {res.end['chunks_per_s']:.2f} chunks/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
