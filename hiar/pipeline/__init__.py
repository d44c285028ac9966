"""The orchestrator: ``python -m hiar.pipeline.full`` runs the jobs as a table of stages.

    full         the command: arguments, the stage table, the run loop
    inputs       the command's input, checked before anything is written (exit code 2)
    plans        the config every job gets; each stage's output and whether it exists (no compute)
    stages       what each compute stage does, from its job's typed result; deploy: the Serve app and its probe
    supervisor   a job as a child process, its log under <run_dir>/logs, the Ray cluster the jobs join
    console      the orchestrator's lines: one progress line per stage
    runs         the MLflow parent run and a nested run per stage
    outcome      a stage's outcome, its failures, reading a job's result
    summary      the table at the end
"""
