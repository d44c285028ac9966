"""Load on the Serve app: S streams of N blocks read by slow clients; each process's resident memory over the
run, and the answer to one stream more than ``serve.max_concurrent_streams``. (Over 400 lines because it is the
one harness behind both this command and the slow test ``tests/integration/serving/test_load.py``.)

    RAY_AUTH_MODE=disabled python benchmarks/serve_load.py --streams 8 --blocks 64 --read-delay 2.0

Deploys the real app (the tiny preset's topology, diagonal, unless --set serve.topology=per_step; a random tiny
student unless --model) on an in-process Ray
cluster. Round 1 (warm-up): S streams of N blocks read at full speed. Round 2: S streams of N blocks whose clients
read one chunk record and sleep --read-delay seconds before reading the next (2 s: half the pace 8 streams get on
2 cores); while they are open it sends one stream more, which must get 429 with Retry-After at once. Every stream
asks for ``return_latents`` (the largest records: each block's float32 latents besides its MP4).

Every --interval seconds it samples the resident memory (RSS, now: /proc/<pid>/statm) of every process of the
app, found by its Ray process title: the step stages and the decoder (or the Diagonal replica), the ingress, its
back-pressure actor and the
Serve HTTP proxy. (Not through the replicas' ``stats``: a replica running ``max_ongoing_requests`` streams
answers no other call until one of them ends.) Printed per process: RSS at start (deployed, idle), round 1's
peak, after round 1 (idle), "first" (every round-2 stream has read its first --first-blocks chunks: each
stream's KV caches hold their whole attention window), round 2's peak from then on, and at the end (idle); then

    growth = round 2 peak - "first", against
        a replica or FlowControl:  streams x (max_buffered_blocks + 1) x max(block payload, chunk record)
        the HTTP proxy:            streams x blocks x chunk record
        each plus --allowance-mb (the live working set of the streams' calls, allocator and Ray buffers: measured;
        S times that for a Diagonal replica, whose forwards pack all S steps of its streams)
    r2 - r1 = round 2 peak - round 1 peak: what a second round of as many streams needed beyond the first,
        i.e. what a leak would add per round (bounded memory: about 0, within the allocator's noise)

Once round 2 is over, each replica's ``live_stages`` (its ``stats``: per-stream stages, i.e. KV caches, still
alive) must be 0: a step stage keeping a finished stream's state is a leak its RSS cannot tell from the allocator.

Back-pressure: between two stages ``hiar.serving.flow`` lets at most ``max_buffered_blocks`` blocks of a stream
wait (the table's ``max_lead``: most blocks a stage had produced but its consumer not yet taken, when starting
one). Towards the HTTP client Ray Serve has none: the ingress's ASGI ``send`` only appends to a queue that goes
to the proxy, so the decoder keeps the pipeline's pace and what a slow client has not read yet waits in the
proxy and the sockets, at most the whole stream (``serve.max_blocks`` chunk records). ``decoder ahead`` is how
many blocks the decoder had finished beyond the chunk a slow client was reading.

``run_load`` is also what ``tests/integration/serving/test_load.py`` drives and asserts on.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import requests  # noqa: E402

PROMPTS = ["a blue circle moves down quickly over a black background",
           "a red square moves left slowly over a gray background"]
# RSS marks: deployed and idle; round 1's peak; idle after round 1; round 2 once every stream read its first chunks;
# round 2's peak from then on; idle after round 2
MARKS = ("start", "peak1", "warm", "first", "peak", "end")
ORDER = ("Step", "Diagonal", "Decoder", "Ingress", "FlowControl", "ProxyActor")  # the report's rows, downstream


# ---------------------------------------------------------------------- processes and their memory
def _statm_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return None


def _has_ancestor(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
        except (OSError, IndexError, ValueError):
            return False
    return False


def app_processes(app: str, cluster_root: int) -> dict[str, int]:
    """pid by name of the processes of Serve app ``app`` below ``cluster_root`` (the process that started the Ray
    cluster: ``ray start`` or the driver of ``ray.init``; other clusters on the machine are not ours): each replica
    by its deployment (title ``ray::ServeReplica:<app>:<deployment>``; further replicas ``Step1#2``, ..), the HTTP
    proxy (``ProxyActor``) and the ingress's back-pressure actor (``FlowControl``)."""
    prefix = f"ray::ServeReplica:{app}:".encode()
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].split()[0]
        except (OSError, IndexError):
            continue  # not a process, gone meanwhile, or no command line (a kernel thread)
        if title.startswith(prefix):
            name = title[len(prefix):]
        elif title.startswith((b"ray::ProxyActor", b"ray::FlowControl")):
            name = title[len(b"ray::"):]
        else:
            continue
        if _has_ancestor(int(entry), cluster_root):
            found.setdefault(name.split(b".")[0].decode(), []).append(int(entry))
    return {name if i == 0 else f"{name}#{i + 1}": pid
            for name, pids in found.items() for i, pid in enumerate(sorted(pids))}


