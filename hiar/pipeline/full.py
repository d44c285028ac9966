"""The whole platform in one command: teacher -> data -> ODE init -> HiAR distillation -> evaluation -> registry
-> (optionally) a running Serve app.

    python -m hiar.pipeline.full --preset tiny [--deploy] [--stages distill,evaluate] [--set section.field=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m hiar.pipeline.full --preset tiny --deploy
    ray job submit ... -- python -m hiar.pipeline.full --preset wan2.1-1.3b --set data.storage=s3://bucket/hiar/data

Stages, in order (``--stages`` picks a subset; ``deploy`` runs only with ``--deploy`` or when named):

========== ============================================== =================================================
stage      what runs                                      skipped when
========== ============================================== =================================================
teacher    hiar/jobs/pretrain_teacher.py (tiny only)      teacher.path holds a bundle (unless
                                                          --retrain-teacher: then when its content-addressed
                                                          output under <run_dir>/teachers/ holds one)
ode_pairs  hiar/jobs/generate.py --kind ode_pairs         <data>/ode_pairs/manifest.json has this config's
trajectories hiar/jobs/generate.py --kind trajectories    dataset identity and every shard is committed
ode_init   hiar/jobs/train.py --stage ode_init            the stage's output card has the same identity
distill    hiar/jobs/train.py --stage distill             (``train.plan_stage``: config + input identities)
evaluate   hiar/jobs/evaluate.py on the distilled bundle  <run_dir>/eval/<bundle checksum>-<eval config>.json
register   hiar/jobs/promote.py register                  the recorded version still exists in the registry
promote    hiar/jobs/promote.py promote --version N       N is the champion, or the gate already decided N
                                                          against the current champion
deploy     Ray Serve app from models:/<name>@champion     the app at serve.host:serve.port serves that version
========== ============================================== =================================================

Every compute stage runs as a child process (``sys.executable -m hiar.jobs.<job>``) with the same preset and
overrides: Ray and MLflow state stay per job, a crash of one job is an exit code here, and the child dies with this
process (``PR_SET_PDEATHSIG``), so killing the job kills the whole tree and a resubmission resumes from the
outputs and checkpoints on disk (Ray Train resumes a stage from its last checkpoint; generation skips committed
shards). The checks that decide "skipped" run here, without compute, before any child starts.

MLflow: one parent run per pipeline config (experiment ``hiar-pipeline``, tag ``hiar.pipeline_identity``). A
rerun after a crash continues the unfinished parent run of the same config; a rerun after a finished one opens a
new parent run. Under the parent, every stage gets a nested run (tags ``hiar.stage``, ``hiar.stage_status`` =
ran / skipped / failed, metric ``seconds`` and the stage's key metrics); the jobs' own runs (train, evaluate,
registry, generate) carry ``mlflow.parentRunId`` = the parent too and are linked from the stage run
(``hiar.stage_run_id``). The summary table is printed at the end and logged to the parent run.

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
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


from hiar.io.storage import PACKAGE_PARENT, resolve_path
from hiar.platform.ray_cluster import interrupt_on_sigterm
from hiar.platform.tracking import mlflow_experiment, tracking_uri

# The user's tracking server, read before MLflow runs here (set_tracking_uri exports MLFLOW_TRACKING_URI itself).
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None

STAGES = ("teacher", "ode_pairs", "trajectories", "ode_init", "distill", "evaluate", "register", "promote", "deploy")
EXPERIMENT = "hiar-pipeline"
PIPELINE_TAG = "hiar.pipeline_identity"
STAGE_TAG = "hiar.stage"
STATUS_TAG = "hiar.stage_status"
APP_NAME = "hiar"


class StageFailed(RuntimeError):
    pass


class InputError(ValueError):
    pass


@dataclass
class Outcome:
    stage: str
    status: str = "failed"  # ran | skipped | failed
    seconds: float = 0.0
    key: str = ""  # the key metric, as text for the summary
    metrics: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers
def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (a SIGKILLed job takes its stage with it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_bundle(path: str | Path) -> bool:
    """A model directory of the project's own layout with its card (a trained tiny teacher)."""
    from hiar.io.bundle import CARD_FILE, open_model_dir

    try:
        return open_model_dir(path).layout == "bundle" and (Path(path) / CARD_FILE).is_file()
    except (FileNotFoundError, ValueError):
        return False


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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


