"""Ray Serve deployment of the HiAR student: per-denoising-step stages streaming video over HTTP.

``serving.app`` (graph, ingress, ``build_app``, ``python -m serving.app``), ``serving.stages`` (step stages and
decoder), ``serving.flow`` (back-pressure between stages), ``serving.schema`` (the HTTP contract and record
format), ``serving.client`` (save a stream to MP4, print time-to-first-chunk and chunks/s).
"""
