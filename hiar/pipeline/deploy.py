"""The deploy stage: the registry's champion as the Ray Serve app ``hiar`` at ``serve.host:serve.port``, checked by
one real request (``hiar.serving.client.fetch_video``: an MP4 that decodes to the promised number of frames).

Skipped when the app at that address already serves the champion's version (and the cluster is not one this
process started: such a cluster has no app yet). On a cluster this process started, the pipeline keeps serving
until Ctrl-C or SIGTERM and then takes Serve and the cluster down.
"""

from __future__ import annotations

import time

import requests

from hiar.pipeline.outcome import Outcome, StageFailed
from hiar.pipeline.stages import StageTools
from hiar.platform.ray_cluster import interrupt_on_sigterm
from hiar.serving.client import StreamError, fetch_video, served_model

APP_NAME = "hiar"
ANSWER_WAIT_S = 60.0  # for the proxy to route to a just-deployed app


def deploy(t: StageTools, o: Outcome) -> None:
    cfg = t.plans.cfg
    s, name = cfg.serve, cfg.registry.model_name
    champion = t.runs.champion(name)
    if champion is None:
        raise StageFailed(f"no champion of {name!r} in the registry to deploy; run register + promote first")
    uri, want = f"models:/{name}@champion", f"models:/{name}/{champion}"
    url = f"http://{s.host}:{s.port}"
    if served_model(url) == want and not t.jobs.ray.owned:
        o.status = "skipped"
        probe = {}
    else:
        start_app(t, uri, want, url)
        o.status = "ran"
        probe = probe_app(t, url)
    o.metrics = {"champion": champion, **probe}
    o.key = f"{url} serves v{champion}" + (f"; probe MP4 {probe['probe_frames']} frames in "
                                           f"{probe['probe_seconds']:.1f} s" if probe else "")
    o.detail.update({"url": url, "model": want})


def start_app(t: StageTools, uri: str, want: str, url: str) -> None:
    import ray
    from ray import serve

    from hiar.serving.app import build_app

    s = t.plans.cfg.serve
    address = t.jobs.ray.ensure()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        interrupt_on_sigterm()  # ray.init replaced it (hiar.platform.ray_cluster)
    t.console.say(f"[full] deploy: {uri} (= {want}) as Serve app {APP_NAME!r} at {url}")
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app({"preset": t.plans.preset, "overrides": t.plans.overrides, "model_uri": uri}),
              name=APP_NAME, route_prefix="/")
    # Serve keeps the HTTP options it was first started with on a cluster: deployed there, the app answers
    # elsewhere and nothing of ours at the configured address.
    deadline = time.monotonic() + ANSWER_WAIT_S
    while (serving := served_model(url)) != want:
        if time.monotonic() > deadline:
            raise StageFailed(f"the app is deployed but {url}/v1/limits answers with {serving!r}, not {want}: "
                              f"Serve on this cluster may listen elsewhere (it keeps the HTTP options it was first "
                              f"started with); set serve.host/serve.port to match, or `serve shutdown`")
        time.sleep(1)


def probe_app(t: StageTools, url: str) -> dict:
    """One ``POST /v1/videos`` (stream false) for the first held-out prompt; the MP4 is kept under
    ``<run_dir>/deploy/probe.mp4``."""
    from hiar.io.prompts import prompt_set

    body = {"prompt": prompt_set(t.plans.cfg).heldout[0], "num_blocks": 2, "seed": 0}
    try:
        video = fetch_video(url, body)
    except (StreamError, requests.RequestException) as err:
        raise StageFailed(f"probe: {err}") from None
    out = t.plans.run_dir / "deploy" / "probe.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(video.mp4)
    t.console.say(f"[full] deploy: probe OK: {video.num_frames} frames ({len(video.mp4)} bytes MP4, decoded) in "
                  f"{video.seconds:.1f} s -> {out}")
    return {"probe_frames": video.num_frames, "probe_seconds": video.seconds}


def serve_until_interrupted(t: StageTools) -> None:
    """Until Ctrl-C or SIGTERM; then Serve and this process's own Ray cluster are taken down (exit 0)."""
    from hiar.serving.app import stop_serving

    s = t.plans.cfg.serve
    t.console.say(f"[full] serving at http://{s.host}:{s.port} on this process's own Ray cluster; Ctrl-C or SIGTERM "
                  f"stops it (submit to a cluster -- RAY_ADDRESS / ray job submit -- to leave it running)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    t.console.say("[full] stopping: Serve and this process's Ray cluster")
    stop_serving(APP_NAME, owns_serve=True)
