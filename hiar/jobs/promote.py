"""MLflow registry job: register a generator, promote it past a gate, roll back, show the state.

    python -m hiar.jobs.promote register --model-dir runs/students/distill-abc123 [--eval-run-id ID]
                                         [--data-manifest-hash H]
    python -m hiar.jobs.promote promote [--version N]        # default: the version under alias `challenger`
    python -m hiar.jobs.promote rollback --reason "flicker in long rollouts"
    python -m hiar.jobs.promote status

Registered model ``registry.model_name`` (default ``hiar-student``); aliases, never the deprecated stages.

* ``register`` logs the bundle as a pyfunc model (``hiar.platform.registry.log_bundle``) in a run of experiment
  ``hiar-registry`` and registers it as a new version *with its tags in the same call*: ``checksum`` (content of
  the bundle, ``hiar.io.checksums.checksum_dir``), ``config_sha`` (bytes of its ``hiar_config.yaml``), ``config_hash``
  (``HiarConfig.config_hash()`` of that file), ``data_manifest_hash``, ``eval_run_id``, ``source_dir``.  The alias
  ``challenger`` moves to it.  A bundle whose checksum and config are already registered is not registered again:
  that version is reused (a rerun changes nothing in the registry; a new ``--eval-run-id`` is added as a tag).
* ``promote`` takes the challenger (or ``--version``).  No champion yet: it becomes champion ("first model").
  Already champion: nothing to do.  Otherwise both versions are evaluated in-process (``hiar.platform.evaluation``,
  what ``hiar.jobs.evaluate`` runs) on the same held-out prompts, seeds and horizon (a finished evaluation of the
  same weights and settings is reused), and the gate (``hiar.eval.gate.decide``: the checks ``registry.gate_metrics`` names
  -- Drift Score and dynamic degree always, the tiny oracle's caption consistency, CLIP text-video alignment, a
  learned scorer's drift -- on the ``registry.gate_rollout`` mode) decides on the two evaluations' per-sample
  values (``per_sample.json``) paired by (prompt, seed): no check worse than its tolerated degradation
  (``registry.max_*``) and at least one better by more than ``registry.gate_margin_se`` standard errors of the
  paired difference (unless ``registry.gate_require_improvement`` is false); a check whose scorer was skipped in
  both evaluations is reported as skipped, not gated.  ``champion`` moves only when it passes.  Every decision,
  pass or fail, is recorded: model-version tags ``promotion.decision`` / ``promotion.reason`` (each check's
  numbers in words) / ``promotion.metrics`` (JSON: both sides' gate metrics, the thresholds, each check with its
  mean paired difference, standard error, n, threshold and verdict, the evaluation run ids) /
  ``promotion.against`` / ``promotion.time``, the registered-model tag ``promotion.last``, a line appended to the
  registered model's description, and a run in ``hiar-registry`` with both sides' metrics, each check's
  ``gate/<check>/diff|se|n|threshold|passed|improved`` and ``decision.json``.  The same rejection is not
  re-recorded on a rerun (same champion, thresholds and evaluation settings); a version that was rolled back is
  not promoted again without ``--force``.
* ``rollback`` moves ``champion`` to the previous holder (registered-model tag ``champion.history``, a JSON list
  of the versions that held it, oldest first) and records the reason on both versions
  (``champion.demoted`` / ``champion.restored``), in ``rollback.last`` and in the description.

Exit codes: 0 when the command did what it reports (a rejection is a decision: 0), 2 for bad input found before
any change (``error: ...`` on stderr: no such model, version or alias, no previous champion), 1 otherwise.
MLflow: ``MLFLOW_TRACKING_URI`` (a server) or SQLite under ``run_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hiar.identity import identity as content_identity
from hiar.io.storage import resolve_path, write_local_json
from hiar.jobs.results import PromoteResult, RegisterResult, write_result
from hiar.platform.evaluation import load_sample_values, run_evaluation, skip_reasons
from hiar.platform.evaluation_plan import EvalInputError, plan_evaluation
from hiar.platform.registry import (CHALLENGER, CHAMPION, HISTORY_TAG, NotRegistered, aliases, append_description,
                                    bundle_config_hash, champion_history, config_file_sha, find_version_by_checksum,
                                    get_registered_model, get_version, move_champion, now_utc, record_decision,
                                    registry_client, set_version_tags, version_exists)
from hiar.platform.tracking import experiment_id, new_run, resumed_run, setup_tracking

EXPERIMENT = "hiar-registry"


class UsageError(Exception):
    """Bad input found before any registry change (exit code 2)."""


def _print(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------- register
def register(cfg, model_dir: str, eval_run_id: str | None = None, data_manifest_hash: str | None = None,
             parent_run_id: str | None = None, log=_print) -> dict:
    import mlflow

    from hiar.io.bundle import open_model_dir
    from hiar.io.checksums import checksum_dir
    from hiar.platform.registry import log_bundle

    path = Path(resolve_path(model_dir)).resolve()
    try:
        open_model_dir(path, "model bundle")
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    name = cfg.registry.model_name
    checksum = checksum_dir(path)
    config_sha = config_file_sha(path)
    try:
        config_hash = bundle_config_hash(path)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{str(path)!r}: its hiar_config.yaml is not a valid config: {err}") from None
    tags = {"checksum": checksum, "config_sha": config_sha, "config_hash": config_hash,
            "source_dir": str(path),
            "data_manifest_hash": data_manifest_hash or "", "eval_run_id": eval_run_id or ""}
    tags = {k: v for k, v in tags.items() if v}
    client = registry_client()
    existing = find_version_by_checksum(client, name, checksum, config_sha)
    run_id = None
    if existing is not None:
        version = str(existing.version)
        # only what the caller adds (e.g. an eval run id it did not have before) is written; nothing else changes
        set_version_tags(client, name, version, {k: v for k, v in tags.items() if k != "source_dir"}, existing.tags)
        log(f"[promote] {str(path)!r} is already registered as {name} version {version} (checksum {checksum}); "
            f"no new version")
        run_id = existing.run_id
    else:
        run = new_run(EXPERIMENT, f"register-{path.name}", parent_run_id,
                      {"hiar.checksum": checksum, "hiar.source_dir": str(path)})
        with resumed_run(run.info.run_id):
            mlflow.log_params({"model_dir": str(path), "checksum": checksum, "registered_model": name,
                               "config_hash": tags.get("config_hash", ""),
                               "data_manifest_hash": data_manifest_hash or "", "eval_run_id": eval_run_id or ""})
            info = log_bundle(path)
            # registered with its tags in one call: a crash cannot leave a version without its checksum
            mv = mlflow.register_model(info.model_uri, name, tags=tags)
        version, run_id = str(mv.version), run.info.run_id
        append_description(client, name, f"registered version {version} from {path} (checksum {checksum}, "
                                          f"config {tags.get('config_hash', '-')})")
        log(f"[promote] registered {name} version {version} from {path} (checksum {checksum}, run {run_id})")
    rm = client.get_registered_model(name)
    if aliases(rm).get(CHALLENGER) != version:
        previous = aliases(rm).get(CHALLENGER)
        client.set_registered_model_alias(name, CHALLENGER, version)
        append_description(client, name, f"alias {CHALLENGER}: v{previous or '-'} -> v{version}")
    log(f"[promote] {name}@{CHALLENGER} = version {version}")
    return {"name": name, "version": version, "checksum": checksum, "reused": existing is not None,
            "run_id": run_id, "tags": tags, "model_uri": f"models:/{name}/{version}"}


# ---------------------------------------------------------------------------------------------- promote
def _gate_settings(cfg) -> dict:
    r = cfg.registry
    return {"checks": list(r.gate_metrics), "max_drift_increase": r.max_drift_increase,
            "max_dynamics_drop": r.max_dynamics_drop, "max_quality_drop": r.max_quality_drop,
            "max_alignment_drop": r.max_alignment_drop, "max_degradation_increase": r.max_degradation_increase,
            "gate_margin_se": r.gate_margin_se, "require_improvement": r.gate_require_improvement,
            "rollout": r.gate_rollout}


def promote(cfg, version: str | None = None, overrides=(), parent_run_id: str | None = None, force: bool = False,
            log=_print) -> dict:
    import mlflow

    from hiar.eval.gate import decide, gate_metric_keys

    name = cfg.registry.model_name
    client = registry_client()
    rm = get_registered_model(client, name)
    if version is None:
        version = aliases(rm).get(CHALLENGER)
        if version is None:
            raise UsageError(f"{name} has no {CHALLENGER!r} alias; register a model first or pass --version")
    version = str(version)
    mv = get_version(client, name, version)
    champion = aliases(rm).get(CHAMPION)
    out = {"name": name, "version": version, "champion_before": champion}
    if champion == version:
        log(f"[promote] {name} version {version} is already champion: nothing to do")
        return {**out, "decision": "noop", "reason": "already champion", "champion": champion}
    if champion is None:
        reason = "first model: there was no champion"
        history = move_champion(client, name, version, None)
        record_decision(client, name, version, "promoted", reason, {"gate": "not applied (first model)"}, None)
        log(f"[promote] PROMOTED {name} version {version} to {CHAMPION}: {reason}")
        return {**out, "decision": "promoted", "reason": reason, "champion": version, "history": history}
    if mv.tags.get("champion.demoted") and not force:
        why = json.loads(mv.tags["champion.demoted"]).get("reason", "")
        reason = f"version {version} was rolled back earlier ({why}); pass --force to evaluate it again"
        log(f"[promote] NOT PROMOTED: {reason}")
        return {**out, "decision": "skipped", "reason": reason, "champion": champion}

    gate = _gate_settings(cfg)
    if gate["rollout"] not in cfg.eval.rollouts:
        raise UsageError(f"registry.gate_rollout={gate['rollout']!r} is not evaluated (eval.rollouts = "
                         f"{cfg.eval.rollouts})")
    try:
        plans = {"challenger": plan_evaluation(cfg, f"models:/{name}/{version}", overrides),
                 "champion": plan_evaluation(cfg, f"models:/{name}/{champion}", overrides)}
    except EvalInputError as err:
        raise UsageError(str(err)) from None
    identity = plans["challenger"].identity()
    key = content_identity({"gate": gate, "identity": identity, "against": champion,
                            "checksums": [plans["challenger"].checksum, plans["champion"].checksum]})
    if mv.tags.get("promotion.key") == key and mv.tags.get("promotion.decision") == "rejected" and not force:
        reason = mv.tags.get("promotion.reason", "")
        log(f"[promote] NOT PROMOTED (already decided against champion v{champion} with the same gate and "
            f"evaluation; nothing recorded again): {reason}")
        return {**out, "decision": "rejected", "reason": reason, "champion": champion, "recorded": False}

    run = new_run(EXPERIMENT, f"promote-v{version}-vs-v{champion}", parent_run_id,
                  {"hiar.challenger_version": version, "hiar.champion_version": champion})
    results = {}
    try:
        for side in ("challenger", "champion"):
            log(f"[promote] evaluating the {side}: {name} version {plans[side].model_version}")
            results[side] = run_evaluation(plans[side], parent_run_id=run.info.run_id,
                                           run_name=f"eval-{name}-v{plans[side].model_version}", reuse=True, log=log,
                                           progress_task=f"evaluate {side}")
    except Exception as err:  # noqa: BLE001 - Ray / MLflow errors: no decision, nothing moved
        client.set_terminated(run.info.run_id, "FAILED")
        raise RuntimeError(f"evaluating the {side} (version {plans[side].model_version}) failed, nothing was "
                           f"decided: {type(err).__name__}: {err}") from err
    keys = gate_metric_keys(gate["rollout"], gate["checks"])
    try:
        tables = {s: load_sample_values(results[s]["run_id"]) for s in results}
        result = decide(tables["challenger"], tables["champion"], **gate,
                        skip_reasons=skip_reasons([results[s]["run_id"] for s in results], gate["rollout"]))
    except (ValueError, FileNotFoundError) as err:
        client.set_terminated(run.info.run_id, "FAILED")
        raise RuntimeError(f"cannot compare the evaluations: {err}") from None
    decision = "promoted" if result.passed else "rejected"
    details = {
        "challenger": {k: results["challenger"]["metrics"].get(m) for k, m in keys.items()},
        "champion": {k: results["champion"]["metrics"].get(m) for k, m in keys.items()},
        "thresholds": gate, "checks": result.to_dict()["checks"], "skipped": result.skipped,
        "eval_runs": {s: results[s]["run_id"] for s in results}, "eval_identity": identity,
    }
    with resumed_run(run.info.run_id):
        mlflow.log_params({"challenger_version": version, "champion_version": champion, **gate})
        for side in ("challenger", "champion"):
            mlflow.log_metrics({f"{side}/{k}": float(v) for k, v in details[side].items() if v is not None})
        mlflow.log_metrics({f"gate/{c.name}/{f}": float(getattr(c, f)) for c in result.checks
                            for f in ("diff", "se", "n", "threshold", "passed", "improved")})
        mlflow.set_tags({"promotion.decision": decision, "promotion.reason": result.reason[:5000]})
        mlflow.log_dict(details, "decision.json")
    history = None
    if result.passed:
        history = move_champion(client, name, version, champion)
        if mv.tags.get("champion.demoted"):
            client.delete_model_version_tag(name, version, "champion.demoted")
    record_decision(client, name, version, decision, result.reason, details, champion, key, run.info.run_id)
    log(f"[promote] {'PROMOTED' if result.passed else 'NOT PROMOTED'} {name} version {version} "
        f"(champion {'is now v' + version if result.passed else 'stays v' + champion}): {result.reason}")
    return {**out, "decision": decision, "reason": result.reason, "champion": version if result.passed else champion,
            "details": details, "run_id": run.info.run_id, "history": history}


# ---------------------------------------------------------------------------------------------- rollback
def rollback(cfg, reason: str = "", log=_print) -> dict:
    from hiar.eval.gate import rollback_target

    name = cfg.registry.model_name
    client = registry_client()
    rm = get_registered_model(client, name)
    current = aliases(rm).get(CHAMPION)
    if current is None:
        raise UsageError(f"{name} has no {CHAMPION!r}: nothing to roll back")
    try:
        previous, history = rollback_target(champion_history(rm), current, lambda v: version_exists(client, name, v))
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None
    reason = reason or "manual rollback (no reason given)"
    now = now_utc()
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, current, "champion.demoted",
                                 json.dumps({"reason": reason, "time": now, "restored": previous}))
    client.set_model_version_tag(name, previous, "champion.restored",
                                 json.dumps({"reason": reason, "time": now, "from": current}))
    client.set_registered_model_tag(name, "rollback.last", json.dumps(
        {"from": current, "to": previous, "reason": reason, "time": now}))
    append_description(client, name, f"rollback: {CHAMPION} v{current} -> v{previous}: {reason}")
    log(f"[promote] ROLLED BACK {name}@{CHAMPION}: version {current} -> {previous} ({reason})")
    return {"name": name, "from": current, "champion": previous, "reason": reason, "history": history}


# ---------------------------------------------------------------------------------------------- status
def status(cfg, log=_print) -> dict:
    import mlflow

    name = cfg.registry.model_name
    client = registry_client()
    rm = get_registered_model(client, name)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda mv: int(mv.version))
    by_version = {}
    for a, v in aliases(rm).items():
        by_version.setdefault(str(v), []).append(a)
    lines = [f"registered model {name} at {mlflow.get_tracking_uri()}: {len(versions)} version(s)",
             "aliases: " + (", ".join(f"{a} -> v{v}" for a, v in sorted(aliases(rm).items())) or "none"),
             f"champion history: {champion_history(rm) or '-'}", "",
             f"{'version':>7}  {'aliases':<22} {'checksum':<17} {'decision':<9} reason"]
    rows = []
    for mv in versions:
        t = mv.tags
        rows.append({"version": str(mv.version), "aliases": by_version.get(str(mv.version), []),
                     "checksum": t.get("checksum", ""), "config_hash": t.get("config_hash", ""),
                     "decision": t.get("promotion.decision", ""), "reason": t.get("promotion.reason", ""),
                     "against": t.get("promotion.against", ""), "demoted": t.get("champion.demoted", "")})
        r = rows[-1]
        note = r["reason"][:100] + ("..." if len(r["reason"]) > 100 else "")
        if r["demoted"]:
            note += f" [rolled back: {json.loads(r['demoted']).get('reason', '')}]"
        lines.append(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<22} {r['checksum'] or '-':<17} "
                     f"{r['decision'] or '-':<9} {note}")
    log_lines = (rm.description or "").splitlines()[1:]
    lines += ["", "last registry moves:"] + [f"  {ln}" for ln in log_lines[-8:]]
    log("\n".join(lines))
    return {"name": name, "aliases": aliases(rm), "history": champion_history(rm), "versions": rows,
            "last": json.loads(rm.tags["promotion.last"]) if "promotion.last" in rm.tags else None}


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> tuple[argparse.ArgumentParser, dict]:
    from hiar.config import add_config_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("register", help="log a bundle and register it as a version with alias challenger")
    p.add_argument("--model-dir", required=True, help="a model bundle directory (hiar.io.bundle layout)")
    p.add_argument("--eval-run-id", default=None)
    p.add_argument("--data-manifest-hash", default=None)
    p.add_argument("--parent-run-id", default=None)
    p = sub.add_parser("promote", help="gate the challenger against the champion; move champion if it passes")
    p.add_argument("--version", default=None, help="the version to promote (default: the challenger)")
    p.add_argument("--parent-run-id", default=None)
    p.add_argument("--force", action="store_true", help="re-decide even a rolled-back or already rejected version")
    p = sub.add_parser("rollback", help="move champion back to its previous holder")
    p.add_argument("--reason", default="")
    sub.add_parser("status", help="aliases, versions, last decisions")
    for p in sub.choices.values():
        add_config_args(p)
        p.add_argument("--output-json", default=None,
                       help="write the command's result here: a RegisterResult / PromoteResult (hiar.jobs.results) "
                            "for register / promote, plain JSON for rollback and status")
    return parser, dict(sub.choices)


def promote_result(out: dict) -> PromoteResult:
    """:func:`promote`'s dict as the typed result; what has no field of its own (the promote run id, the champion
    history, whether a repeated rejection was recorded) goes into ``details``."""
    fields = ("name", "version", "decision", "reason", "champion_before", "champion")
    extra = {k: v for k, v in out.items() if k not in fields and k != "details" and v is not None}
    return PromoteResult(**{k: out.get(k) for k in fields},
                         details={**out.get("details", {}), **extra})


def main(argv=None) -> int:
    from mlflow.exceptions import MlflowException

    from hiar.config import config_from_args

    parser, subparsers = _parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args, subparsers[args.command])
    try:
        setup_tracking(cfg.run_dir)
        experiment_id(EXPERIMENT)
        if getattr(args, "parent_run_id", None):
            from mlflow import MlflowClient

            try:
                MlflowClient().get_run(args.parent_run_id)
            except MlflowException as err:
                raise UsageError(f"--parent-run-id {args.parent_run_id}: {err.message}") from None
        if args.command == "register":
            registered = register(cfg, args.model_dir, args.eval_run_id, args.data_manifest_hash, args.parent_run_id)
            print(registered["version"])
            write_result(args.output_json, RegisterResult(**registered))
        elif args.command == "promote":
            write_result(args.output_json,
                         promote_result(promote(cfg, args.version, args.overrides, args.parent_run_id, args.force)))
        else:  # rollback and status answer in plain JSON: they hand nothing to another stage
            state = rollback(cfg, args.reason) if args.command == "rollback" else status(cfg)
            if args.output_json:
                write_local_json(args.output_json, state)
    except (UsageError, NotRegistered) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MlflowException) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
