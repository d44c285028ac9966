"""The per-denoising-step stage deployments and the decoder of the HiAR Serve graph.

About 400 lines because a stream's whole life on a replica is here: the stages and the decoder share its book,
its flow control and its cancellation handling.

A stream is one call through the chain ``Decoder -> StepS -> ... -> Step1``: each deployment's ``__call__``
is an async generator that calls its upstream with ``.options(stream=True)``, takes the upstream's block
outputs as they arrive, processes each and yields its own (Ray Serve cannot pass a response generator into
another deployment -- ray issue 57098 -- so every stage iterates and re-yields). ``Step1`` has no upstream: it
draws block n's starting noise itself, seeded per (seed, block) exactly like the offline rollout.

Stream affinity: one whole stream is one call on one replica of each stage. The ``StepStage`` (this stream's
KV cache for this step) is a local of that call, created when the stream starts and dropped when the call
ends for any reason (finished, failed, cancelled because the client went away), so a stream's cache can never
be looked up on another replica, however many replicas a stage has. Bit-identity with the offline
``hierarchical_rollout``: each stage runs ``StepStage(velocity, sigmas, j, [seed], ...)`` with the velocity
built like ``hiar.core.generation.student_velocity`` and processes blocks 0, 1, 2, ... in order with batch size
one -- the same calls with the same inputs as Alg. 1's sweep (``hiar.core.rollout``: the pipelined order equals
it exactly) whenever a block is alone in its batch (always with ``serve.max_batch = 1``); a block batched
with other streams' blocks equals it within float round-off (``hiar.core.batching``). The fused schedule makes
N calls per stage for N blocks (one plain denoise, N - 1 fused [context of n-1, block n] calls; the trailing
context write of the last block is skipped: nothing reads it).

Compute runs on one executor thread per replica (torch intra-op threads: ``serve.stage_torch_threads``), so
the replica's event loop keeps receiving upstream blocks, answering health checks and serving other streams
while a block is being denoised. The blocks of the replica's streams that wait for that thread are batched
into one forward (``hiar.serving.batcher``: ``serve.max_batch``, ``serve.batch_wait_ms``).

Block payloads between deployments are small contiguous float32 numpy arrays ([1, C, k, H, W]); the prompt
embeddings travel once per stream as an object-store reference. Every item carries per-stage timing
(wall-clock start/end of the model call, replica, model calls so far, the size of the batch it was computed in
and how long it queued for it) for the stream records.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import os
import resource
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from ray import serve

from hiar.config import HiarConfig, ServeConfig
from hiar.io import bundle
from hiar.serving.batcher import Batcher
from hiar.serving.flow import CANCELLED, Producer, StreamClosed, report_taken

log = logging.getLogger("ray.serve")


# ---------------------------------------------------------------------- model loading
def resolve_model_dir(model: dict) -> Path:
    """The local bundle directory for ``model`` (``{"uri", "pinned", "path"}`` from the app builder).

    The builder's download is used when this node can see it (same machine or shared storage); otherwise this
    replica downloads the *pinned* version (never re-resolves an alias, so every replica serves one version).
    """
    path = Path(model["path"])
    if bundle.holds_model(path):
        return path
    from hiar.platform.registry import resolve_bundle  # MLflow, loading only

    return resolve_bundle(model["pinned"])


def bundle_config(root: Path, fallback: HiarConfig | None = None) -> HiarConfig:
    """The bundle's own config, parsed like evaluation parses it (``hiar.io.bundle.bundle_config``)."""
    cfg = bundle.bundle_config(bundle.open_model_dir(root, "served model"))
    if cfg is not None:
        return cfg
    if fallback is None:
        raise FileNotFoundError(f"the model bundle {str(root)!r} has no {bundle.CONFIG_FILE}")
    return fallback


def _load(part: str, root: Path, device: str, cfg: HiarConfig | None):
    """One part of the model directory at ``root`` on ``device`` in its configured dtype (``hiar.io.bundle``)."""
    md = bundle.open_model_dir(root, "served model")
    dtypes = bundle.runtime_dtypes(cfg, device)
    if part == "transformer":
        return bundle.load_transformer(md, device, dtypes["transformer"]).requires_grad_(False)
    if part == "text":
        return bundle.load_text(md, device, dtypes["text_encoder"])
    return bundle.load_model_codec(md, device, dtypes["vae"])


def load_transformer(root: Path, device: str, cfg: HiarConfig | None = None):
    return _load("transformer", root, device, cfg)


def load_codec(root: Path, device: str = "cpu", cfg: HiarConfig | None = None):
    return _load("codec", root, device, cfg)


def load_text(root: Path, device: str = "cpu", cfg: HiarConfig | None = None):
    return _load("text", root, device, cfg)