def app_deployments(app: str) -> list[str]:
    """The deployments of Serve app ``app`` that hold streams: all but the Ingress (``Step1``..``StepS`` and
    ``Decoder`` in per_step, ``Diagonal`` in diagonal: ``/v1/limits``'s ``stages`` name timing stages, and the
    diagonal's ``Decoder`` stage is a thread of its replica, not a deployment)."""
    from ray import serve

    return sorted(d for d in serve.status().applications[app].deployments if d != "Ingress")


class Sampler:
    """RSS (MB, now) of every process of the app (``app_processes``), read from /proc: no call to the replicas,
    whose ``stats`` wait behind the streams while a replica runs ``max_ongoing_requests`` of them (Serve's
    per-replica semaphore). ``run`` samples every ``interval`` seconds on a thread until ``stop``; ``mark`` takes a
    named sample now; ``stats`` and ``wait_idle`` ask the replicas, for use when the load is over."""

    def __init__(self, app: str, url: str, deployments: list[str], cluster_root: int, interval: float = 1.0):
        from ray import serve

        self.url, self.interval = url, interval
        self.handles = {d: serve.get_deployment_handle(d, app) for d in deployments}
        self.pids = app_processes(app, cluster_root)
        self.samples: list[dict[str, float]] = []
        self.marks: dict[str, dict[str, float]] = {}
        self.errors: list[str] = []
        self._lock, self._stop, self._thread = threading.Lock(), threading.Event(), None

    def sample(self) -> dict[str, float]:
        rss = {name: _statm_mb(pid) for name, pid in self.pids.items()}
        rss = {name: mb for name, mb in rss.items() if mb is not None}
        with self._lock:
            self.samples.append(rss)
        return rss

    def mark(self, name: str) -> dict[str, float]:
        self.marks[name] = self.sample()
        return self.marks[name]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - a missed sample is reported, not fatal
                self.errors.append(repr(err))

    def run(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_since(self, start: int) -> dict[str, float]:
        peak: dict[str, float] = {}
        with self._lock:
            for rss in self.samples[start:]:
                for name, mb in rss.items():
                    peak[name] = max(peak.get(name, mb), mb)
        return peak

    def stats(self) -> dict[str, dict]:
        """Each replica's ``stats`` by name, as ``app_processes`` names them (replicas sorted by id, not pid: the
        names of further replicas may differ between the two)."""
        out = {}
        for dep, handle in self.handles.items():
            group = sorted(handle.broadcast("stats").results(timeout_s=60), key=lambda s: s["replica"])
            out.update({dep if i == 0 else f"{dep}#{i + 1}": s for i, s in enumerate(group)})
        return out

    def ingress_stats(self) -> dict:
        return requests.get(f"{self.url}/v1/stats", timeout=60).json()

    def settled_stats(self, timeout: float = 10.0) -> dict[str, dict]:
        """``stats`` once no replica holds a per-stream stage (``live_stages``), or after ``timeout`` s: a stream
        that ended mid-block leaves that block's forward running on the compute thread, holding its stage."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if not any(s["live_stages"] for s in stats.values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until no stream is active in the ingress (asked first: it always answers) or in any replica."""
        deadline = time.monotonic() + timeout
        while self.ingress_stats()["active"] or any(s["active"] for s in self.stats().values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams still active after {timeout:.0f} s")
            time.sleep(0.5)


# ---------------------------------------------------------------------- slow clients
@dataclass
class Chunk:
    index: int
    read_at: float  # client wall time the record was read
    decoded_at: float  # server wall time the decoder finished the block
    record_bytes: int


class SlowStream(threading.Thread):
    """One streaming request whose client reads a chunk record, then sleeps ``delay`` seconds (``0``: full speed);
    keeps each chunk's index, arrival and size, the start and end records, or the error."""

    def __init__(self, url: str, body: dict, delay: float, timeout: float = 600.0):
        super().__init__(daemon=True)
        self.url, self.body, self.delay, self.timeout = url, body, delay, timeout
        self.start_record: dict | None = None
        self.chunks: list[Chunk] = []
        self.end: dict | None = None
        self.error: str | None = None
        self.admitted = threading.Event()  # set once the start record (or a failure) arrived

    def run(self) -> None:
        from hiar.serving.client import iter_records

        try:
            for rec in iter_records(self.url, self.body, timeout=self.timeout):
                if rec["type"] == "start":
                    self.start_record = rec
                    self.admitted.set()
                elif rec["type"] == "chunk":
                    size = len(json.dumps(rec, separators=(",", ":"))) + 1  # as hiar.serving.schema.record_line
                    self.chunks.append(Chunk(rec["index"], time.time(), rec["timing"]["stages"][-1]["end"], size))
                    time.sleep(self.delay)
                else:
                    self.end = rec
        except Exception as err:  # noqa: BLE001 - reported by the caller
            self.error = repr(err)
        finally:
            self.admitted.set()

    def decoder_ahead(self) -> int:
        """Most blocks the decoder had finished beyond the one this client was reading (server held back: small)."""
        done = sorted(c.decoded_at for c in self.chunks)
        return max((sum(d <= c.read_at for d in done) - (c.index + 1) for c in self.chunks), default=0)


def run_streams(url: str, count: int, blocks: int, delay: float, seed: int = 0,
                latents: bool = True) -> list[SlowStream]:
    body = {"num_blocks": blocks, "return_latents": latents}
    streams = [SlowStream(url, {**body, "prompt": PROMPTS[i % 2], "seed": seed + i}, delay) for i in range(count)]
    for s in streams:
        s.start()
    return streams


# ---------------------------------------------------------------------- the load run
@dataclass
class LoadResult:
    streams: list[SlowStream]
    extra_status: int  # the answer to the stream beyond the limit
    extra_retry_after: str | None
    extra_body: dict
    marks: dict[str, dict[str, float]]  # {mark (MARKS): {process: RSS MB}}
    max_lead: dict[str, int]
    live_stages: dict[str, int] = field(default_factory=dict)  # per replica, once round 2 is over: 0 unless kept
    seconds: dict[str, float] = field(default_factory=dict)  # per round
    sample_errors: list[str] = field(default_factory=list)
    series: list[dict[str, float]] = field(default_factory=list)  # the RSS samples from "first" to "end"

    @property
    def record_bytes(self) -> int:
        return max((c.record_bytes for s in self.streams for c in s.chunks), default=0)

    def growth(self) -> dict[str, float]:
        """Per process: round 2's peak (from "first" to "end") minus its RSS at "first"."""
        m = self.marks
        return {n: m["peak"][n] - m["first"][n] for n in m["first"]}

    def retained(self) -> dict[str, float]:
        """Per process: round 2's peak minus round 1's (peaks: idle RSS after a round depends on what the allocator
        happened to give back)."""
        m = self.marks
        return {n: m["peak"][n] - m["peak1"][n] for n in m["first"]}


def steps_run(process: str, num_steps: int) -> int:
    """How many denoising steps' forwards a process of the app runs: all ``num_steps`` in a Diagonal replica
    (each forward packs every step of its streams), else at most one. Its memory allowances scale with it."""
    return num_steps if process.startswith("Diagonal") else 1


def bounds_mb(result: LoadResult, *, streams: int, blocks: int, window: int, block_bytes: int,
              allowance_mb: float, num_steps: int = 1) -> dict[str, float]:
    """The growth each process may show from "first" to its peak (module docstring). A Diagonal replica packs all
    ``num_steps`` steps of its streams into each forward, so the working set of its forwards, and its allowance,
    is ``num_steps`` times a step stage's (measured at 8 streams: 26.7 MiB from "first" to the peak, the peak a
    full batch's forward; it was back at "first" + 4.4 MiB once the streams ended)."""
    item = max(block_bytes, result.record_bytes)
    held = streams * (window + 1) * item / 2**20
    proxy = streams * blocks * result.record_bytes / 2**20 + allowance_mb
    return {n: proxy if n.startswith("ProxyActor")
            else held + allowance_mb * steps_run(n, num_steps)
            for n in result.marks["first"]}


def run_load(url: str, sampler: Sampler, *, streams: int, blocks: int, delay: float, first_blocks: int = 4,
             warm_blocks: int | None = None, latents: bool = True, timeout: float = 900.0) -> LoadResult:
    """Round 1 (warm-up): ``streams`` streams of ``warm_blocks`` (default ``blocks``) read at full speed. Round 2:
    ``streams`` slow streams of ``blocks`` and, while they are open, one stream more. RSS is sampled throughout.
    ``latents``: the streams ask for ``return_latents`` (the largest chunk records: each block's float32 latents
    besides its MP4), so that what waits for a slow client, or leaks per chunk, weighs more."""
    warm_blocks = blocks if warm_blocks is None else warm_blocks
    t0 = time.time()
    since_start = len(sampler.samples)
    sampler.mark("start")
    sampler.run()
    try:
        warm = run_streams(url, streams, warm_blocks, 0.0, seed=1000, latents=latents)
        for s in warm:
            s.join(timeout)
        bad = [(s.error, s.end) for s in warm if s.error or not s.end or s.end["type"] != "end"]
        if bad:
            raise RuntimeError(f"warm-up streams failed: {bad}")
        sampler.wait_idle()
        sampler.mark("warm")
        peak1 = sampler.peak_since(since_start)
        t1 = time.time()
        load = run_streams(url, streams, blocks, delay, latents=latents)
        for s in load:
            s.admitted.wait(timeout)
        # every slot is held until a slow stream ends (blocks x delay): a queued request would time out here
        extra = requests.post(f"{url}/v1/videos", json={"prompt": PROMPTS[0], "num_blocks": 2}, timeout=30)
        deadline = time.monotonic() + timeout
        while any(len(s.chunks) < min(first_blocks, blocks) and s.is_alive() for s in load):
            if time.monotonic() > deadline:
                raise TimeoutError("the slow streams did not get their first blocks")
            time.sleep(0.1)
        since_first = len(sampler.samples)
        sampler.mark("first")
        for s in load:
            s.join(max(1.0, deadline - time.monotonic()))
        t2 = time.time()
        sampler.wait_idle()
    finally:
        sampler.stop()
    sampler.mark("end")
    marks = {**sampler.marks, "peak1": peak1, "peak": sampler.peak_since(since_first)}
    try:
        body = extra.json()
    except ValueError:
        body = {"text": extra.text[:300]}
    final = sampler.settled_stats()
    leads = {name: s["max_lead"] for name, s in final.items()}  # most since the replica started
    live = {name: s["live_stages"] for name, s in final.items()}
    return LoadResult(load, extra.status_code, extra.headers.get("retry-after"), body, marks, leads, live,
                      {"round 1 (warm-up)": t1 - t0, "round 2 (slow clients)": t2 - t1}, list(sampler.errors),
                      sampler.samples[since_first:])


def _row_order(name: str) -> tuple[int, str]:
    return next((i for i, kind in enumerate(ORDER) if name.startswith(kind)), len(ORDER)), name


def report(result: LoadResult, bounds: dict[str, float], *, streams: int, blocks: int, delay: float,
           window: int, block_bytes: int) -> str:
    lines = [f"streams={streams} blocks={blocks} read delay={delay:.2f} s/chunk max_buffered_blocks={window} "
             f"block payload={block_bytes} B, largest chunk record={result.record_bytes} B, "
             f"{len(result.series)} samples from 'first' to 'end'",
             f"stream {streams + 1}: HTTP {result.extra_status}, Retry-After {result.extra_retry_after}, "
             f"{result.extra_body.get('error')}",
             "RSS MB at: start, round 1 peak, after round 1, 'first', round 2 peak (from 'first'), end; "
             "growth = peak - first; r2 - r1 = peak - peak1",
             f"{'process':<12}" + "".join(f"{m:>9}" for m in MARKS)
             + f"{'growth':>9}{'bound':>8}{'r2 - r1':>9}{'max_lead':>10}"]
    growth, retained = result.growth(), result.retained()
    for name in sorted(result.marks["first"], key=_row_order):
        row = "".join(f"{result.marks[m].get(name, float('nan')):>9.1f}" for m in MARKS)
        lead = result.max_lead.get(name)
        lines.append(f"{name:<12}{row}{growth[name]:>9.1f}{bounds[name]:>8.1f}{retained[name]:>9.1f}"
                     f"{'' if lead is None else lead:>10}")
    done = [len(s.chunks) for s in result.streams]
    ends = [s.end["type"] if s.end else s.error for s in result.streams]
    lines.append(f"chunks read per stream {done}; last records {sorted(set(map(str, ends)))}")
    lines.append(f"per-stream stages still alive once every stream ended (each replica): {result.live_stages}")
    ahead = [s.decoder_ahead() for s in result.streams]
    lines.append(f"decoder ahead of the slow client (most blocks, per stream): {ahead}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    step = max(1, len(result.series) // 12)
    lines.append(f"RSS from 'first' to 'end', MB, every {step} samples:")
    for name in sorted(result.marks["first"], key=_row_order):
        lines.append(f"  {name:<12}" + " ".join(f"{rss.get(name, float('nan')):.1f}" for rss in result.series[::step]))
    if result.sample_errors:
        lines.append(f"{len(result.sample_errors)} samples failed, first: {result.sample_errors[0]}")
    return "\n".join(lines)


def block_payload_bytes(model_dir: str | Path) -> int:
    """Bytes of one latent block between two stages: float32 ``[1, C, k, H, W]`` of the served model."""
    from hiar.serving.stages import bundle_config

    cfg = bundle_config(Path(model_dir))
    v = cfg.video
    return 4 * v.latent_channels * cfg.rollout.frames_per_block * v.latent_height * v.latent_width


# ---------------------------------------------------------------------- command line
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI or bundle dir (default: a random tiny student)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="serving config override, e.g. --set serve.max_buffered_blocks=4")
    parser.add_argument("--streams", type=int, default=8, help="slow streams (serve.max_concurrent_streams)")
    parser.add_argument("--blocks", type=int, default=64, help="blocks per stream (serve.max_blocks)")
    parser.add_argument("--read-delay", type=float, default=2.0, help="client sleep after each chunk record, s")
    parser.add_argument("--first-blocks", type=int, default=4, help="chunks every stream reads before 'first'")
    parser.add_argument("--no-latents", action="store_true", help="chunk records without return_latents")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--allowance-mb", type=float, default=16.0, help="fixed part of the growth bound")
    args = parser.parse_args()

    import ray
    from ray import serve

    from hiar.config import load_config
    from hiar.serving.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="hiar-load-")
    model = args.model
    if model is None:
        from hiar.core.demo import random_student
        from hiar.io.bundle import save_bundle
        from hiar.methods.pretrain import build_world_components

        tiny = load_config("tiny")
        _, text, codec = build_world_components(tiny)
        model = str(save_bundle(Path(tmp.name) / "student", random_student(tiny), text, codec,
                                card={"note": "random init (benchmark)"}, config=tiny))
    overrides = [*args.overrides, f"serve.max_blocks={args.blocks}", f"serve.max_concurrent_streams={args.streams}"]
    cfg = load_config("tiny", overrides)
    ray.init(include_dashboard=False, num_cpus=os.cpu_count())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.time()
    serve.run(build_app({"overrides": overrides, "model_uri": model}), name="hiar-load", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    limits = requests.get(f"{url}/v1/limits", timeout=60).json()
    deployments = app_deployments("hiar-load")
    print(f"deployed in {time.time() - started:.0f} s on {os.cpu_count()} cores: topology {limits['topology']}, "
          f"max_batch {limits['max_batch']}, stages {' -> '.join(limits['stages'])}, deployments Ingress + "
          f"{', '.join(deployments)}", flush=True)
    from hiar.platform.registry import resolve_bundle

    block_bytes = block_payload_bytes(resolve_bundle(model))
    sampler = Sampler("hiar-load", url, deployments, os.getpid(), args.interval)
    result = run_load(url, sampler, streams=args.streams, blocks=args.blocks, delay=args.read_delay,
                      first_blocks=args.first_blocks, latents=not args.no_latents)
    window = cfg.serve.max_buffered_blocks
    bounds = bounds_mb(result, streams=args.streams, blocks=args.blocks, window=window, block_bytes=block_bytes,
                       allowance_mb=args.allowance_mb, num_steps=limits["num_steps"])
    print(report(result, bounds, streams=args.streams, blocks=args.blocks, delay=args.read_delay, window=window,
                 block_bytes=block_bytes))
    after = SlowStream(url, {"prompt": PROMPTS[1], "num_blocks": 3, "seed": 7}, 0.0)
    after.run()
    print(f"afterwards: a 3-block request ends with {after.end['type'] if after.end else after.error}, "
          f"{len(after.chunks)} chunks")
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
