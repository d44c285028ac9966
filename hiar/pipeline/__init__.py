"""The orchestrator: ``python -m hiar.pipeline.full`` runs the jobs as a table of stages.
"""
