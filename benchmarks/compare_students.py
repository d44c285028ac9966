"""Paired comparison of two recipes from their evaluations: B − A per held-out (prompt, seed), with its SE.

    python benchmarks/compare_students.py --work-dir runs/ablations \
        --a runs/ablations/students/distill-5309ccf0d5e086fd runs/ablations/students/distill-2b500e654f50d4b5 \
        --b runs/ablations/students/distill-ba284232019e5886 runs/ablations/students/distill-a2c8c707bc8ca3e7

``--a`` and ``--b`` are the students of the two recipes, one per training seed, in the same seed order (the
``student`` of each seed in ``<work-dir>/ablations/results.json``). Every student must have been evaluated in the
``--work-dir``'s MLflow store (``benchmarks/ablations.py`` does it, at 1x and 4x) on the same held-out prompts and
seeds. For each horizon and metric: per sample, the mean over training seeds of B − A, then the mean and standard
error of those differences over the samples -- paired, so the variation between prompts cancels, as in the
promotion gate (``hiar.eval.gate``, whose pairing this uses). A difference beyond 2 SE is reported as separated.
Nothing is recomputed: it reads the per-sample tables the evaluations logged.
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


def evaluation_runs(student: Path) -> dict[str, str]:
    """``{"1x": run id, "4x": run id}``: the newest evaluation of ``student`` at each horizon, by the MLflow run name
    ``benchmarks/ablations.py`` gives (``eval-<variant>-s<seed>-<k>x``)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiments = [exp.experiment_id for exp in client.search_experiments()]
    runs = {}
    # one search over every experiment, newest first, so "newest" holds across experiments too
    for run in client.search_runs(experiments, f"tags.`hiar.model_uri` = '{student}'",
                                  order_by=["attributes.start_time DESC"]):
        horizon = (run.info.run_name or "").rsplit("-", 1)[-1]
        if horizon.endswith("x") and horizon not in runs:
            runs[horizon] = run.info.run_id
    if not runs:
        raise SystemExit(f"error: no evaluation of {student} in {os.environ['MLFLOW_TRACKING_URI']}")
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="the run_dir whose mlflow.db holds the evaluations")
    parser.add_argument("--a", nargs="+", required=True, help="recipe A's students, one per training seed")
    parser.add_argument("--b", nargs="+", required=True, help="recipe B's students, same seed order")
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

    a_runs = [evaluation_runs(Path(s).resolve()) for s in args.a]
    b_runs = [evaluation_runs(Path(s).resolve()) for s in args.b]
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
