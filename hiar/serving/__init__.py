"""Ray Serve deployment of the HiAR student: denoising stages streaming video over HTTP.

``app`` (the graph by ``serve.topology``, ``build_app``, ``python -m hiar.serving.app``), ``ingress`` (the HTTP
routes), ``stages`` (per-step stages and decoder), ``diagonal`` (the one-deployment topology: each anti-diagonal as
one forward), ``batcher`` (cross-stream batching on a replica), ``flow`` (back-pressure between stages),
``schema`` (the HTTP contract and record format), ``client`` (save a stream to MP4, print time-to-first-chunk and
chunks/s). Serving imports the maths and the platform layer, never the jobs.
"""