def replica_setup(serve_cfg: ServeConfig) -> tuple[str, str]:
    """Torch threads for this replica; returns (deployment name, replica actor name)."""
    torch.set_num_threads(max(1, int(serve_cfg.stage_torch_threads)))
    ctx = serve.get_replica_context()
    return ctx.deployment, ctx.replica_id.to_full_id_str()


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def as_tensor(a: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """A tensor from an object-store array (read-only there: copied, so torch never writes into it)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True)).to(device)


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class _StreamBook:
    """Per-replica bookkeeping the tests and ``/v1/stats`` read: active streams and how streams ended."""

    def __init__(self, deployment: str, replica: str):
        self.deployment, self.replica = deployment, replica
        self.active: dict[str, float] = {}
        self.ended = {"completed": 0, "cancelled": 0, "failed": 0, "closed": 0}
        self.max_lead = 0
        self.streams = 0
        # every stream's stage (its KV caches) still alive, held weakly: once no stream is open it is empty unless
        # something keeps a finished stream's state (a leak resident memory cannot tell from the allocator's noise)
        self.stages: weakref.WeakSet = weakref.WeakSet()

    def begin(self, stream: str) -> None:
        self.active[stream] = time.time()
        self.streams += 1

    def end(self, stream: str, err: BaseException | None) -> None:
        self.active.pop(stream, None)
        outcome = _outcome(err)
        self.ended[outcome] += 1
        if outcome == "failed":
            log.warning("%s: stream %s failed: %r", self.deployment, stream, err)

    def stats(self) -> dict:
        gc.collect()  # a finished stream's stage left in a reference cycle is garbage, not kept
        return {"deployment": self.deployment, "replica": self.replica, "active": sorted(self.active),
                **self.ended, "max_lead": self.max_lead, "rss_mb": round(rss_mb(), 1), "streams": self.streams,
                "live_stages": len(self.stages)}


def _outcome(err: BaseException | None) -> str:
    if err is None:
        return "completed"
    if isinstance(err, CANCELLED):
        return "cancelled"
    if isinstance(err, StreamClosed):
        return "closed"
    return "failed"


async def _cancel(gen) -> None:
    if gen is None:
        return
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # noqa: BLE001 - best effort: the upstream may be gone already
            pass


class _Stream:
    """One stream's lifetime on a replica: booked when it begins; when it ends for any reason (finished, failed,
    cancelled because the client went away) its upstream call is cancelled unless it finished, its outcome is
    booked and its stage (this stream's KV cache for this step) is dropped."""

    def __init__(self, book: _StreamBook, stream: str):
        self.book, self.id = book, stream
        self.upstream = None  # the upstream's response generator, once called
        self._stage = None

    @property
    def stage(self):
        return self._stage

    @stage.setter
    def stage(self, value) -> None:
        self._stage = value
        if value is not None:
            self.book.stages.add(value)

    async def __aenter__(self) -> "_Stream":
        self.book.begin(self.id)
        return self

    async def __aexit__(self, exc_type, err, tb) -> bool:
        if err is not None:
            await _cancel(self.upstream)
        self.book.end(self.id, err)
        self.stage = None
        return False  # an error goes on to the caller


class _Replica:
    """What every replica of the graph has: its Serve settings and names, the served model's config, its upstream,
    the stream book ``stats`` reads."""

    def _open(self, model: dict, serve_cfg: dict, upstream) -> Path:
        """Set up the replica; returns the local model directory."""
        self.serve_cfg = ServeConfig(**serve_cfg)
        self.name, self.replica = replica_setup(self.serve_cfg)
        self.upstream = upstream
        root = resolve_model_dir(model)
        self.cfg = bundle_config(root)
        self.book = _StreamBook(self.name, self.replica)
        return root

    def stats(self) -> dict:
        return self.book.stats()


# ---------------------------------------------------------------------- step stages
class _Denoiser(_Replica):
    """What the denoising deployments (``StepDeployment``, ``hiar.serving.diagonal.DiagonalDeployment``) share:
    the transformer on this replica's device, the schedule, one compute thread, and the cross-stream batcher in
    front of it (``hiar.serving.batcher``; ``run_batch`` is the deployment's batch function)."""

    def _open_denoiser(self, model: dict, serve_cfg: dict, upstream, run_batch) -> Path:
        """Set up the denoiser; returns the local model directory."""
        root = self._open(model, serve_cfg, upstream)
        self.device = device_for(self.serve_cfg.stage_num_gpus)
        self.transformer = load_transformer(root, self.device, self.cfg)
        self.sigmas = self.cfg.schedule.sigmas().to(self.device)
        v, r = self.cfg.video, self.cfg.rollout
        self.block_shape = (v.latent_channels, r.frames_per_block, v.latent_height, v.latent_width)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-compute")
        self.batcher = Batcher(run_batch, self.executor, self.serve_cfg.max_batch, self.serve_cfg.batch_wait_ms,
                               open_streams=lambda: len(self.book.active))
        return root

    def _velocity(self, embeds: np.ndarray, negative: np.ndarray | None, guidance: float):
        """The stream's velocity (its prompt and guidance), built like ``hiar.core.generation.student_velocity``."""
        from hiar.core.generation import student_velocity

        cfg = copy.deepcopy(self.cfg)
        cfg.rollout.guidance_scale = float(guidance)
        neg = None if negative is None else as_tensor(negative, self.device)
        return student_velocity(self.transformer, as_tensor(embeds, self.device), cfg, neg)

    def _noise(self, seed: int, block: int) -> np.ndarray:
        from hiar.core.rollout import initial_block_noise  # the offline rollout's starting noise, per (seed, block)

        return initial_block_noise([seed], block, self.block_shape).numpy()

    def _timing(self, info: dict, calls: int) -> dict:
        """A chunk record's entry for this stage: compute span, its batch and how long the block queued for it."""
        return {"stage": self.name, "replica": self.replica, "start": info["start"], "end": info["end"],
                "calls": calls, "batch": info["batch"], "queued_s": round(info["queued_s"], 6)}

    def _ready(self, what: str) -> None:
        s = self.serve_cfg
        log.info("%s (%s) ready: %s on %s, cross-stream batching max_batch=%d batch_wait_ms=%g", self.name,
                 self.replica, what, self.device, s.max_batch, s.batch_wait_ms)

    def stats(self) -> dict:
        return {**self.book.stats(), "batching": self.batcher.stats()}


@serve.deployment
class StepDeployment(_Denoiser):
    """One denoising step ``sigmas[step] -> sigmas[step + 1]`` for every stream routed to this replica."""

    def __init__(self, model: dict, step: int, serve_cfg: dict, upstream=None):
        self.step = int(step)
        self._open_denoiser(model, serve_cfg, upstream, self._process_batch)
        self._ready(f"step {self.step}")

    # -- compute (executor thread)
    def _make_stage(self, embeds: np.ndarray, negative: np.ndarray | None, guidance: float, seed: int):
        from hiar.core.rollout import StepStage

        r = self.cfg.rollout
        return StepStage(self._velocity(embeds, negative, guidance), self.sigmas, self.step, [seed],
                         step_rule=r.step_rule, context_noise=r.context_noise, fused=True)

    def _process_batch(self, items: list) -> list[np.ndarray]:
        """One block of each of several streams' stages (``(stage, block, x)``), their model calls one forward; a
        batch of one is ``stage.process`` itself (bit-identical to the offline rollout)."""
        from hiar.core.batching import process_together

        with torch.no_grad():
            outs = process_together([(stage, n, as_tensor(x, self.device)) for stage, n, x in items])
            return [out.to("cpu").numpy() for out in outs]

    # -- the stream
    async def __call__(self, req: dict):
        stream, loop = req["stream_id"], asyncio.get_running_loop()
        async with _Stream(self.book, stream) as s:
            flow = req["flow"]
            producer = Producer(flow, stream, self.step, req["window"], self.serve_cfg.stall_timeout_s)
            embeds = await req["embeds"]
            negative = await req["negative"] if req["negative"] is not None else None
            s.stage = await loop.run_in_executor(self.executor, self._make_stage, embeds, negative,
                                                 req["guidance"], req["seed"])
            if self.upstream is not None:
                s.upstream = self.upstream.options(stream=True).remote(req)
            async for item in self._iterate(req, s.upstream):
                n = item["block"]
                if self.upstream is not None:
                    report_taken(flow, stream, self.step - 1, n + 1)
                await producer.acquire(n)
                self.book.max_lead = max(self.book.max_lead, producer.max_lead)
                x, info = await self.batcher.submit((s.stage, n, item["x"]))
                yield {"block": n, "x": x, "timings": item["timings"] + [self._timing(info, s.stage.calls)]}

    async def _iterate(self, req: dict, upstream_gen):
        if upstream_gen is None:
            for n in range(req["num_blocks"]):
                yield {"block": n, "x": self._noise(req["seed"], n), "timings": []}
        else:
            async for item in upstream_gen:
                yield item


# ---------------------------------------------------------------------- decoder
class StreamingDecoder:
    """Latent blocks -> their decoded frames, block by block.

    A frame-local codec (the tiny preset's ``PixelCodec``) decodes each block on its own: the same numbers as
    decoding the whole video at once. Any other codec (Wan's causal 3-D VAE) decodes the growing prefix and
    keeps the new frames -- exact for a causal decoder, but quadratic in the stream length; a streaming decode
    with the VAE's causal feature cache is the upgrade (left open).
    """

    def __init__(self, codec):
        from hiar.io.codec import PixelCodec

        self.codec, self.local = codec, isinstance(codec, PixelCodec)
        self.latents: list[torch.Tensor] = []
        self.frames_done = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        """Decode one block: uint8 frames ``[T_n, H, W, 3]``."""
        from hiar.io.video import to_uint8

        lat = as_tensor(x)
        with torch.no_grad():
            if self.local:
                frames = self.codec.decode(lat).clamp(0, 1)[0]
            else:
                self.latents.append(lat)
                video = self.codec.decode(torch.cat(self.latents, dim=2)).clamp(0, 1)[0]
                frames = video[self.frames_done:]
        self.frames_done += frames.shape[0]
        return to_uint8(frames.cpu().numpy())


#: the Decoder stage's name in chunk records and ``stages`` lists, in either topology (in ``diagonal`` it runs
#: inside the Diagonal replica)
DECODER_STAGE = "Decoder"


class _BlockEncoder:
    """The Decoder stage: codec decode + H.264 of a stream's denoised blocks, in order, each as it arrives.
    ``DecoderDeployment`` runs it on the last step stage's blocks; ``DiagonalDeployment`` runs it in its own
    replica, on a second thread, so a block never crosses a process between denoising and encoding."""

    def _open_encoder(self, root: Path, device: str) -> None:
        self.codec = load_codec(root, device, self.cfg)
        self.fps = self.cfg.video.fps
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")

    def _encode_block(self, dec: StreamingDecoder, x: np.ndarray, mode: str):
        from hiar.io.video import encode_mp4

        start = time.time()
        frames = dec.push(x)
        mp4 = encode_mp4(frames, self.fps) if mode == "segments" else None
        return frames, mp4, start, time.time()

    def _encode_whole(self, frames: list[np.ndarray]) -> bytes:
        from hiar.io.video import encode_mp4

        return encode_mp4(np.concatenate(frames), self.fps)

    async def _encoded(self, req: dict, blocks, taken=None):
        """Yields per block ``{"block", "mp4", "frames": (start, end), "latents"?, "timings"}`` for the blocks
        (``{"block", "x", "timings"}``) of the async iterator ``blocks``; with ``mode == "whole"`` the per-block
        items carry no MP4 and a last item ``{"final": True, "mp4"}`` holds the whole video. ``taken(n)`` is
        called as block ``n`` is taken. The stage produces boundary S (towards the ingress): block n is
        encoded only once the ingress has taken block n - window."""
        stream, loop = req["stream_id"], asyncio.get_running_loop()
        producer = Producer(req["flow"], stream, self.num_steps, req["window"], self.serve_cfg.stall_timeout_s)
        dec, mode = StreamingDecoder(self.codec), req.get("mode", "segments")
        kept = []
        async for item in blocks:
            n = item["block"]
            if taken is not None:
                taken(n)
            await producer.acquire(n)
            self.book.max_lead = max(self.book.max_lead, producer.max_lead)
            first = dec.frames_done
            frames, mp4, start, end = await loop.run_in_executor(self.encoder, self._encode_block, dec, item["x"],
                                                                 mode)
            if mode != "segments":
                kept.append(frames)
            timing = {"stage": DECODER_STAGE, "replica": self.replica, "start": start, "end": end, "calls": n + 1}
            out = {"block": n, "mp4": mp4, "frames": (first, dec.frames_done), "timings": item["timings"] + [timing]}
            if req.get("return_latents"):
                out["latents"] = item["x"]
            yield out
        if mode != "segments":
            yield {"final": True, "mp4": await loop.run_in_executor(self.encoder, self._encode_whole, kept)}


@serve.deployment
class DecoderDeployment(_BlockEncoder, _Replica):
    """The Decoder stage as its own deployment, after the last step stage (``per_step``)."""

    def __init__(self, model: dict, serve_cfg: dict, upstream):
        root = self._open(model, serve_cfg, upstream)
        self._open_encoder(root, device_for(self.serve_cfg.decoder_num_gpus))
        self.num_steps = self.cfg.schedule.num_steps

    async def __call__(self, req: dict):
        stream, flow = req["stream_id"], req["flow"]
        async with _Stream(self.book, stream) as s:
            s.upstream = self.upstream.options(stream=True).remote(req)
            async for out in self._encoded(req, s.upstream,
                                           lambda n: report_taken(flow, stream, self.num_steps - 1, n + 1)):
                yield out


__all__ = ["StepDeployment", "DecoderDeployment", "DECODER_STAGE", "StreamingDecoder", "resolve_model_dir", "bundle_config",
           "load_text", "load_codec", "load_transformer"]
