"""What each compute stage does, and when it is skipped (the table in ``hiar.pipeline.full``).

A stage first checks, without compute, whether its output exists for this config (``hiar.pipeline.plans``); if
not, it runs its job (``hiar.pipeline.supervisor``) with ``--output-json <run_dir>/results/<name>.json`` and reads
the typed result the job wrote there (``hiar.jobs.results``): the numbers a stage reports come from that result,
never from the job's log lines or from reading the job's MLflow run back. Evaluation, registration and promotion
keep their result under ``<run_dir>/eval`` and ``<run_dir>/registry`` as the record a rerun's skip check reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hiar.io.storage import portable_path
from hiar.jobs.results import (DatasetResult, EvaluationResult, PromoteResult, RegisterResult, TeacherResult,
                               TrainResult, write_result)
from hiar.pipeline.console import StageConsole
from hiar.pipeline.outcome import Outcome, StageFailed, read_record
from hiar.pipeline.plans import PipelinePlans, is_bundle
from hiar.pipeline.runs import PipelineRuns
from hiar.pipeline.supervisor import JobSupervisor

R = TypeVar("R")
MAIN_LOSS = {"ode_init": "ode_loss", "distill": "dmd_loss"}
EVAL_KEYS = ("hierarchical/drift/score", "block_first/drift/score", "hierarchical/oracle/caption_consistency",
             "hierarchical/dynamics/dynamic_degree")


@dataclass
class StageTools:
    """What every stage works with."""
    plans: PipelinePlans
    jobs: JobSupervisor
    runs: PipelineRuns
    console: StageConsole
    retrain_teacher: bool = False


def run_for_result(t: StageTools, stage: str, job: str, args: list[str], kind: type[R], name: str,
                   env: dict | None = None) -> R:
    """Run the stage's job with ``--output-json <run_dir>/results/<name>.json`` and return the ``kind`` result."""
    return t.jobs.run_for_result(stage, job, args, kind, t.plans.result_path(name), env)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _contrast(m: dict) -> str:
    """``; difference ± SE, separated or not`` of the two modes' drift scores, when the evaluation has it."""
    from hiar.eval.summary import contrast

    c = contrast(m)
    if c is None:
        return ""
    d, se, _, separated = c
    return f"; difference {d:+.2g} ± {se:.2g}, {'separated' if separated else 'not separated'}"


def _version(value) -> int | None:
    return None if value is None else int(value)


