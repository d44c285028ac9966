"""HiAR on Ray Serve: denoising deployments streaming blocks, video over HTTP. Two topologies (``serve.topology``).

Graph (``build_app``), ``per_step`` (the default: one device per denoising step)::

    HTTP -> Ingress (hiar.serving.ingress: FastAPI; validation, prompt encoding, concurrency limit, NDJSON / MP4)
              -> Decoder (codec decode + H.264 per block)
                   -> StepS -> ... -> Step2 -> Step1     (one StepStage per stream per step: that step's KV cache)

Each arrow is a streaming handle call made once per stream; blocks flow back along it as they finish, so at
any moment Step1 works on block n while Step2 works on block n - 1 and so on (the anti-diagonals of the
N x S grid, paper §3.2) and the first chunk reaches the client while later blocks are still being denoised.
Stream affinity, bit-identity with ``hierarchical_rollout`` and back-pressure: ``hiar.serving.stages`` and
``hiar.serving.flow``. The HTTP contract (request, limits, record format, status codes): ``hiar.serving.schema``.

``diagonal`` (one device): ``Ingress -> Diagonal``, one deployment holding all S step caches of a stream,
running each anti-diagonal as ONE packed forward and decoding the blocks on a second thread
(``hiar.serving.diagonal``); ``serve.decoder_replicas`` and ``serve.decoder_num_gpus`` apply to ``per_step`` only.

In both, the blocks of concurrent streams that wait at the same stage of one replica are denoised in one
forward (``serve.max_batch`` blocks at most, waiting ``serve.batch_wait_ms`` at most for company:
``hiar.serving.batcher``); every stage replica's ``stats`` shows the batch sizes it actually used, and every
chunk record the batch its block was in. The app logs its topology and batching when it is built.

Endpoints: ``POST /v1/videos`` (NDJSON stream, or one MP4 with ``"stream": false``), ``GET /v1/limits``,
``GET /v1/stats``, ``GET /healthz``, and FastAPI's ``/docs`` (OpenAPI page) and ``/openapi.json``.

Concurrency: the ingress runs ONE replica (it counts the running streams); beyond
``serve.max_concurrent_streams`` a request gets 429 at once, never a queue. The stage deployments accept
that many streams per replica, so a stream admitted by the ingress is never queued inside the graph.

Model: ``models:/hiar-student@champion`` by default (``serve.model_uri``), or ``models:/name/<version>``, a
``runs:/`` URI or a local bundle directory. The builder resolves an alias to its version once (all replicas
serve that version; the ``start`` record names it) and downloads the bundle (tracking server from
``MLFLOW_TRACKING_URI``); replicas on other nodes download the pinned version themselves.

Run it::

    python -m hiar.serving.app --model models:/hiar-student@champion --preset tiny     # prints the URL
    python -m hiar.serving.app --model runs/some/bundle-dir --set serve.port=8010
    serve run hiar/serving/serve_config.yaml                                            # the RayService config
    python -m hiar.serving.client --url http://127.0.0.1:8000 --prompt "..." --seconds 3 --out video.mp4
"""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from hiar.config import ServeConfig, load_config
from hiar.serving.diagonal import DiagonalDeployment
from hiar.serving.ingress import Ingress
from hiar.serving.stages import DecoderDeployment, StepDeployment, bundle_config, log

APP_NAME = "hiar"
DEFAULT_ARGS = {"preset": "tiny", "model_uri": None, "overrides": []}
#: seconds between a stopping replica's looks at whether its streams have drained (it still waits for them, up to
#: Serve's graceful_shutdown_timeout_s)
DRAIN_POLL_S = 0.5


# ---------------------------------------------------------------------- building the app
def pin_model(uri: str) -> dict:
    """``{"uri", "pinned", "path"}``: the alias resolved to a version once, and a local copy of the bundle."""
    from hiar.platform.registry import is_model_uri, model_version_for, resolve_bundle

    pinned = uri
    if is_model_uri(uri):
        if uri.startswith("models:/"):
            try:
                mv = model_version_for(uri)
            except Exception as err:  # noqa: BLE001 - MLflow raises several kinds
                raise FileNotFoundError(f"cannot resolve model {uri!r}: {err}") from None
            pinned = f"models:/{mv.name}/{mv.version}"
        path = resolve_bundle(pinned)
    else:
        path = resolve_bundle(uri).resolve()
        pinned = str(path)
    return {"uri": uri, "pinned": pinned, "path": str(path)}


def _check_serve_config(s: ServeConfig) -> None:
    for name in ("max_blocks", "max_concurrent_streams", "stage_replicas", "decoder_replicas", "max_buffered_blocks",
                 "stage_torch_threads", "max_prompt_chars", "max_request_bytes"):
        if getattr(s, name) < 1:
            raise ValueError(f"serve.{name} must be >= 1, got {getattr(s, name)}")
    for name in ("stage_num_cpus", "stage_num_gpus", "decoder_num_gpus", "ingress_num_gpus"):
        if getattr(s, name) < 0:
            raise ValueError(f"serve.{name} must be >= 0, got {getattr(s, name)}")


