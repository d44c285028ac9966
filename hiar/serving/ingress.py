"""The HTTP ingress of the HiAR Serve graph (``Ingress``): FastAPI routes, request validation, prompt encoding,
the concurrency limit, and the NDJSON / MP4 responses (the contract: ``hiar.serving.schema``). ``hiar.serving.app``
builds the graph around it.
"""

import asyncio
import base64
import json
import logging
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from hiar.config import HiarConfig, ServeConfig
from hiar.serving.flow import CANCELLED, FlowControl, close_stream, report_taken
from hiar.serving.schema import Limits, RequestError, VideoRequest, pack_array, parse_request, record_line
from hiar.serving.stages import bundle_config, device_for, load_codec, load_text, resolve_model_dir

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="HiAR video generation",
    version="1",
    description=(
        "Hierarchical autoregressive video diffusion served by denoising stages (one per step, or one running "
        "each anti-diagonal of the block x step grid as one forward), blocks of concurrent streams batched. "
        "`POST /v1/videos` streams newline-delimited JSON records (`start`, one `chunk` per latent block with "
        "a self-contained base64 MP4 segment and per-stage timing, then `end` or `error`); `\"stream\": false` "
        "returns one `video/mp4`. See `hiar/serving/schema.py` for the record format and limits."
    ),
)

_ERRORS = {
    400: {"description": "the body is not valid JSON"},
    413: {"description": "the body is larger than serve.max_request_bytes"},
    415: {"description": "the content type is not application/json"},
    422: {"description": "wrong types or values, or a request beyond the model's limits"},
    429: {"description": "serve.max_concurrent_streams streams are running; retry later"},
    503: {"description": "the pipeline failed before the first chunk"},
}


def _error(err: RequestError) -> Response:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    # ASCII-escaped, unlike JSONResponse's UTF-8: a key the client sent (named in the detail) may hold an unpaired
    # surrogate, which UTF-8 cannot encode -- the rejection itself would become a 500
    body = json.dumps(err.body(), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=err.status, headers=headers, media_type="application/json")


class _Slot:
    """One admitted stream; released exactly once (end of the response, or its generator being collected)."""

    def __init__(self, owner: "Ingress", stream_id: str):
        self.owner, self.stream_id, self.released = owner, stream_id, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self.stream_id)


def _describe_failure(err: BaseException) -> str:
    name = type(err).__name__
    if isinstance(err, ray.exceptions.RayActorError) or "ActorDied" in name or "ActorUnavailable" in name:
        return f"a pipeline stage replica died mid-stream ({name}); retry the request"
    text = str(err).strip().splitlines()
    return f"{name}: {text[-1] if text else ''}"[:500]


