"""The paper's ablations retrained on the tiny world: context noise t_c (Table 2) and forward KL (Table 3).

    python benchmarks/ablations.py --work-dir runs/ablations                       # 4 variants x 2 seeds
    python benchmarks/ablations.py --work-dir runs/ablations --variants next,clean --seeds 0
    python benchmarks/ablations.py --work-dir runs/ablations --set distill.steps=120 --set eval.num_prompts=16
    python benchmarks/ablations.py --work-dir runs/ablations --variants next --distill-set teacher.real_score_path=DIR

The paper's protocol: every variant is distilled from one ODE init with the same budget, then scored on long
rollouts. Here:

1. ``hiar.pipeline.full --stages teacher,ode_pairs,trajectories,ode_init`` under ``--work-dir`` (the preset's
   budgets, the shipped teacher): one ODE-pair dataset, one trajectory dataset, one ODE-init student.
2. For each variant and each training seed (``--seeds``, ``--set seed=N``): ``hiar.jobs.train --stage distill
   --init <that ODE init>`` on those datasets with the variant's overrides (``VARIANTS``).
3. Each student (and the ODE init, as the floor) evaluated by ``hiar.jobs.evaluate`` at the training horizon (1x) and
   at ``video.eval_horizon_factor`` (4x) in its own rollout (hierarchical, with the t_c it was trained with: the
   bundle's own config), on the preset's held-out prompts x eval seeds.

Printed: one table, a row per variant: caption consistency (the tiny oracle), Drift Score, VBench dynamic degree,
the oracle's mean motion (px/frame) and its share of videos that stand still, at 1x and 4x. A cell is the mean
over training seeds of each student's mean over the evaluation's videos, ``± SE`` the standard error of that mean
from the videos (sqrt(sum SE_i^2) / k), then in brackets each training seed's own value, so the spread between
seeds shows next to the noise from sampling. ``<work-dir>/ablations/results.json`` keeps every number of the
latest run, and ``results-<identity>.json`` each run's (named by its preset, overrides, variants and seeds).

Everything is reused on a rerun: a finished stage, student (same identity) or evaluation (``--reuse``: same weights
and settings) is not recomputed, so an interrupted run picks up where it stopped. Job logs go to
``<work-dir>/logs/``; a failed job stops the script with its last log lines. Every job joins one Ray cluster:
``RAY_ADDRESS``, or a local one started here. The default 4 x 2 took 41.7 minutes on this
2-core box (README "Quality on the tiny preset").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from hiar.io.storage import write_local_json
from hiar.jobs.results import EvaluationResult, TrainResult
from hiar.pipeline.console import StageConsole
from hiar.pipeline.outcome import StageFailed
from hiar.pipeline.supervisor import JobSupervisor, RayTarget

# name -> (what the table calls it, the distillation's --set overrides). "next" is the preset's method.
VARIANTS = {
    "next": ("t_c = t_{j+1} (HiAR)", ["rollout.context_noise=next"]),
    "current": ("t_c = t_j", ["rollout.context_noise=current"]),
    "clean": ("t_c = 0 (Self-Forcing)", ["rollout.context_noise=clean"]),
    "no_fkl": ("t_{j+1}, no forward KL", ["rollout.context_noise=next", "distill.fkl_weight=0"]),
    # not one of the paper's: t_{j+1} trained and sampled with a 9-frame window (2 blocks of context) instead of 12
    "window9": ("t_{j+1}, 9-frame window", ["rollout.context_noise=next", "rollout.window_frames=9"]),
}
PAPER_VARIANTS = ("next", "current", "clean", "no_fkl")  # the default run: Tables 2 and 3
BASE_STAGES = "teacher,ode_pairs,trajectories,ode_init"
# metric key in EvaluationResult.metrics (hierarchical rollout) -> column name
METRICS = {"oracle/caption_consistency": "caption", "drift/score": "Drift",
           "dynamics/dynamic_degree": "dynamic degree", "oracle/motion": "motion px/frame",
           "oracle/static": "static videos"}
MODE = "hierarchical"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="run_dir of every job (datasets, students, MLflow, logs)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--variants", default=",".join(PAPER_VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)} (default: the paper's {', '.join(PAPER_VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds per variant")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for every job (budgets, evaluation size)")
    p.add_argument("--distill-set", dest="distill_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for the distillation jobs only, after each variant's own: a setting that "
                        "must not retrain the shared ODE init (e.g. teacher.real_score_path, whose path is part of "
                        "every stage's identity)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown variant(s) {unknown or args.variants}; valid: {', '.join(VARIANTS)}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    for flag, given in (("--set", args.overrides), ("--distill-set", args.distill_overrides)):
        for o in given:
            if "=" not in o or o.split("=", 1)[0].startswith(("seed", "rollout.", "run_dir")):
                p.error(f"{flag} {o!r}: give KEY=VALUE; seed, rollout.* and run_dir are set by this script")
    return args


class Ablations:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.out = self.work / "ablations"
        self.console = StageConsole(label="ablations")
        self.ray = RayTarget(self.console)
        self.jobs = JobSupervisor(self.work / "logs", self.console, self.ray, None)
        self.common = [arg for o in args.overrides for arg in ("--set", o)]

    def job_args(self, extra: list[str]) -> list[str]:
        return ["--preset", self.args.preset, "--set", f"run_dir={self.work}", *self.common, *extra]

    def base(self) -> tuple[str, str]:
        """The shared ODE init and data storage, from the pipeline's own summary (stage outputs)."""
        summary = self.out / "base-summary.json"
        cmd = [sys.executable, "-u", "-m", "hiar.pipeline.full", "--preset", self.args.preset, "--run-dir",
               str(self.work), "--stages", BASE_STAGES, "--summary-json", str(summary), *self.common]
        self.console.say(f"[ablations] shared stages {BASE_STAGES}: {' '.join(cmd[3:])}")
        env = {**self.jobs.child_env(), "HIAR_PROGRESS": "plain"}
        if self.ray.session_dir:  # the cluster started here: its summary names that session's logs
            env["HIAR_RAY_LOGS_DIR"] = str(Path(self.ray.session_dir) / "logs")
        if subprocess.run(cmd, env=env).returncode != 0:
            raise StageFailed(f"the shared stages failed; their logs are under {self.work / 'logs'}")
        stages = {s["stage"]: s for s in json.loads(summary.read_text())["stages"]}
        init = stages["ode_init"]["detail"]["output"]
        storage = str(Path(stages["ode_pairs"]["detail"]["output"]).parent)  # <storage>/ode_pairs
        return init, storage

    def distill(self, variant: str, seed: int, init: str, storage: str) -> TrainResult:
        name = f"distill-{variant}-s{seed}"
        sets = [arg for o in [*VARIANTS[variant][1], *self.args.distill_overrides, f"seed={seed}",
                              f"data.storage={storage}"] for arg in ("--set", o)]
        return self.jobs.run_for_result(name, "train", [*self.job_args(sets), "--stage", "distill", "--init", init],
                                        TrainResult, self.out / f"{name}.json")

    def evaluate(self, name: str, bundle: str, factor: int) -> EvaluationResult:
        name = f"eval-{name}-{factor}x"
        sets = ["--set", f"video.eval_horizon_factor={factor}", "--set", f"eval.rollouts=[{MODE}]"]
        return self.jobs.run_for_result(name, "evaluate", [*self.job_args(sets), "--model", bundle, "--reuse",
                                                           "--run-name", name], EvaluationResult, self.out / f"{name}.json")

    def run(self) -> dict:
        from hiar.config import load_config

        factor = load_config(self.args.preset, self.args.overrides).video.eval_horizon_factor
        factors = sorted({1, factor})
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        init, storage = self.base()
        self.console.say(f"[ablations] ODE init {init}; data {storage}")
        rows = {"ode_init": {"variant": "ode_init", "label": "ODE init (no distillation)", "seeds": {
            "-": {f"{f}x": self.evaluate("ode_init", init, f).metrics for f in factors}}}}
        todo = [(v, s) for v in self.args.variants for s in self.args.seeds]
        for i, (variant, seed) in enumerate(todo, 1):
            self.console.say(f"[ablations] {i}/{len(todo)}: {VARIANTS[variant][0]}, training seed {seed} "
                             f"({time.monotonic() - t0:.0f} s so far)")
            student = self.distill(variant, seed, init, storage)
            row = rows.setdefault(variant, {"variant": variant, "label": VARIANTS[variant][0],
                                            "overrides": VARIANTS[variant][1], "seeds": {}})
            row["seeds"][str(seed)] = {"student": student.output, **{
                f"{f}x": self.evaluate(f"{variant}-s{seed}", student.output, f).metrics for f in factors}}
        results = {"preset": self.args.preset, "overrides": self.args.overrides,
                   "distill_overrides": self.args.distill_overrides, "init": init, "data": storage,
                   "factors": factors, "seconds": time.monotonic() - t0, "rows": list(rows.values())}
        write_local_json(self.out / "results.json", results)
        write_local_json(self.out / results_name(self.args), results)
        return results


