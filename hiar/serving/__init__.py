"""Ray Serve deployment of the HiAR student: per-denoising-step stages streaming video over HTTP.

``app`` (the graph, ``build_app``, ``python -m hiar.serving.app``), ``ingress`` (the HTTP routes), ``stages``
(step stages and decoder), ``flow`` (back-pressure between stages), ``schema`` (the HTTP contract and record
format), ``client`` (save a stream to MP4, print time-to-first-chunk and chunks/s). Serving imports the maths and the platform layer, never
the jobs.
"""
