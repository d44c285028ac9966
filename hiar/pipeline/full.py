"""The whole platform in one command: teacher -> data -> ODE init -> HiAR distillation -> evaluation -> registry
-> (optionally) a running Serve app.

    python -m hiar.pipeline.full --preset tiny [--deploy] [--stages distill,evaluate] [--set section.field=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m hiar.pipeline.full --preset tiny --deploy
    ray job submit ... -- python -m hiar.pipeline.full --preset wan2.1-1.3b --set data.storage=s3://bucket/hiar/data

Stages, in order (``--stages`` picks a subset; ``deploy`` runs only with ``--deploy`` or when named):

========== ============================================== =================================================
stage      what runs                                      skipped when
========== ============================================== =================================================
teacher    hiar.jobs.pretrain_teacher (tiny only)         teacher.path holds a bundle (unless
                                                          --retrain-teacher: then when its content-addressed
                                                          output under <run_dir>/teachers/ holds one)
ode_pairs  hiar.jobs.generate --kind ode_pairs            <data>/ode_pairs/manifest.json has this config's
trajectories hiar.jobs.generate --kind trajectories       dataset identity and every shard is committed
ode_init   hiar.jobs.train --stage ode_init               the stage's output card has the same identity
distill    hiar.jobs.train --stage distill                (``train.plan_stage``: config + input identities)
evaluate   hiar.jobs.evaluate on the distilled bundle     <run_dir>/eval/<bundle checksum>-<eval config>.json
register   hiar.jobs.promote register                     the recorded version still exists in the registry
promote    hiar.jobs.promote promote --version N          N is the champion, or the gate already decided N
                                                          against the current champion
deploy     Ray Serve app from models:/<name>@champion     the app at serve.host:serve.port serves that version
========== ============================================== =================================================

Every compute stage runs its job as a child process (``hiar.pipeline.supervisor``) with the same preset and
overrides, and reads the typed result the job hands back (``--output-json``, ``hiar.jobs.results``). The checks that
decide "skipped" run here, without compute, before any child starts (``hiar.pipeline.plans``). What each stage does:
``hiar.pipeline.stages`` and ``hiar.pipeline.deploy``; its MLflow records: ``hiar.pipeline.runs`` (one parent run
per pipeline config, a nested run per stage).

The console shows one progress line per stage, drawn from the jobs' progress events (``hiar.pipeline.console``:
live on a terminal or with ``HIAR_PROGRESS=live``, else at most one line per stage every 30 s), and a summary
table at the end. Each job's own output goes to ``<run_dir>/logs/<stage>.log``; a failed job's last lines are
printed with the error.

Outputs live under ``run_dir`` (``--run-dir``, ``HIAR_RUN_DIR`` or ``run_dir`` of the config); a relative run_dir
inside a ``ray job submit --working-dir`` copy (which disappears with the cluster) is put under ``~/hiar/``. Data go
to ``data.storage`` (local or ``s3://``), by default ``<run_dir>/data/<dataset identities>``, so a config change
writes new datasets next to the old ones instead of clashing with them.

Bad input -- an unknown preset, stage or config field, a destination that cannot be written, a missing teacher
for a preset that does not train its own -- is an error that names the valid choices, exit code 2, before anything
is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hiar.io.storage import write_local_json
from hiar.pipeline import stages as stage_steps
from hiar.pipeline.console import StageConsole
from hiar.pipeline.deploy import deploy, serve_until_interrupted
from hiar.pipeline.inputs import check_input, resolve_run_dir
from hiar.pipeline.outcome import InputError, Outcome, StageFailed
from hiar.pipeline.plans import PipelinePlans
from hiar.pipeline.runs import EXPERIMENT, PipelineRuns
from hiar.pipeline.stages import StageTools
from hiar.pipeline.summary import summary_dict, summary_text
from hiar.pipeline.supervisor import JobSupervisor, RayTarget
from hiar.platform.ray_cluster import interrupt_on_sigterm
from hiar.platform.tracking import tracking_uri

# The user's tracking server, read before MLflow runs here (set_tracking_uri exports MLFLOW_TRACKING_URI itself).
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None

# The stage table, in pipeline order: what each stage does (``hiar.pipeline.stages``, ``hiar.pipeline.deploy``).
STAGE_STEPS = {
    "teacher": stage_steps.teacher,
    "ode_pairs": lambda t, o: stage_steps.dataset(t, o, "ode_pairs"),
    "trajectories": lambda t, o: stage_steps.dataset(t, o, "trajectories"),
    "ode_init": lambda t, o: stage_steps.training(t, o, "ode_init"),
    "distill": lambda t, o: stage_steps.training(t, o, "distill"),
    "evaluate": stage_steps.evaluate,
    "register": stage_steps.register,
    "promote": stage_steps.promote,
    "deploy": deploy,
}
STAGES = tuple(STAGE_STEPS)

__all__ = ["STAGES", "InputError", "StageFailed", "parse_stages", "main"]


def parse_stages(values: list[str] | None, deploy: bool) -> list[str]:
    """``--stages a,b --stages c`` -> canonical order; raises InputError naming the valid stages."""
    if not values:
        return [s for s in STAGES if s != "deploy" or deploy]
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if "all" in names:
        return [s for s in STAGES if s != "deploy" or deploy or "deploy" in names]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise InputError(f"unknown stage(s) {unknown or values}; valid stages: {', '.join(STAGES)} (or 'all')")
    if deploy:
        names.append("deploy")
    return [s for s in STAGES if s in names]


class Pipeline:
    """One run of the chosen stages, in order, stopping at the first that fails."""

    def __init__(self, args, cfg, stages: list[str], run_dir: Path):
        self.args, self.stages, self.run_dir = args, stages, run_dir
        self.console = StageConsole()
        self.runs = PipelineRuns(str(run_dir), self.console)
        self.ray = RayTarget(self.console)
        self.tools = StageTools(
            plans=PipelinePlans(args.preset, args.overrides, cfg, run_dir, USER_TRACKING_URI),
            jobs=JobSupervisor(run_dir / "logs", self.console, self.ray, USER_TRACKING_URI),
            runs=self.runs, console=self.console, retrain_teacher=args.retrain_teacher)
        self.outcomes: list[Outcome] = []

    def run(self) -> int:
        self.runs.start(self.tools.plans.cfg, self.stages)
        t_all = time.monotonic()
        failed, teacher_fixed = None, False
        for stage in self.stages:
            if stage != "teacher" and not teacher_fixed:
                self.tools.plans.fix_teacher_and_storage()  # the teacher is known now: every later job gets it
                teacher_fixed = True
            o, failed = self.run_stage(stage)
            self.outcomes.append(o)
            if failed is not None:
                break
        seconds = time.monotonic() - t_all
        self.finish(seconds, failed)
        if failed is not None:
            self.console.say(f"[full] error: stage {self.outcomes[-1].stage} failed: {failed}", stream=sys.stderr)
            return 1
        if "deploy" in self.stages and self.ray.owned:
            serve_until_interrupted(self.tools)
        return 0

    def run_stage(self, stage: str) -> tuple[Outcome, BaseException | None]:
        o, failed = Outcome(stage), None
        t0 = time.monotonic()
        try:
            STAGE_STEPS[stage](self.tools, o)
        except (StageFailed, InputError) as err:
            o.status, o.key, failed = "failed", str(err).splitlines()[0][:200], err
        except Exception as err:  # noqa: BLE001 - report every failure in the summary
            o.status, o.key, failed = "failed", f"{type(err).__name__}: {err}"[:200], err
        o.seconds = time.monotonic() - t0
        log = self.tools.jobs.log_path(stage)
        o.log = str(log) if log.exists() else ""
        self.console.say(f"[full] {stage}: {o.status} in {o.seconds:.1f} s; {o.key}")
        try:
            self.runs.record(o)
        except Exception as err:  # noqa: BLE001
            self.console.say(f"[full] warning: could not record {stage} in MLflow: {err}")
        return o, failed

    def finish(self, seconds: float, failed: BaseException | None) -> None:
        store = USER_TRACKING_URI or tracking_uri(str(self.run_dir))
        where = f"(parent run {self.runs.parent_run_id}, experiment {EXPERIMENT})"
        mlflow_ui = (f"MLflow UI: {USER_TRACKING_URI} {where}" if USER_TRACKING_URI
                     else f"MLflow UI: mlflow ui --backend-store-uri {store}   {where}")
        text = summary_text(self.outcomes, seconds, run_dir=self.run_dir, ray_logs=self.ray.logs(),
                            mlflow_ui=mlflow_ui)
        self.console.say(text)
        summary = summary_dict(self.outcomes, seconds, failed is None, parent_run_id=self.runs.parent_run_id,
                               run_dir=self.run_dir, tracking_uri=store, ray_logs=self.ray.logs())
        try:
            self.runs.finish(text, summary, ok=failed is None)
        except Exception as err:  # noqa: BLE001
            self.console.say(f"[full] warning: could not finish the MLflow parent run: {err}")
        write_local_json(self.run_dir / "pipeline" / "last-summary.json", summary)
        if self.args.summary_json:
            write_local_json(Path(self.args.summary_json), summary)

    def interrupted(self) -> None:
        self.tools.jobs.stop()
        self.runs.killed()
        self.console.say("[full] interrupted", stream=sys.stderr)


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--stages", action="append", default=None, metavar="A,B",
                        help=f"run only these stages (comma-separated, repeatable; in pipeline order): "
                             f"{', '.join(STAGES)}")
    parser.add_argument("--deploy", action="store_true", help="end by starting the Serve app from the champion")
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="tiny: train a teacher under <run_dir>/teachers/ instead of using teacher.path")
    parser.add_argument("--run-dir", default=None, help="outputs, MLflow store, checkpoints (default: HIAR_RUN_DIR, "
                                                        "else run_dir of the config)")
    parser.add_argument("--summary-json", default=None, help="also write the summary (JSON) here")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)  # unknown preset / field: usage error listing the valid ones (exit 2)
    try:
        stages = parse_stages(args.stages, args.deploy)
        run_dir = resolve_run_dir(args.run_dir, cfg.run_dir)
        check_input(cfg, stages, run_dir, args.retrain_teacher)
    except InputError as err:
        parser.error(str(err))

    pipeline = Pipeline(args, cfg, stages, run_dir)
    interrupt_on_sigterm()  # `ray job stop`, `kill`: end the child and the MLflow runs cleanly
    pipeline.console.say(f"[full] preset {cfg.preset}, stages {', '.join(stages)}; run dir {run_dir}")
    try:
        return pipeline.run()
    except KeyboardInterrupt:
        pipeline.interrupted()
        return 130


if __name__ == "__main__":
    sys.exit(main())
