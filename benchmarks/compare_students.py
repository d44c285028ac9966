"""Paired comparison of two recipes from their evaluations: B − A per held-out (prompt, seed), with its SE.

    python benchmarks/compare_students.py --work-dir runs/ablations \
        --a runs/ablations/students/distill-9bef41af99a5ed8f runs/ablations/students/distill-7c1ab8b0d97bb5e1 \
        --b runs/ablations/students/distill-942be52ad06182bc runs/ablations/students/distill-482c13a6cf2e0c3a

``--a`` and ``--b`` are the students of the two recipes, one per training seed, in the same seed order (the
``student`` of each seed in ``<work-dir>/ablations/results.json``). Every student must have been evaluated in the
``--work-dir``'s MLflow store (``benchmarks/ablations.py`` does it, at 1x and 4x) on the same held-out prompts and
seeds. For each horizon and metric: per sample, the mean over training seeds of B − A, then the mean and standard
error of those differences over the samples -- paired, so the variation between prompts cancels, as in the
promotion gate (``hiar.eval.gate``, whose pairing this uses). A difference beyond 2 SE is reported as separated.
Nothing is recomputed: it reads the per-sample tables the evaluations logged.

``--a-name`` / ``--b-name`` pick a side's evaluations by MLflow run-name prefix (default ``eval-``, the names
``benchmarks/ablations.py`` gives): one student sampled two ways, e.g. with another inference window, is compared
with itself by evaluating it under a name of its own::

    python -m hiar.jobs.evaluate --preset tiny --set run_dir=runs/ablations --set rollout.window_frames=9 \
        --set video.eval_horizon_factor=4 --set 'eval.rollouts=[hierarchical]' \
        --model runs/ablations/students/distill-942be52ad06182bc --run-name window9-s0-4x
    python benchmarks/compare_students.py --work-dir runs/ablations --a <students> --b <the same> --b-name window9-
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# metric -> which direction is better (None: neither; motion is reported, not ranked)
METRICS = {"oracle/caption_consistency": "higher", "drift/score": "lower", "oracle/motion": None}
MODE = "hierarchical"


def evaluation_runs(student: str, name_prefix: str = "eval-") -> dict[str, str]:
    """``{"1x": run id, "4x": run id}``: the newest evaluation of ``student`` at each horizon among the MLflow runs
    named ``<name_prefix>...-<k>x`` (``benchmarks/ablations.py``'s are ``eval-<variant>-s<seed>-<k>x``). An
    evaluation records ``--model`` as it was given, so the bundle is looked up both as given and as an absolute
    path, with symbolic links kept (``benchmarks/ablations.py`` gives absolute ones) or resolved."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiments = [exp.experiment_id for exp in client.search_experiments()]
    found = []
    for uri in dict.fromkeys([student, os.path.abspath(student), str(Path(student).resolve())]):
        found += client.search_runs(experiments, f"tags.`hiar.model_uri` = '{uri}'")
    runs = {}
    # newest first over every experiment and spelling, so "newest" holds across them too
    for run in sorted(found, key=lambda r: r.info.start_time, reverse=True):
        name = run.info.run_name or ""
        horizon = name.rsplit("-", 1)[-1]
        if name.startswith(name_prefix) and horizon.endswith("x") and horizon not in runs:
            runs[horizon] = run.info.run_id
    if not runs:
        raise SystemExit(f"error: no evaluation of {student} named {name_prefix}...-<k>x in "
                         f"{os.environ['MLFLOW_TRACKING_URI']}")
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="the run_dir whose mlflow.db holds the evaluations")
    parser.add_argument("--a", nargs="+", required=True, help="recipe A's students, one per training seed")
    parser.add_argument("--b", nargs="+", required=True, help="recipe B's students, same seed order")
    parser.add_argument("--a-name", default="eval-", help="run-name prefix of A's evaluations (default: eval-)")
    parser.add_argument("--b-name", default="eval-", help="run-name prefix of B's evaluations (default: eval-)")
    args = parser.parse_args(argv)
    if len(args.a) != len(args.b):
        parser.error(f"--a has {len(args.a)} students and --b {len(args.b)}: give one per training seed on each side")
    db = Path(args.work_dir).resolve() / "mlflow.db"
    if not db.is_file():
        parser.error(f"no MLflow store at {db}")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"

    import numpy as np

    from hiar.eval.gate import pair_samples, paired_difference, paired_values
    from hiar.platform.evaluation import load_sample_values

    a_runs = [evaluation_runs(s, args.a_name) for s in args.a]
    b_runs = [evaluation_runs(s, args.b_name) for s in args.b]
    horizons = sorted(set.intersection(*(set(r) for r in a_runs + b_runs)), key=lambda h: float(h[:-1]))
    print(f"B - A, paired over held-out (prompt, seed), each side the mean over its {len(args.a)} training seed(s); "
          f"A better / B better by the metric's direction")
    for horizon in horizons:
        tables = {side: [load_sample_values(r[horizon]) for r in runs] for side, runs in (("a", a_runs), ("b", b_runs))}
        ref = tables["a"][0]
        orders = {side: [pair_samples(ref, t) for t in ts] for side, ts in tables.items()}  # once per table
        print(f"{horizon} ({len(ref['keys'])} videos per student)")
        for key, better in METRICS.items():
            full = f"{MODE}/{key}"

            def side_mean(side: str) -> np.ndarray:  # every table's values in ref's sample order, averaged
                return np.mean([paired_values(ref, t, full, order)[1]
                                for t, order in zip(tables[side], orders[side])], axis=0)

            a, b = side_mean("a"), side_mean("b")
            mean, se, n = paired_difference(b, a, better or "higher")
            verdict = "separated" if abs(mean) > 2 * se else "NOT separated"
            if mean == 0:
                gap = "no difference"
            else:
                gap = f"{'B' if mean > 0 else 'A'} better" if better else "apart"
                gap += f" by {abs(mean) / se:.1f} SE" if se > 0 else " in every sample"
            print(f"  {key:<28} A {a.mean():.3f}  B {b.mean():.3f}  B - A {b.mean() - a.mean():+.3f} ± {se:.3f} "
                  f"(n = {n}; {gap}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
