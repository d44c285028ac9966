"""Ray Data job: the paper's drift suite on long rollouts of one generator, logged to MLflow.

    python -m hiar.jobs.evaluate --preset tiny --model models:/hiar-student@champion
    python -m hiar.jobs.evaluate --preset tiny --model runs/students/distill-abc123 --set eval.num_prompts=16

What is evaluated.  ``--model`` is a registry URI (``models:/name@alias``, ``models:/name/N``), a ``runs:/`` URI
or a local bundle directory; registry URIs are pinned to one version and downloaded once, driver-side, into
``<run_dir>/model-cache`` (actors get the local path: on a multi-node cluster ``run_dir`` must be shared storage).
Rollouts run at ``video.eval_horizon_factor x video.train_latent_frames`` latent frames (the paper: train on 5 s,
evaluate at 20 s) in every mode of ``eval.rollouts`` (``hierarchical`` and ``block_first``), over the held-out
prompts (``hiar.methods.pretrain.eval_prompts``: tiny world; or the first ``eval.num_prompts`` of the held-out split of
``data.prompts``, ``hiar.io.prompts``, which training never sees) x ``eval.seeds``.  Generation uses the model's own
``hiar_config.yaml`` (schedule, rollout, geometry); ``--set rollout.*`` overrides are applied on top of it (the
paper's t_c ablations), every other ``--set`` is about the evaluation itself.

How.  One Ray Data item per (prompt, seed) -> ``map_batches`` on an actor pool (``eval.actors`` actors with
``eval.cpus_per_actor`` -- fractional, DESIGN §8 -- and ``eval.gpus_per_actor``); each actor loads the bundle
once and, per batch of ``eval.batch_size`` items, generates each mode, computes ``hiar.eval.drift.drift_report``
(per-segment values, per-metric slopes, Drift Score, VBench dynamics) and, for the tiny world, the oracle scores;
the first ``eval.sample_videos`` items also send back their frames (uint8).

Logged (experiment ``hiar-eval``; nested under ``--parent-run-id``): params = model URI, resolved name/version,
checksum and the evaluation config; metrics ``<mode>/drift/*`` (score, per-metric slopes, normalised slopes,
degradations, per-segment values), ``<mode>/dynamics/*``, ``<mode>/alignment/*`` (CLIP text-video alignment with the
prompt, when ``clip/`` weights are given), ``<mode>/oracle/*`` (the tiny preset only); artifacts
``plots/drift_segments.png`` (per-segment curves, one line per mode), ``samples/<mode>.mp4``, ``prompts.json``
and ``eval.json``.  Tags ``hiar.eval_identity`` (hash of everything that determines the numbers except the
weights) and ``hiar.model_checksum`` let ``--reuse`` (and ``promote.py``) find a finished evaluation of the same
weights under the same settings instead of recomputing it (``hiar.platform.evaluation``).

Noise.  Every one of those metrics is a mean over the ``n = eval/num_videos`` (prompt, seed) samples, and each
carries its standard error ``<key>_se`` (sample standard deviation / sqrt(n), ``hiar.eval.gate.mean_se``; absent for
n = 1) -- plus ``<key>_n`` when fewer samples had a value (a scorer that failed on some videos).  The per-sample
values themselves are the artifact ``per_sample.json`` (``{"keys": [[prompt, seed], ...], "values": {metric key:
[one value per key, null where none]}}``, ``hiar.eval.summary.sample_values``): the gate pairs the challenger's and the
champion's samples by (prompt, seed) (``hiar.eval.gate``).  Only runs that have it (tag ``hiar.per_sample``) are
reused.

Errors about the model (unknown directory, alias or version, not a bundle) or the settings come before any
compute: ``error: ...`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from hiar.jobs.results import EvaluationResult, write_result
from hiar.platform.tracking import setup_tracking
from hiar.platform.evaluation import run_evaluation
from hiar.platform.evaluation_plan import EvalInputError, plan_evaluation


def main(argv=None) -> int:
    from hiar.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/N, runs:/<id>/generator or a local bundle directory")
    parser.add_argument("--parent-run-id", default=None, help="nest the evaluation run under this MLflow run")
    parser.add_argument("--output-json", default=None,
                        help="write the EvaluationResult (hiar.jobs.results: run id, model, version, metrics) here")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="return a finished evaluation of the same weights and settings instead of recomputing")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        setup_tracking(cfg.run_dir)
        plan = plan_evaluation(cfg, args.model, args.overrides)
        if args.parent_run_id:
            MlflowClient().get_run(args.parent_run_id)  # raises when it does not exist
    except (EvalInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:  # an unknown parent run
        print(f"error: --parent-run-id {args.parent_run_id}: {err.message}", file=sys.stderr)
        return 2
    result = run_evaluation(plan, args.parent_run_id, args.run_name, args.reuse)
    write_result(args.output_json, EvaluationResult(**result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
