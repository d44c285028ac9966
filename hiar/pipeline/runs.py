"""The pipeline's MLflow runs: one parent run per pipeline config, one nested run per stage.

Experiment ``hiar-pipeline``, parent tagged ``hiar.pipeline_identity``. A rerun after a crash continues the
unfinished parent run of the same config; a rerun after a finished one opens a new parent run. Every stage gets a
nested run (tags ``hiar.stage``, ``hiar.stage_status`` = ran / skipped / failed, metric ``seconds`` and the stage's
key metrics); the jobs' own runs (train, evaluate, registry, generate) carry ``mlflow.parentRunId`` = the parent
too and are linked from the stage run (``hiar.stage_run_id``). The summary is logged to the parent at the end.
"""

from __future__ import annotations

import time

from hiar.identity import identity
from hiar.pipeline.console import StageConsole
from hiar.pipeline.outcome import Outcome
from hiar.platform.tracking import flatten, mlflow_experiment

EXPERIMENT = "hiar-pipeline"
PIPELINE_TAG = "hiar.pipeline_identity"
STAGE_TAG = "hiar.stage"
STATUS_TAG = "hiar.stage_status"


class PipelineRuns:
    def __init__(self, run_dir: str, console: StageConsole):
        self.run_dir, self.console = run_dir, console
        self.client = None
        self.experiment_id = None
        self.parent_run_id: str | None = None
        self.stage_runs: dict[str, object] = {}  # stage -> its nested run in a continued parent

    def start(self, cfg, stages: list[str]) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.experiment_id = mlflow_experiment(EXPERIMENT, self.run_dir)
        self.client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        pipeline_identity = identity({"config": cfg.to_dict(), "stages": stages})
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_identity}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if found and found[0].info.status != "FINISHED":
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            for r in self.client.search_runs([self.experiment_id],
                                             filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'"):
                self.stage_runs.setdefault(r.data.tags.get(STAGE_TAG), r)
            self.console.say(f"[full] continuing the unfinished pipeline run {self.parent_run_id} of this config")
        else:
            from mlflow.entities import Param

            run = self.client.create_run(self.experiment_id, run_name=f"full-{cfg.preset}-{pipeline_identity[:8]}",
                                         tags={PIPELINE_TAG: pipeline_identity, "hiar.stages": ",".join(stages)})
            self.parent_run_id = run.info.run_id
            items = [("stages", ",".join(stages)), *flatten(cfg.to_dict()).items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.parent_run_id,
                                      params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
        self.console.say(f"[full] MLflow parent run {self.parent_run_id} (experiment {EXPERIMENT}) at "
                         f"{mlflow.get_tracking_uri()}")

    def record(self, o: Outcome) -> None:
        """The stage's nested run under the parent (one per stage per parent run; a 'ran' record is kept when a
        resumed parent later finds that stage done)."""
        if self.client is None:
            return
        from mlflow.entities import Metric, RunTag

        existing = self.stage_runs.get(o.stage)
        if existing is not None and existing.data.tags.get(STATUS_TAG) == "ran" and o.status == "skipped":
            return
        if existing is not None:
            run_id = existing.info.run_id
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=o.stage, tags={
                "mlflow.parentRunId": self.parent_run_id, STAGE_TAG: o.stage}).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric("seconds", float(o.seconds), now, 0)]
        metrics += [Metric(k.replace("@", "_"), float(v), now, 0) for k, v in o.metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        tags = [RunTag(STATUS_TAG, o.status), RunTag("hiar.key_metric", o.key[:5000])]
        tags += [RunTag(f"hiar.{k}", str(v)[:5000]) for k, v in o.detail.items() if v is not None]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if o.status == "failed" else "FINISHED")

    def link(self, run_id: str | None) -> None:
        """Hang a job's own MLflow run under the parent (for jobs that take no --parent-run-id)."""
        if run_id and self.client is not None:
            try:
                self.client.set_tag(run_id, "mlflow.parentRunId", self.parent_run_id)
            except Exception:  # noqa: BLE001 - linking is cosmetic
                pass

    def finish(self, text: str, summary: dict, ok: bool) -> None:
        if self.client is None:
            return
        self.client.log_text(self.parent_run_id, text, "summary.txt")
        self.client.log_dict(self.parent_run_id, summary, "summary.json")
        self.client.log_metric(self.parent_run_id, "seconds", summary["seconds"])
        self.client.set_terminated(self.parent_run_id, "FINISHED" if ok else "FAILED")

    def killed(self) -> None:
        if self.client is not None and self.parent_run_id:
            try:
                self.client.set_terminated(self.parent_run_id, "KILLED")
            except Exception:  # noqa: BLE001 - we are on the way out
                pass

    # ------------------------------------------------------------------ the registry, as the stages check it
    def champion(self, model_name: str) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(model_name, "champion").version)
        except Exception:  # noqa: BLE001 - no model / no alias yet
            return None

    def version_exists(self, model_name: str, version: str) -> bool:
        try:
            self.client.get_model_version(model_name, str(version))
            return True
        except Exception:  # noqa: BLE001 - deleted version / another registry
            return False