def describe(s: ServeConfig, names: list[str], num_steps: int) -> str:
    """One line: the topology, its denoising deployments and the cross-stream batching."""
    layout = (f"topology diagonal ({names[0]}: all {num_steps} steps of a stream, one anti-diagonal per forward, "
              f"and its decoder)"
              if s.topology == "diagonal" else f"topology per_step ({' -> '.join(names)}, one deployment per step)")
    batching = (f"cross-stream batching up to {s.max_batch} blocks per forward, waiting up to {s.batch_wait_ms:g} ms"
                if s.max_batch > 1 else "no cross-stream batching (max_batch 1)")
    return f"{layout}; {batching}; {s.stage_replicas} replica(s) per denoising deployment"


def build_app(args: dict | None = None):
    """Ray Serve application builder (``import_path: hiar.serving.app:build_app``).

    ``args``: ``preset`` (default ``tiny``), ``overrides`` (``section.field=value`` strings, e.g.
    ``serve.max_blocks=32``), ``model_uri`` (default ``serve.model_uri``). The model's own ``hiar_config.yaml``
    decides the schedule, rollout and video geometry; the serving preset decides limits and placement.
    """
    args = {**DEFAULT_ARGS, **(args or {})}
    unknown = sorted(set(args) - set(DEFAULT_ARGS))
    if unknown:
        raise ValueError(f"unknown application args {unknown}; valid: {sorted(DEFAULT_ARGS)}")
    overrides = args["overrides"] or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args["preset"], overrides)
    s = cfg.serve
    _check_serve_config(s)
    model = pin_model(args["model_uri"] or s.model_uri)
    model_cfg = bundle_config(Path(model["path"]), fallback=None)
    serve_dict = dataclasses.asdict(s)
    streams = s.max_concurrent_streams
    # every deployment: how soon Serve notices a dead replica, and how often a stopping replica looks whether its
    # streams have drained (Serve's default, 2 s, made each shutdown of the app take about 14 s here)
    common = dict(health_check_period_s=s.health_check_period_s, graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
    stage_opts = dict(num_replicas=s.stage_replicas, max_ongoing_requests=streams, **common,
                      ray_actor_options={"num_cpus": s.stage_num_cpus, "num_gpus": s.stage_num_gpus})
    upstream, names = None, []
    if s.topology == "diagonal":  # one deployment, the Decoder stage included (hiar.serving.diagonal)
        names.append("Diagonal")
        decoder = DiagonalDeployment.options(name="Diagonal", **stage_opts).bind(model, serve_dict)
    else:
        for j in range(model_cfg.schedule.num_steps):
            names.append(f"Step{j + 1}")
            upstream = StepDeployment.options(name=names[-1], **stage_opts).bind(model, j, serve_dict, upstream)
        decoder = DecoderDeployment.options(
            name="Decoder", num_replicas=s.decoder_replicas, max_ongoing_requests=streams, **common,
            ray_actor_options={"num_cpus": s.stage_num_cpus, "num_gpus": s.decoder_num_gpus},
        ).bind(model, serve_dict, upstream)
    log.info("HiAR Serve app: %s", describe(s, names, model_cfg.schedule.num_steps))
    # Rejections (4xx/429) are answered by the ingress itself: give it room for them beyond the streams. Past
    # that, a bounded queue, then Serve itself answers 429 (overload never grows memory or hangs a client).
    ingress_ongoing = max(64, 4 * streams)
    return Ingress.options(
        name="Ingress", num_replicas=1, max_ongoing_requests=ingress_ongoing,
        max_queued_requests=4 * ingress_ongoing,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1), **common,
        ray_actor_options={"num_cpus": s.stage_num_cpus, "num_gpus": s.ingress_num_gpus},
    ).bind(decoder, model, serve_dict, names)


def stop_serving(app_name: str, *, owns_serve: bool) -> None:
    """Take down what a deploy process put up, then leave Ray: all of Serve (controller, proxies, every app) when
    this process started Serve on the cluster, else only its own application, so that someone else's Serve keeps
    running. ``ray.shutdown`` also stops the processes of a cluster that ``ray.init`` started here."""
    if owns_serve:
        serve.shutdown()
    else:
        serve.delete(app_name)
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    from hiar.platform.ray_cluster import interrupt_on_sigterm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="models:/name@alias, models:/name/<version>, runs:/... or a local bundle directory "
                             "(default: serve.model_uri of the preset)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set serve.max_blocks=32 (repeatable)")
    parser.add_argument("--host", default=None, help="HTTP host (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    parser.add_argument("--name", default=APP_NAME, help="Serve application name")
    parser.add_argument("--no-block", action="store_true",
                        help="deploy and return instead of serving until Ctrl-C or SIGTERM")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(include_dashboard=False)
    interrupt_on_sigterm()  # ray.init replaced it (hiar.platform.ray_cluster): SIGTERM stops the app like Ctrl-C
    owns_serve = not serve.status().proxies  # no Serve on this cluster yet: all of it will be ours
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app({"preset": args.preset, "overrides": args.overrides, "model_uri": args.model})
        serve.run(app, name=args.name, route_prefix="/")
        url = f"http://{host}:{port}"
        print(f"HiAR serving at {url}  (POST {url}/v1/videos, OpenAPI page {url}/docs)", flush=True)
        s = cfg.serve
        print(f"serving: topology {s.topology}, max_batch {s.max_batch}, batch_wait_ms {s.batch_wait_ms:g}", flush=True)
        if args.no_block:
            return
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"stopping: {'Serve' if owns_serve else f'the Serve app {args.name!r}'}", flush=True)
        stop_serving(args.name, owns_serve=owns_serve)


if __name__ == "__main__":
    sys.exit(main())