def _card(bundle: str | Path) -> dict:
    try:
        return json.loads((Path(bundle) / "card.json").read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------- teacher
def teacher(t: StageTools, o: Outcome) -> None:
    plans = t.plans
    if plans.cfg.preset != "tiny" and not t.retrain_teacher:
        o.status, o.key = "skipped", f"loaded from {plans.teacher} (checked before the first stage)"
        return
    result = None
    if t.retrain_teacher or not is_bundle(plans.teacher):
        out = plans.teacher_training_output()
        if not is_bundle(out):
            why = "--retrain-teacher" if t.retrain_teacher else f"no teacher bundle at {plans.teacher}"
            t.console.say(f"[full] teacher: training one ({why}) into {out}")
            result = run_for_result(t, "teacher", "pretrain_teacher", [*plans.set_args(), "--output", str(out)],
                                    TeacherResult, f"teacher-{out.name}")
            t.runs.link(result.run_id)
        plans.teacher = str(out)
    if result is not None:
        o.status, cc = "ran", result.caption_consistency
        o.detail["stage_run_id"] = result.run_id
    else:  # an existing bundle: its card holds the score it was trained to
        o.status, cc = "skipped", (_card(plans.teacher).get("oracle") or {}).get("caption_consistency")
    o.metrics = {"caption_consistency": cc} if cc is not None else {}
    o.key = Path(plans.teacher).name + (f" caption_consistency={cc:.3f}" if cc is not None else "")
    o.detail["teacher"] = portable_path(plans.teacher)


# ---------------------------------------------------------------------------------------------------- data
def dataset(t: StageTools, o: Outcome, kind: str) -> None:
    """Skipped when the manifest has this config's dataset identity and the samples the config asks for are
    committed (whole shards: the dataset may hold more, made for a larger count)."""
    from hiar.io.storage import ShardPlan, complete_shards, load_manifest
    from hiar.methods.datagen import kind_count

    uri, identity = t.plans.dataset_uri(kind), t.plans.dataset_identity(kind)
    manifest = load_manifest(uri)
    wanted = ShardPlan(kind_count(t.plans.cfg, kind), t.plans.cfg.data.shard_size)
    done = (manifest is not None and manifest.get("identity") == identity
            and len(complete_shards(uri, wanted)) == wanted.num_shards)
    rate = None
    if done:
        o.status, count = "skipped", wanted.count
    else:
        # generate starts its MLflow run without an experiment id: name it, or the run lands in "Default"
        result = run_for_result(t, kind, "generate", [*t.plans.set_args(), "--kind", kind], DatasetResult,
                                f"{kind}-{identity}", env={"MLFLOW_EXPERIMENT_NAME": "hiar-data"})
        if result.identity != identity:
            raise StageFailed(f"{kind}: generate made dataset {result.identity} at {result.uri}, but this config's "
                              f"dataset is {identity}")
        t.runs.link(result.run_id)
        o.status, count, rate = "ran", result.count, result.samples_per_s
        o.detail["stage_run_id"] = result.run_id
    o.metrics = {"samples": count, **({"samples_per_s": rate} if rate else {})}
    o.key = f"{count} samples" + (f", {rate:.2f}/s" if rate else "")
    o.detail.update({"output": uri, "identity": identity})


# ---------------------------------------------------------------------------------------------------- training
def training(t: StageTools, o: Outcome, stage: str) -> None:
    """Skipped when the stage's output card has the identity ``train.plan_stage`` computes (config + inputs)."""
    plans = t.plans
    plan = plans.train(stage)
    name = f"{stage}-{plan['identity']}"
    if not plan["done"]:
        args = [*plans.set_args(), "--stage", stage, "--parent-run-id", t.runs.parent_run_id]
        if stage == "distill":
            args += ["--init", plan["init"]]
        result = run_for_result(t, stage, "train", args, TrainResult, name)
        plans.forget_training(stage)
        plan = plans.train(stage)
        if not plan["done"]:
            raise StageFailed(f"{stage} finished but {plan['output']} holds no result with identity "
                              f"{plan['identity']}")
        o.status = "ran"
    else:  # the result of the run that trained it, when it ran under this run_dir
        result = read_record(plans.result_path(name), TrainResult)
        o.status = "skipped"
    card = _card(plan["output"])
    metrics = {"steps": result.steps if result else card.get("steps", 0)}
    if result:
        metrics.update({k: float(v) for k, v in result.losses.items() if isinstance(v, (int, float))})
    loss = MAIN_LOSS[stage]
    o.metrics = metrics
    o.key = f"{metrics['steps']} steps" + (f", {loss}={metrics[loss]:.4g}" if loss in metrics else "")
    o.detail.update({"output": str(plan["output"]), "identity": plan["identity"],
                     "stage_run_id": result.run_id if result else card.get("source_run")})


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate(t: StageTools, o: Outcome) -> None:
    """Skipped when ``<run_dir>/eval/<student checksum>-<evaluation settings>.json`` holds its result."""
    plans = t.plans
    path = plans.evaluation_record()
    result = read_record(path, EvaluationResult)
    if result is None:
        result = run_for_result(t, "evaluate", "evaluate",
                                [*plans.set_args(), "--model", str(plans.student()), "--parent-run-id",
                                 t.runs.parent_run_id], EvaluationResult, "evaluate")
        write_result(path, result)
        o.status = "ran"
    else:
        o.status = "skipped"
    m = result.metrics
    o.metrics = {k: float(m[k]) for k in EVAL_KEYS if isinstance(m.get(k), (int, float))}
    drift = m.get("hierarchical/drift/score")
    o.key = f"drift={_fmt(drift)}" if drift is not None else "(no hierarchical/drift/score)"
    if "block_first/drift/score" in m:
        o.key += f" (block-first {_fmt(m['block_first/drift/score'])}{_contrast(m)})"
    if "hierarchical/oracle/caption_consistency" in m:
        o.key += f", caption_consistency={_fmt(m['hierarchical/oracle/caption_consistency'])}"
    o.detail.update({"output": str(path), "stage_run_id": result.run_id})


def evaluation(t: StageTools) -> EvaluationResult:
    result = read_record(t.plans.evaluation_record(), EvaluationResult)
    if result is None:
        raise StageFailed("no evaluation of this student yet; run the evaluate stage (--stages evaluate)")
    return result


# ---------------------------------------------------------------------------------------------------- registry
def registered_version(t: StageTools) -> RegisterResult | None:
    """The register record of this student + evaluation, if its version still exists in the registry."""
    record = read_record(t.plans.register_record(evaluation(t).run_id), RegisterResult)
    if record is None or not t.runs.version_exists(record.name, record.version):
        return None
    return record


def register(t: StageTools, o: Outcome) -> None:
    plans = t.plans
    record = registered_version(t)
    if record is None:
        ev = evaluation(t)
        args = ["register", *plans.set_args(), "--model-dir", str(plans.student()),
                "--data-manifest-hash", plans.data_manifest_hash(), "--parent-run-id", t.runs.parent_run_id,
                "--eval-run-id", ev.run_id]
        record = run_for_result(t, "register", "promote", args, RegisterResult, "register")
        write_result(plans.register_record(ev.run_id), record)
        o.status = "ran"
    else:
        o.status = "skipped"
    o.metrics = {"version": int(record.version)}
    o.key = f"{record.name} v{record.version}" + (" (already registered)" if record.reused else "")
    o.detail.update({"version": record.version, "checksum": record.checksum, "stage_run_id": record.run_id})


def promote(t: StageTools, o: Outcome) -> None:
    """Skipped when the registered version is the champion, or the gate already decided it against the current
    champion."""
    plans, runs = t.plans, t.runs
    record = registered_version(t)
    if record is None:
        raise StageFailed("this student and evaluation are not registered; run the register stage "
                          "(--stages register)")
    name, version = record.name, int(record.version)
    before = runs.champion(name)
    path = plans.promote_record(name, version, before)
    decided = read_record(path, PromoteResult)
    if before == version:
        o.status, o.key = "skipped", f"v{version} is the champion"
    elif decided is not None and _version(decided.champion) == before:
        o.status, o.key = "skipped", f"gate kept v{before} (decided earlier: {decided.reason[:150]})"
    else:
        decision = run_for_result(t, "promote", "promote",
                                  ["promote", *plans.set_args(), "--version", str(version), "--parent-run-id",
                                   runs.parent_run_id], PromoteResult, "promote")
        write_result(path, decision)
        o.status = "ran"
        after = runs.champion(name)
        if after == version:
            o.key = f"v{version} is the champion ({(decision.reason or 'promoted')[:150]})"
        else:
            o.key = f"gate kept v{after}: {decision.decision}: {decision.reason[:150]}"
    champion = runs.champion(name)
    o.metrics = {"champion": champion, "promoted": float(champion == version)} if champion is not None else {}
    o.detail.update({"version": version, "champion": champion})