def resolve_run_dir(arg: str | None, cfg_run_dir: str) -> Path:
    raw = arg or os.environ.get("HIAR_RUN_DIR") or cfg_run_dir
    if "://" in raw:
        raise InputError(f"run_dir must be a local directory (it holds the MLflow SQLite store and model bundles), "
                         f"got {raw!r}; put datasets on S3 with data.storage=s3://... and checkpoints with "
                         f"distill.storage_path=s3://...")
    path = Path(raw).expanduser()
    if not path.is_absolute() and "runtime_resources" in PACKAGE_PARENT.parts:
        # a `ray job submit --working-dir` copy: outputs written into it vanish with the cluster
        path = Path.home() / "hiar" / path
        print(f"[full] running from a Ray working_dir copy; outputs go to {path} (set --run-dir to choose)",
              flush=True)
    return Path(resolve_path(str(path))).resolve()


def check_destinations(uris: list[str]) -> None:
    """Each destination writable (hiar.io.storage.check_writable); on a failure, directories this check created are
    removed again, so a rejected command leaves nothing behind."""
    from hiar.io.storage import check_writable

    created: list[Path] = []
    try:
        for uri in uris:
            if "://" not in uri:
                p = Path(uri).resolve()
                first_missing = None
                while not p.exists():
                    first_missing, p = p, p.parent
                if first_missing is not None:
                    created.append(first_missing)
            try:
                check_writable(uri)
            except ValueError as err:
                raise InputError(f"{err} (storage must be a writable local directory or s3://bucket/prefix)") from None
    except InputError:
        import shutil

        for p in reversed(created):
            if p.exists() and not any(f.is_file() for f in p.rglob("*")):
                shutil.rmtree(p, ignore_errors=True)
        raise


def preflight_models(cfg, stages: list[str], retrain_teacher: bool) -> None:
    """Before any stage runs: the teacher and the real score open as model directories (local or s3://, either
    layout; ``hiar.io.bundle``), the config's ``model.*`` describes the teacher and the real score fits its text
    encoder and VAE. The tiny preset may train its teacher first (stage ``teacher``): then there is nothing to
    check yet."""
    from hiar.jobs.train import check_models

    if not set(stages) - {"deploy", "teacher"}:
        return
    teacher = resolve_path(cfg.teacher.path) if cfg.teacher.path else ""
    if cfg.preset == "tiny" and (retrain_teacher or not _is_bundle(teacher)) and "teacher" in stages:
        return
    if not teacher:
        raise InputError(f"the {cfg.preset} preset needs teacher.path: a Wan2.1 diffusers repository as published "
                         f"(model_index.json, transformer/, vae/, text_encoder/, tokenizer/), local or s3://")
    try:
        check_models(cfg, teacher)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None