@serve.deployment(num_replicas=1)
@serve.ingress(api)
class Ingress:
    def __init__(self, decoder, model: dict, serve_cfg: dict, stage_names: list[str]):
        self.serve_cfg = ServeConfig(**serve_cfg)
        torch.set_num_threads(max(1, int(self.serve_cfg.stage_torch_threads)))
        self.decoder, self.model, self.stage_names = decoder, model, list(stage_names)
        root = resolve_model_dir(model)
        self.cfg: HiarConfig = bundle_config(root)
        self.num_steps = self.cfg.schedule.num_steps  # the decoder's flow-control boundary, in either topology
        self.text = load_text(root, device_for(self.serve_cfg.ingress_num_gpus), self.cfg)
        codec = load_codec(root)
        s, v = self.serve_cfg, self.cfg.video
        self.limits = Limits(max_blocks=s.max_blocks, frames_per_block=self.cfg.rollout.frames_per_block, fps=v.fps,
                             num_frames_for=codec.num_frames_for, max_prompt_chars=s.max_prompt_chars,
                             max_request_bytes=s.max_request_bytes, max_concurrent_streams=s.max_concurrent_streams)
        k = self.cfg.rollout.frames_per_block
        probe = codec.decode(torch.zeros(1, v.latent_channels, k, v.latent_height, v.latent_width))  # frame size
        self.height, self.width = int(probe.shape[2]), int(probe.shape[3])
        self.flow = FlowControl.options(num_cpus=0).remote(s.max_buffered_blocks)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")
        self.active: dict[str, float] = {}
        self.counts = {"accepted": 0, "rejected_429": 0, "rejected_4xx": 0, "completed": 0, "failed": 0,
                       "cancelled": 0}

    # ------------------------------------------------------------------ bookkeeping
    def _release(self, stream_id: str) -> None:
        self.active.pop(stream_id, None)
        try:
            close_stream(self.flow, stream_id)
        except Exception:  # noqa: BLE001 - at shutdown
            pass

    def _encode(self, prompt: str, guidance: float):
        with torch.no_grad():
            embeds = self.text.encode([prompt]).cpu().numpy()
            negative = self.text.null_embedding(1).cpu().numpy() if guidance != 1.0 else None
        return embeds, negative

    async def _admit(self, request: Request):
        """Parse + validate + admit + encode; returns (request, num_blocks, stream request, slot)."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "request_too_large", f"the body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise RequestError(413, "request_too_large", f"the body is over {limit} bytes")
        req, num_blocks = parse_request(bytes(body), request.headers.get("content-type"), self.limits)
        if len(self.active) >= self.serve_cfg.max_concurrent_streams:  # no await between check and insert
            raise RequestError(429, "too_many_streams",
                               f"{len(self.active)} streams are running, the limit is "
                               f"{self.serve_cfg.max_concurrent_streams}; retry later")
        stream_id = uuid.uuid4().hex
        self.active[stream_id] = time.time()  # reserved before the (possibly slow) prompt encoding
        slot = _Slot(self, stream_id)
        guidance = self.cfg.rollout.guidance_scale if req.guidance is None else float(req.guidance)
        try:
            embeds, negative = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._encode, req.prompt, guidance)
        except ValueError as err:  # unknown words / too many tokens: hiar.io.text says which
            slot.release()
            raise RequestError(422, "invalid_prompt", str(err)) from None
        except BaseException:
            slot.release()
            raise
        self.counts["accepted"] += 1
        sreq = {"stream_id": stream_id, "seed": int(req.seed), "num_blocks": int(num_blocks), "guidance": guidance,
                "embeds": ray.put(embeds), "negative": None if negative is None else ray.put(negative),
                "flow": self.flow, "window": int(self.serve_cfg.max_buffered_blocks),
                "return_latents": bool(req.return_latents), "mode": "segments" if req.stream else "whole"}
        return req, num_blocks, sreq, slot

    # ------------------------------------------------------------------ routes
    @api.post(
        "/v1/videos",
        summary="Generate a video; stream it block by block (NDJSON) or as one MP4",
        responses={200: {"content": {"application/x-ndjson": {}, "video/mp4": {}},
                         "description": "NDJSON records (stream=true) or one MP4 (stream=false)"}, **_ERRORS},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": VideoRequest.model_json_schema()}}}},
    )
    async def create_video(self, request: Request):
        arrived = time.time()
        try:
            req, num_blocks, sreq, slot = await self._admit(request)
        except RequestError as err:
            self.counts["rejected_429" if err.status == 429 else "rejected_4xx"] += 1
            return _error(err)
        if not req.stream:
            try:
                return await self._whole(sreq, num_blocks, arrived)
            finally:
                slot.release()
        body = self._stream(req, sreq, num_blocks, arrived, slot)
        weakref.finalize(body, slot.release)  # a response that never started still frees its slot
        return StreamingResponse(body, media_type="application/x-ndjson",
                                 headers={"X-HiAR-Stream-Id": sreq["stream_id"], "Cache-Control": "no-store"})

    async def _stream(self, req: VideoRequest, sreq: dict, num_blocks: int, arrived: float, slot: _Slot):
        stream_id, gen, outcome = sreq["stream_id"], None, "cancelled"
        first = None
        calls: dict[str, int] = {}
        try:
            yield record_line({
                "type": "start", "stream_id": stream_id, "model": {k: self.model[k] for k in ("uri", "pinned")},
                "num_blocks": num_blocks, "num_frames": self.limits.frames(num_blocks), "fps": self.limits.fps,
                "width": self.width, "height": self.height, "seed": sreq["seed"], "guidance": sreq["guidance"],
                "stages": self.stage_names + ["Decoder"], "topology": self.serve_cfg.topology, "created": arrived})
            gen = self.decoder.options(stream=True).remote(sreq)
            async for item in gen:
                n = item["block"]
                report_taken(self.flow, stream_id, self.num_steps, n + 1)
                now = time.time()
                first = first if first is not None else now - arrived
                calls = {t["stage"]: t["calls"] for t in item["timings"]}
                rec = {"type": "chunk", "index": n, "frame_start": item["frames"][0], "frame_end": item["frames"][1],
                       "mp4": base64.b64encode(item["mp4"]).decode("ascii"),
                       "timing": {"t": now - arrived, "sent": now, "stages": item["timings"]}}
                if req.return_latents:
                    rec["latents"] = pack_array(item["latents"])
                yield record_line(rec)
            elapsed = time.time() - arrived
            frames = self.limits.frames(num_blocks)
            outcome = "completed"
            yield record_line({
                "type": "end", "stream_id": stream_id, "num_blocks": num_blocks, "num_frames": frames,
                "elapsed_s": elapsed, "time_to_first_chunk_s": first, "chunks_per_s": num_blocks / elapsed,
                "frames_per_s": frames / elapsed, "model_calls": calls})
        except CANCELLED:
            outcome = "cancelled"  # the client went away: cancel the graph below, free every stage's cache
            raise
        except Exception as err:  # noqa: BLE001 - a clean error record instead of a torn connection
            outcome = "failed"
            log.warning("stream %s failed: %r", stream_id, err)
            yield record_line({"type": "error", "status": 503, "error": "stream_failed",
                               "detail": _describe_failure(err), "stream_id": stream_id})
        finally:
            if gen is not None and outcome != "completed":
                try:
                    gen.cancel()
                except Exception:  # noqa: BLE001
                    pass
            self.counts[outcome] += 1
            slot.release()

    async def _whole(self, sreq: dict, num_blocks: int, arrived: float) -> Response:
        gen, first, video, done = None, None, None, False
        try:
            gen = self.decoder.options(stream=True).remote(sreq)
            async for item in gen:
                if item.get("final"):
                    video = item["mp4"]
                    continue
                report_taken(self.flow, sreq["stream_id"], self.num_steps, item["block"] + 1)
                first = first if first is not None else time.time() - arrived
            done = True
        except CANCELLED:
            self.counts["cancelled"] += 1  # the client went away before the video was whole
            raise
        except Exception as err:  # noqa: BLE001
            self.counts["failed"] += 1
            return JSONResponse({"error": "stream_failed", "detail": _describe_failure(err)}, status_code=503)
        finally:
            if gen is not None and not done:
                try:
                    gen.cancel()
                except Exception:  # noqa: BLE001
                    pass
        self.counts["completed"] += 1
        return Response(video, media_type="video/mp4", headers={
            "X-HiAR-Num-Frames": str(self.limits.frames(num_blocks)), "X-HiAR-Stream-Id": sreq["stream_id"],
            "X-HiAR-Time-To-First-Block": f"{first:.4f}", "X-HiAR-Elapsed": f"{time.time() - arrived:.4f}"})

    @api.get("/v1/limits", summary="What a request may ask for, and which model is served")
    async def limits(self) -> dict:
        return {**self.limits.describe(), "model": {k: self.model[k] for k in ("uri", "pinned")},
                "num_steps": self.num_steps, "stages": self.stage_names + ["Decoder"],
                "width": self.width, "height": self.height, **self._serving()}

    def _serving(self) -> dict:
        s = self.serve_cfg
        return {"topology": s.topology, "max_batch": s.max_batch, "batch_wait_ms": s.batch_wait_ms}

    @api.get("/v1/stats", summary="Running streams and counters of the ingress")
    async def stats_route(self) -> dict:
        return self.stats()

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"ok": True}

    def stats(self) -> dict:
        return {"active": sorted(self.active), **self.counts}

    async def flow_stats(self) -> dict:
        return await self.flow.stats.remote()

