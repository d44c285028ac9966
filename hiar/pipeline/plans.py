"""The configuration every job of a pipeline run gets, and what each stage's output is and whether it exists --
computed here, without compute, so that "skipped" is decided before any job starts.

Each job is run with the same preset and the user's ``--set`` overrides, plus the values the pipeline derives
(``run_dir``, the absolute ``teacher.path`` and ``data.storage``). The checks call the planning functions the jobs
use themselves (``train.plan_stage``, ``pretrain_teacher.training_identity``, ``hiar.platform.evaluation_plan``),
so the pipeline and the jobs cannot disagree on an identity.
"""

from __future__ import annotations

from pathlib import Path

from hiar.identity import identity
from hiar.io.storage import portable_path, resolve_path
from hiar.pipeline.outcome import InputError, StageFailed
from hiar.platform.tracking import tracking_uri


def is_bundle(path: str | Path) -> bool:
    """A model directory of the project's own layout with its card (a trained tiny teacher)."""
    from hiar.io.bundle import CARD_FILE, open_model_dir

    try:
        return open_model_dir(path).layout == "bundle" and (Path(path) / CARD_FILE).is_file()
    except (FileNotFoundError, ValueError):
        return False


class PipelinePlans:
    def __init__(self, preset: str, user_overrides: list[str], cfg, run_dir: Path, user_tracking_uri: str | None):
        self.preset, self.user_overrides, self.cfg, self.run_dir = preset, list(user_overrides), cfg, run_dir
        self.user_tracking_uri = user_tracking_uri
        self.derived: dict[str, str] = {"run_dir": str(run_dir)}
        self.teacher = resolve_path(cfg.teacher.path) if cfg.teacher.path else ""
        self.storage = cfg.data.storage or ""
        # every job gets the same absolute local paths, whatever its working directory
        for key, value in (("data.storage", cfg.data.storage), ("distill.storage_path", cfg.distill.storage_path),
                           ("data.prompts", cfg.data.prompts)):
            if value and "://" not in value:
                self.derived[key] = str(Path(value).resolve())
        if cfg.data.storage and "://" not in cfg.data.storage:
            self.storage = self.derived["data.storage"]
        self._cache: dict = {}

    # ------------------------------------------------------------------ the config seen by every job
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

    def fix_teacher_and_storage(self) -> None:
        """After the teacher stage: every later job gets this teacher and data.storage (by default
        ``<run_dir>/data/<both dataset identities>``, content-addressed, so a config change writes new datasets next
        to the old ones instead of clashing with them)."""
        # as identities write it: the shipped teacher relative to the package (every job resolves it beside its own
        # hiar), so records name hiar/assets/tiny-teacher, not the Ray session's copy of the checkout that the
        # pipeline runs from under `ray job submit`
        self.derived["teacher.path"] = portable_path(self.teacher)
        if not self.storage:
            self.storage = str(self.run_dir / "data" / self.data_manifest_hash())
        self.derived["data.storage"] = self.storage
        self.reload()

    # ------------------------------------------------------------------ teacher and data
    def teacher_training_output(self) -> Path:
        """Where ``--retrain-teacher`` (or a tiny run without a teacher) trains one: content-addressed by what
        determines its weights and its budget."""
        from hiar.jobs.pretrain_teacher import training_identity

        p = self.cfg.pretrain
        return self.run_dir / "teachers" / f"teacher-{training_identity(self.cfg)}-{p.max_minutes:g}min-{p.max_steps}"

    def teacher_checksum(self) -> str:
        key = ("teacher_checksum", self.teacher)
        if key not in self._cache:
            from hiar.io.bundle import open_model_dir
            from hiar.io.checksums import checksum_dir

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

    def data_manifest_hash(self) -> str:
        return identity([self.dataset_identity("ode_pairs"), self.dataset_identity("trajectories")])

    def dataset_uri(self, kind: str) -> str:
        return f"{self.storage.rstrip('/')}/{kind}"

    # ------------------------------------------------------------------ training
    def train(self, stage: str) -> dict:
        """``train.plan_stage``: the stage's identity, output directory and whether it holds that identity."""
        from hiar.jobs.train import plan_stage

        key = ("plan", stage)
        if key not in self._cache:
            init = str(self.train("ode_init")["output"]) if stage == "distill" else None
            try:
                plan = plan_stage(self.cfg, stage, self.storage, self.teacher, init)
            except (ValueError, FileNotFoundError) as err:
                raise StageFailed(f"{stage}: {err}") from None
            plan["init"] = init
            self._cache[key] = plan
        return self._cache[key]

    def forget_training(self, stage: str) -> None:
        """After a training job: its plan (and the evaluation plan of the student) are computed afresh."""
        self._cache.pop(("plan", stage), None)
        self._cache.pop(("eval_plan",), None)

    def student(self) -> Path:
        plan = self.train("distill")
        if not plan["done"]:
            raise StageFailed(f"no distilled student at {plan['output']} for this config; run the distill stage "
                              f"(--stages distill)")
        return Path(plan["output"])

    # ------------------------------------------------------------------ evaluation and the registry
    def evaluation_plan(self):
        """evaluate.py's own plan of this student (checksum of the weights + identity of the settings)."""
        from hiar.platform.evaluation_plan import EvalInputError, plan_evaluation

        key = ("eval_plan",)
        if key not in self._cache:
            try:
                self._cache[key] = plan_evaluation(self.cfg, str(self.student()), self.overrides)
            except EvalInputError as err:
                raise InputError(f"evaluate: {err}") from None
        return self._cache[key]

    def evaluation_record(self) -> Path:
        plan = self.evaluation_plan()
        return self.run_dir / "eval" / f"{plan.checksum}-{plan.identity()}.json"

    def register_record(self, eval_run_id: str) -> Path:
        """Per student, tracking store, registered model and evaluation: a new evaluation registers again (the
        version is reused, its eval_run_id tag follows)."""
        where = identity([self.user_tracking_uri or tracking_uri(str(self.run_dir)), self.cfg.registry.model_name,
                          eval_run_id])
        return self.run_dir / "registry" / f"register-{self.evaluation_plan().checksum}-{where}.json"

    def promote_record(self, name: str, version: int, champion_before: int | None) -> Path:
        return self.run_dir / "registry" / f"promote-{name}-v{version}-vs-v{champion_before}.json"

    def result_path(self, name: str) -> Path:
        """Where a job writes its typed result (``--output-json``)."""
        return self.run_dir / "results" / f"{name}.json"