# ------------------------------------------------------------------------------------------------ pipeline
class Pipeline:
    def __init__(self, args, cfg, stages: list[str], run_dir: Path):
        self.args, self.stages, self.run_dir = args, stages, run_dir
        self.preset = args.preset
        self.user_overrides = list(args.overrides)
        self.user_tracking_uri = USER_TRACKING_URI
        self.derived: dict[str, str] = {"run_dir": str(run_dir)}
        self.cfg = cfg
        self.teacher = resolve_path(cfg.teacher.path) if cfg.teacher.path else ""
        self.storage = cfg.data.storage or ""
        self.ray_address = os.environ.get("RAY_ADDRESS") or None
        self.own_ray = False
        self.client = None
        self.experiment_id = None
        self.parent_run_id = None
        self.stage_runs: dict[str, object] = {}
        self.outcomes: list[Outcome] = []
        self.child: subprocess.Popen | None = None
        self._cache: dict = {}

    # -------------------------------------------------------------------- config seen by every job
    @property
    def overrides(self) -> list[str]:
        return self.user_overrides + [f"{k}={v}" for k, v in self.derived.items()]

    def set_args(self) -> list[str]:
        out = ["--preset", self.preset]
        for o in self.overrides:
            out += ["--set", o]
        return out

    def reload(self) -> None:
        from hiar.config import load_config

        self.cfg = load_config(self.preset, self.overrides)

    # -------------------------------------------------------------------- MLflow
    def start_tracking(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.experiment_id = mlflow_experiment(EXPERIMENT, str(self.run_dir))
        self.client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        identity = _sha({"config": self.cfg.to_dict(), "stages": self.stages})
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{identity}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if found and found[0].info.status != "FINISHED":
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            for r in self.client.search_runs([self.experiment_id],
                                             filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'"):
                self.stage_runs.setdefault(r.data.tags.get(STAGE_TAG), r)
            print(f"[full] continuing the unfinished pipeline run {self.parent_run_id} of this config", flush=True)
        else:
            from mlflow.entities import Param

            name = f"full-{self.cfg.preset}-{identity[:8]}"
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={PIPELINE_TAG: identity, "hiar.stages": ",".join(self.stages)})
            self.parent_run_id = run.info.run_id
            from hiar.platform.tracking import flatten

            items = [("stages", ",".join(self.stages)), *flatten(self.cfg.to_dict()).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.parent_run_id,
                                      params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
        print(f"[full] MLflow parent run {self.parent_run_id} (experiment {EXPERIMENT}) at {mlflow.get_tracking_uri()}",
              flush=True)

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

    def link_run(self, run_id: str | None) -> None:
        """Hang a job's own MLflow run under the parent (jobs without --parent-run-id)."""
        if run_id and self.client is not None:
            try:
                self.client.set_tag(run_id, "mlflow.parentRunId", self.parent_run_id)
            except Exception:  # noqa: BLE001 - linking is cosmetic
                pass

    # -------------------------------------------------------------------- Ray and children
    def ensure_ray(self) -> None:
        """Jobs join RAY_ADDRESS; without one, start a local cluster here and point every job at it."""
        if self.ray_address:
            return
        import ray

        ctx = ray.init(include_dashboard=False, log_to_driver=False)  # the jobs relay their own workers
        interrupt_on_sigterm()  # ray.init replaced it (hiar.platform.ray_cluster)
        self.ray_address = ctx.address_info["gcs_address"]
        self.own_ray = True
        print(f"[full] no RAY_ADDRESS: started a local Ray cluster at {self.ray_address} for this run", flush=True)

    def child_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # MLflow exports MLFLOW_TRACKING_URI when set_tracking_uri is called; the jobs must not mistake our SQLite
        # store for a server (they pick SQLite under run_dir themselves): pass on only what the user set.
        if self.user_tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.user_tracking_uri
        else:
            env.pop("MLFLOW_TRACKING_URI", None)
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def run_job(self, stage: str, script: str, args: list[str], env: dict | None = None) -> list[str]:
        """Run ``python -m hiar.jobs.<script>`` as a child process, relaying its output; returns its output lines."""
        self.ensure_ray()
        cmd = [sys.executable, "-u", "-m", f"hiar.jobs.{script}", *args]
        print(f"[full] {stage}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        lines: deque[str] = deque(maxlen=2000)
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      env={**self.child_env(), **(env or {})},
                                      preexec_fn=_die_with_parent)
        try:
            for line in self.child.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line.rstrip("\n"))
            rc = self.child.wait()
        finally:
            self.child = None
        if rc != 0:
            tail = "\n".join(list(lines)[-15:])
            raise StageFailed(f"{script} exited with code {rc}; its last lines:\n{tail}")
        return list(lines)

    def stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.child.kill()

    # -------------------------------------------------------------------- shared plans (no compute)
    def teacher_checksum(self) -> str:
        from hiar.io.storage import checksum_dir

        key = ("teacher_checksum", self.teacher)
        if key not in self._cache:
            from hiar.io.bundle import open_model_dir

            try:
                root = open_model_dir(self.teacher, "teacher directory (teacher.path)").root
            except (FileNotFoundError, ValueError) as err:
                raise InputError(f"{err} (the tiny preset can train one: --stages teacher --retrain-teacher)") from None
            self._cache[key] = checksum_dir(root)
        return self._cache[key]

    def dataset_identity(self, kind: str) -> str:
        from hiar.io.storage import dataset_identity
        from hiar.methods.datagen import generation_settings

        return dataset_identity(kind, generation_settings(self.cfg, kind), self.teacher_checksum())

    def resolve_storage(self) -> None:
        """data.storage: as configured, else <run_dir>/data/<both dataset identities> (content-addressed)."""
        if self.storage:
            self.derived["data.storage"] = self.storage
        else:
            key = _sha([self.dataset_identity("ode_pairs"), self.dataset_identity("trajectories")])
            self.storage = str(self.run_dir / "data" / key)
            self.derived["data.storage"] = self.storage
        self.reload()

    def plan_train(self, stage: str) -> dict:
        from hiar.jobs.train import plan_stage

        key = ("plan", stage)
        if key not in self._cache:
            init = None
            if stage == "distill":
                init = str(self.plan_train("ode_init")["output"])
            try:
                plan = plan_stage(self.cfg, stage, self.storage, self.teacher, init)
            except (ValueError, FileNotFoundError) as err:
                raise StageFailed(f"{stage}: {err}") from None
            plan["init"] = init
            self._cache[key] = plan
        return self._cache[key]

    def student(self) -> Path:
        plan = self.plan_train("distill")
        if not plan["done"]:
            raise StageFailed(f"no distilled student at {plan['output']} for this config; run the distill stage "
                              f"(--stages distill)")
        return Path(plan["output"])

    def eval_plan(self):
        """evaluate.py's own plan of this student (checksum of the weights + identity of the settings)."""
        from hiar.jobs.evaluate import EvalInputError, plan_evaluation

        key = ("eval_plan",)
        if key not in self._cache:
            try:
                self._cache[key] = plan_evaluation(self.cfg, str(self.student()), self.overrides)
            except EvalInputError as err:
                raise InputError(f"evaluate: {err}") from None
        return self._cache[key]

    def eval_record_path(self) -> Path:
        plan = self.eval_plan()
        return self.run_dir / "eval" / f"{plan.checksum}-{plan.identity()}.json"

    def register_record_path(self, eval_run_id: str) -> Path:
        where = _sha([self.user_tracking_uri or tracking_uri(str(self.run_dir)), self.cfg.registry.model_name,
                      eval_run_id])
        return self.run_dir / "registry" / f"register-{self.eval_plan().checksum}-{where}.json"

    def data_manifest_hash(self) -> str:
        return _sha([self.dataset_identity("ode_pairs"), self.dataset_identity("trajectories")])

    # -------------------------------------------------------------------- stages
    def stage_teacher(self, o: Outcome) -> None:
        cfg = self.cfg
        if cfg.preset != "tiny" and not self.args.retrain_teacher:
            o.status, o.key = "skipped", f"loaded from {self.teacher} (checked before the first stage)"
            return
        if self.args.retrain_teacher or not _is_bundle(self.teacher):
            from hiar.jobs.pretrain_teacher import training_identity

            p = cfg.pretrain
            out = self.run_dir / "teachers" / f"teacher-{training_identity(cfg)}-{p.max_minutes:g}min-{p.max_steps}"
            if not _is_bundle(out):
                why = "--retrain-teacher" if self.args.retrain_teacher else f"no teacher bundle at {self.teacher}"
                print(f"[full] teacher: training one ({why}) into {out}", flush=True)
                self.run_job("teacher", "pretrain_teacher", [*self.set_args(), "--output", str(out)])
                o.status = "ran"
            self.teacher = str(out)
        card = _read_json(Path(self.teacher) / "card.json") or {}
        cc = (card.get("oracle") or {}).get("caption_consistency")
        o.metrics = {"caption_consistency": cc} if cc is not None else {}
        o.key = f"{Path(self.teacher).name}" + (f" caption_consistency={cc:.3f}" if cc is not None else "")
        o.detail["teacher"] = self.teacher
        if o.status != "ran":
            o.status = "skipped"

    def stage_data(self, o: Outcome, kind: str) -> None:
        from hiar.io.storage import committed_shards, load_manifest

        uri = f"{self.storage.rstrip('/')}/{kind}"
        identity = self.dataset_identity(kind)
        manifest = load_manifest(uri)
        done = (manifest is not None and manifest.get("identity") == identity
                and len(committed_shards(uri)) >= int(manifest.get("num_shards", 1 << 30)))
        rate = None
        if not done:
            # generate.py starts its MLflow run without an experiment id: name it, or the run lands in "Default"
            lines = self.run_job(kind, "generate", [*self.set_args(), "--kind", kind],
                                 env={"MLFLOW_EXPERIMENT_NAME": "hiar-data"})
            manifest = load_manifest(uri) or {}
            for line in lines:
                if line.startswith("[generate] done:") and " samples/s" in line:
                    try:
                        rate = float(line.split(" samples/s")[0].rsplit(" ", 1)[-1])
                    except ValueError:
                        pass
            self.link_run(self.generate_run_id(kind, identity))
            o.status = "ran"
        else:
            o.status = "skipped"
        o.metrics = {"samples": manifest.get("count", 0), **({"samples_per_s": rate} if rate else {})}
        o.key = f"{manifest.get('count')} samples" + (f", {rate:.2f}/s" if rate else "")
        o.detail.update({"output": uri, "identity": identity})

    def generate_run_id(self, kind: str, identity: str) -> str | None:
        try:
            exp = self.client.get_experiment_by_name("hiar-data")
            runs = self.client.search_runs([exp.experiment_id], filter_string=f"params.identity = '{identity}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            return runs[0].info.run_id if runs else None
        except Exception:  # noqa: BLE001
            return None

    def stage_train(self, o: Outcome, stage: str) -> None:
        plan = self.plan_train(stage)
        if not plan["done"]:
            args = [*self.set_args(), "--stage", stage, "--parent-run-id", self.parent_run_id]
            if stage == "distill":
                args += ["--init", plan["init"]]
            self.run_job(stage, "train", args)
            self._cache.pop(("plan", stage), None)
            self._cache.pop(("eval_plan",), None)
            plan = self.plan_train(stage)
            if not plan["done"]:
                raise StageFailed(f"{stage} finished but {plan['output']} holds no result with identity "
                                  f"{plan['identity']}")
            o.status = "ran"
        else:
            o.status = "skipped"
        card = _read_json(Path(plan["output"]) / "card.json") or {}
        run_id = card.get("source_run")
        loss_key = "ode_loss" if stage == "ode_init" else "dmd_loss"
        metrics = {"steps": card.get("steps", 0)}
        try:
            run = self.client.get_run(run_id) if run_id else None
            if run is not None and loss_key in run.data.metrics:
                metrics[loss_key] = run.data.metrics[loss_key]
        except Exception:  # noqa: BLE001 - the run may live on another tracking server
            pass
        o.metrics = metrics
        o.key = f"{metrics['steps']} steps" + (f", {loss_key}={metrics[loss_key]:.4g}" if loss_key in metrics else "")
        o.detail.update({"output": str(plan["output"]), "identity": plan["identity"], "stage_run_id": run_id})

    def stage_evaluate(self, o: Outcome) -> None:
        path = self.eval_record_path()
        result = _read_json(path)
        if not (result and isinstance(result.get("metrics"), dict)):
            tmp = path.with_name(f".{path.name}.partial")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            self.run_job("evaluate", "evaluate", [*self.set_args(), "--model", str(self.student()),
                                                     "--parent-run-id", self.parent_run_id, "--output-json", str(tmp)])
            result = _read_json(tmp)
            if not (result and isinstance(result.get("metrics"), dict)):
                raise StageFailed(f"evaluate.py wrote no metrics to {tmp}")
            os.replace(tmp, path)
            o.status = "ran"
        else:
            o.status = "skipped"
        m = result["metrics"]
        keys = ("hierarchical/drift/score", "block_first/drift/score", "hierarchical/oracle/caption_consistency",
                "hierarchical/dynamics/dynamic_degree")
        o.metrics = {k: float(m[k]) for k in keys if isinstance(m.get(k), (int, float))}
        d = m.get("hierarchical/drift/score")
        o.key = f"drift={_fmt(d)}" if d is not None else "(no hierarchical/drift/score)"
        if "block_first/drift/score" in m:
            o.key += f" (block-first {_fmt(m['block_first/drift/score'])})"
        if "hierarchical/oracle/caption_consistency" in m:
            o.key += f", caption_consistency={_fmt(m['hierarchical/oracle/caption_consistency'])}"
        o.detail.update({"output": str(path), "stage_run_id": result.get("run_id")})

    def evaluation(self) -> dict:
        ev = _read_json(self.eval_record_path())
        if not ev:
            raise StageFailed("no evaluation of this student yet; run the evaluate stage (--stages evaluate)")
        return ev

    def registered_version(self) -> dict | None:
        """The register record of this student + evaluation, if its version still exists in the registry."""
        rec = _read_json(self.register_record_path(self.evaluation().get("run_id") or ""))
        if not rec or rec.get("version") is None:
            return None
        try:
            self.client.get_model_version(rec["name"], str(rec["version"]))
        except Exception:  # noqa: BLE001 - deleted version / another registry
            return None
        return rec

    def stage_register(self, o: Outcome) -> None:
        rec = self.registered_version()
        if rec is None:
            ev = self.evaluation()
            path = self.register_record_path(ev.get("run_id") or "")
            tmp = path.with_name(f".{path.name}.partial")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            args = ["register", *self.set_args(), "--model-dir", str(self.student()),
                    "--data-manifest-hash", self.data_manifest_hash(), "--parent-run-id", self.parent_run_id,
                    "--output-json", str(tmp)]
            if ev.get("run_id"):
                args += ["--eval-run-id", ev["run_id"]]
            self.run_job("register", "promote", args)
            rec = _read_json(tmp) or {}
            if rec.get("version") is None:
                raise StageFailed(f"promote.py register wrote no version to {tmp}: {rec}")
            os.replace(tmp, path)
            o.status = "ran"
        else:
            o.status = "skipped"
        o.metrics = {"version": int(rec["version"])}
        o.key = f"{rec['name']} v{rec['version']}" + (" (already registered)" if rec.get("reused") else "")
        o.detail.update({"version": rec["version"], "checksum": rec.get("checksum"), "stage_run_id": rec.get("run_id")})

    def champion(self) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(self.cfg.registry.model_name, "champion").version)
        except Exception:  # noqa: BLE001 - no model / no alias yet
            return None

    def stage_promote(self, o: Outcome) -> None:
        rec = self.registered_version()
        if rec is None:
            raise StageFailed("this student and evaluation are not registered; run the register stage "
                              "(--stages register)")
        version = int(rec["version"])
        before = self.champion()
        path = self.run_dir / "registry" / f"promote-{rec['name']}-v{version}-vs-v{before}.json"
        decision = _read_json(path)
        if before == version:
            o.status, o.key = "skipped", f"v{version} is the champion"
        elif decision and decision.get("champion") == before:
            o.status = "skipped"
            o.key = f"gate kept v{before} (decided earlier: {decision.get('reason', '')[:150]})"
        else:
            tmp = path.with_name(f".{path.name}.partial")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            self.run_job("promote", "promote", ["promote", *self.set_args(), "--version", str(version),
                                                   "--parent-run-id", self.parent_run_id, "--output-json", str(tmp)])
            decision = _read_json(tmp) or {}
            os.replace(tmp, path)
            o.status = "ran"
            after = self.champion()
            if after == version:
                o.key = f"v{version} is the champion ({decision.get('reason', 'promoted')[:150]})"
            else:
                o.key = f"gate kept v{after}: {decision.get('decision', '?')}: {decision.get('reason', '')[:150]}"
        champ = self.champion()
        o.metrics = {"champion": champ, "promoted": float(champ == version)} if champ is not None else {}
        o.detail.update({"version": version, "champion": champ})

    def stage_deploy(self, o: Outcome) -> None:
        import requests

        s = self.cfg.serve
        name = self.cfg.registry.model_name
        champ = self.champion()
        if champ is None:
            raise StageFailed(f"no champion of {name!r} in the registry to deploy; run register + promote first")
        uri = f"models:/{name}@champion"
        want = f"models:/{name}/{champ}"
        url = f"http://{s.host}:{s.port}"
        serving = None
        try:
            r = requests.get(f"{url}/v1/limits", timeout=5)
            serving = r.json().get("model", {}).get("pinned") if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            pass
        if serving == want and not self.own_ray:
            o.status = "skipped"
        else:
            self.ensure_ray()
            import ray
            from ray import serve

            from hiar.serving.app import build_app

            if not ray.is_initialized():
                ray.init(address=self.ray_address, log_to_driver=False)
                interrupt_on_sigterm()  # ray.init replaced it (hiar.platform.ray_cluster)
            serve.start(http_options={"host": s.host, "port": s.port})
            print(f"[full] deploy: {uri} (= {want}) as Serve app {APP_NAME!r} at {url}", flush=True)
            serve.run(build_app({"preset": self.preset, "overrides": self.overrides, "model_uri": uri}),
                      name=APP_NAME, route_prefix="/")
            try:  # Serve keeps the HTTP options it was first started with on this cluster
                from ray.serve.context import _get_global_client

                http = _get_global_client().http_config
                if (http.host, int(http.port)) != (s.host, int(s.port)):
                    raise StageFailed(f"Serve on this cluster already listens on {http.host}:{http.port}, not "
                                      f"{s.host}:{s.port}: set serve.host/serve.port to match, or `serve shutdown`")
            except StageFailed:
                raise
            except Exception:  # noqa: BLE001 - internal API; the probe below still checks the URL
                pass
            o.status = "ran"
        probe = self.probe(url, o.status == "ran")
        o.metrics = {"champion": champ, **probe}
        o.key = f"{url} serves v{champ}" + (f"; probe MP4 {probe['probe_frames']} frames in "
                                            f"{probe['probe_seconds']:.1f} s" if "probe_frames" in probe else "")
        o.detail.update({"url": url, "model": want})

    def probe(self, url: str, full: bool) -> dict:
        """One POST /v1/videos (stream=false); the MP4 must decode (PyAV) to the promised number of frames."""
        import io

        import av
        import requests

        if not full:
            r = requests.get(f"{url}/healthz", timeout=10)
            if r.status_code != 200:
                raise StageFailed(f"{url}/healthz answered {r.status_code}")
            return {}
        body = {"prompt": self.probe_prompt(), "num_blocks": 2, "seed": 0, "stream": False}
        t0 = time.monotonic()
        r = requests.post(f"{url}/v1/videos", json=body, timeout=600)
        seconds = time.monotonic() - t0
        if r.status_code != 200 or r.headers.get("content-type", "").split(";")[0] != "video/mp4":
            raise StageFailed(f"probe POST {url}/v1/videos answered {r.status_code}: {r.text[:500]}")
        expected = int(r.headers.get("X-HiAR-Num-Frames", "-1"))
        with av.open(io.BytesIO(r.content)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        if frames != expected or frames <= 0:
            raise StageFailed(f"probe MP4 decodes to {frames} frames, the server promised {expected}")
        out = self.run_dir / "deploy" / "probe.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(r.content)
        print(f"[full] deploy: probe OK: {frames} frames ({len(r.content)} bytes MP4, PyAV-decoded) in {seconds:.1f} s "
              f"-> {out}", flush=True)
        return {"probe_frames": frames, "probe_seconds": seconds}

    def probe_prompt(self) -> str:
        """The first held-out prompt (``hiar.io.prompts``; tiny without ``data.prompts``: ``eval_prompts(1)[0]``)."""
        from hiar.io.prompts import prompt_set

        return prompt_set(self.cfg).heldout[0]

    # -------------------------------------------------------------------- driver
    def run(self) -> int:
        handlers = {
            "teacher": self.stage_teacher,
            "ode_pairs": lambda o: self.stage_data(o, "ode_pairs"),
            "trajectories": lambda o: self.stage_data(o, "trajectories"),
            "ode_init": lambda o: self.stage_train(o, "ode_init"),
            "distill": lambda o: self.stage_train(o, "distill"),
            "evaluate": self.stage_evaluate,
            "register": self.stage_register,
            "promote": self.stage_promote,
            "deploy": self.stage_deploy,
        }
        t_all = time.monotonic()
        failed = None
        storage_ready = False
        for stage in STAGES:
            if stage not in self.stages:
                continue
            if stage != "teacher" and not storage_ready:
                self.derived["teacher.path"] = self.teacher
                self.resolve_storage()
                storage_ready = True
            o = Outcome(stage)
            t0 = time.monotonic()
            print(f"[full] ---- {stage}", flush=True)
            try:
                handlers[stage](o)
            except (StageFailed, InputError) as err:
                o.status, o.key = "failed", str(err).splitlines()[0][:200]
                failed = err
            except Exception as err:  # noqa: BLE001 - report every failure in the summary
                o.status, o.key = "failed", f"{type(err).__name__}: {err}"[:200]
                failed = err
            o.seconds = time.monotonic() - t0
            self.outcomes.append(o)
            print(f"[full] {stage}: {o.status} in {o.seconds:.1f} s; {o.key}", flush=True)
            try:
                self.record(o)
            except Exception as err:  # noqa: BLE001
                print(f"[full] warning: could not record {stage} in MLflow: {err}", flush=True)
            if failed is not None:
                break
        total = time.monotonic() - t_all
        text = self.summary(total)
        print(text, flush=True)
        summary = {"parent_run_id": self.parent_run_id, "run_dir": str(self.run_dir), "seconds": total,
                   "ok": failed is None, "stages": [o.__dict__ for o in self.outcomes],
                   "tracking_uri": self.user_tracking_uri or tracking_uri(str(self.run_dir))}
        if self.client is not None:
            try:
                self.client.log_text(self.parent_run_id, text, "summary.txt")
                self.client.log_dict(self.parent_run_id, summary, "summary.json")
                self.client.log_metric(self.parent_run_id, "seconds", total)
                self.client.set_terminated(self.parent_run_id, "FINISHED" if failed is None else "FAILED")
            except Exception as err:  # noqa: BLE001
                print(f"[full] warning: could not finish the MLflow parent run: {err}", flush=True)
        _write_json_atomic(self.run_dir / "pipeline" / "last-summary.json", summary)
        if self.args.summary_json:
            _write_json_atomic(Path(self.args.summary_json), summary)
        if failed is not None:
            print(f"[full] error: stage {self.outcomes[-1].stage} failed: {failed}", file=sys.stderr, flush=True)
            return 1
        if "deploy" in self.stages and self.own_ray:
            self.serve_until_interrupted()
        return 0

    def summary(self, total: float) -> str:
        rows = [("stage", "status", "seconds", "key metric")]
        rows += [(o.stage, o.status, f"{o.seconds:.1f}", o.key) for o in self.outcomes]
        rows.append(("total", "", f"{total:.1f}", ""))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["", "[full] summary"]
        for i, r in enumerate(rows):
            lines.append(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
            if i == 0 or i == len(rows) - 2:
                lines.append(f"  {'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}  {'-' * 10}")
        if self.user_tracking_uri:
            lines.append(f"MLflow UI: {self.user_tracking_uri} (parent run {self.parent_run_id}, experiment "
                         f"{EXPERIMENT})")
        else:
            lines.append(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri(str(self.run_dir))}   "
                         f"(parent run {self.parent_run_id}, experiment {EXPERIMENT})")
        return "\n".join(lines)

    def serve_until_interrupted(self) -> None:
        """Until Ctrl-C or SIGTERM; then Serve and this process's own Ray cluster are taken down (exit 0)."""
        from hiar.serving.app import stop_serving

        s = self.cfg.serve
        print(f"[full] serving at http://{s.host}:{s.port} on this process's own Ray cluster; Ctrl-C or SIGTERM "
              f"stops it (submit to a cluster -- RAY_ADDRESS / ray job submit -- to leave it running)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        print("[full] stopping: Serve and this process's Ray cluster", flush=True)
        stop_serving(APP_NAME, owns_serve=True)


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
        destinations = [str(run_dir)]
        if cfg.data.storage:
            destinations.append(cfg.data.storage)
        if cfg.distill.storage_path:
            destinations.append(cfg.distill.storage_path)
        preflight_models(cfg, stages, args.retrain_teacher)
        if set(stages) - {"deploy"}:
            from hiar.io.prompts import prompt_set

            try:  # a non-tiny preset without a prompt dataset (or a bad one) is an error before anything runs
                prompt_set(cfg)
            except (ValueError, FileNotFoundError) as err:
                raise InputError(str(err)) from None
        check_destinations(destinations)
    except InputError as err:
        parser.error(str(err))

    pipeline = Pipeline(args, cfg, stages, run_dir)
    # every job gets the same absolute local paths, whatever its working directory
    for key, value in (("data.storage", cfg.data.storage), ("distill.storage_path", cfg.distill.storage_path),
                       ("data.prompts", cfg.data.prompts)):
        if value and "://" not in value:
            pipeline.derived[key] = str(Path(value).resolve())
    if cfg.data.storage and "://" not in cfg.data.storage:
        pipeline.storage = pipeline.derived["data.storage"]

    interrupt_on_sigterm()  # `ray job stop`, `kill`: end the child and the MLflow runs cleanly
    print(f"[full] preset {cfg.preset}, stages {', '.join(stages)}; run dir {run_dir}", flush=True)
    try:
        pipeline.start_tracking()
        return pipeline.run()
    except KeyboardInterrupt:
        pipeline.stop_child()
        if pipeline.client is not None and pipeline.parent_run_id:
            try:
                pipeline.client.set_terminated(pipeline.parent_run_id, "KILLED")
            except Exception:  # noqa: BLE001
                pass
        print("[full] interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