def results_name(args) -> str:
    """``results-<identity>.json``: this run's own copy of ``results.json`` (the latest run's), named by what
    it ran (preset, overrides, variants, seeds), so runs with other ``--set`` budgets in one work dir keep theirs."""
    from hiar.identity import identity

    what = [args.preset, sorted(args.overrides), list(args.variants), list(args.seeds)]
    if args.distill_overrides:  # only when given, so earlier runs keep their names
        what.append(sorted(args.distill_overrides))
    return f"results-{identity(what)}.json"


def combine(per_seed: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean over training seeds of (mean, SE) pairs, and the SE of that mean from the evaluation's sampling noise."""
    k = len(per_seed)
    return (sum(m for m, _ in per_seed) / k, math.sqrt(sum(se * se for _, se in per_seed)) / k)


def cell(seeds: dict, horizon: str, key: str) -> str:
    full = f"{MODE}/{key}"
    vals = [(s[horizon][full], s[horizon].get(f"{full}_se", 0.0)) for s in seeds.values() if full in s[horizon]]
    if not vals:
        return "n/a"
    mean, se = combine(vals)
    text = f"{mean:.3f} ± {se:.3f}"
    return text + (f" ({' / '.join(f'{m:.3f}' for m, _ in vals)})" if len(vals) > 1 else "")


def table(results: dict) -> str:
    cols = [(f"{f}x", key, f"{name} {f}×") for key, name in METRICS.items() for f in results["factors"]]
    lines = ["| variant | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in results["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(cell(row["seeds"], h, k) for h, k, _ in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        results = Ablations(args).run()
    except StageFailed as err:
        print(f"[ablations] error: {err}", file=sys.stderr)
        return 1
    print(f"\n[ablations] {len(results['rows']) - 1} variant(s) x {len(args.seeds)} training seed(s) in "
          f"{results['seconds'] / 60:.1f} min; each cell: mean ± SE over the evaluation's videos (training seeds)\n")
    print(table(results))
    out = Path(args.work_dir).resolve() / "ablations"
    print(f"\nall numbers: {out / 'results.json'} (this run's: {out / results_name(args)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
