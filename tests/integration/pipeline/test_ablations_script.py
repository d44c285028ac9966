"""benchmarks/ablations.py end to end on a real local Ray cluster, at toy budgets: the shared stages once, two
variants distilled from the same ODE init, each evaluated at 1x and 4x, the table printed; then a rerun that
recomputes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
TOY = ["data.num_ode_pairs=4", "data.num_trajectories=4", "teacher.num_steps=4", "data.trajectory_steps=5",
       "data.shard_size=2", "data.batch_size=2", "data.actors=1",
       "distill.num_workers=1", "distill.micro_batch_size=1", "distill.ode_micro_batch_size=null",
       "distill.batch_size=2", "distill.ode_batch_size=2",
       "distill.ode_steps=2", "distill.steps=2", "distill.critic_ratio=2", "distill.checkpoint_every=2",
       "distill.sample_every=0", "eval.num_prompts=2", "eval.seeds=[0]", "eval.actors=1", "eval.sample_videos=0",
       "eval.batch_size=2"]


def run_ablations(work: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-u", str(ROOT / "benchmarks" / "ablations.py"), "--work-dir", str(work),
           "--variants", "next,no_fkl", "--seeds", "0", *[a for o in TOY for a in ("--set", o)]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_variants_from_one_ode_init_then_a_rerun_that_reuses_everything(tmp_path):
    work = tmp_path / "abl"
    first = run_ablations(work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((work / "ablations" / "results.json").read_text())
    own = sorted((work / "ablations").glob("results-*.json"))  # this run's own copy, named by what it ran
    assert len(own) == 1 and json.loads(own[0].read_text()) == results, own
    assert f"this run's: {own[0]}" in first.stdout
    rows = {row["variant"]: row for row in results["rows"]}
    assert list(rows) == ["ode_init", "next", "no_fkl"]
    assert results["factors"] == [1, 4]
    students = [rows[v]["seeds"]["0"]["student"] for v in ("next", "no_fkl")]
    assert students[0] != students[1]
    cards = [json.loads((Path(s) / "card.json").read_text()) for s in students]
    assert [c["init"] for c in cards] == [results["init"]] * 2  # both from the one ODE init the shared stages made
    assert [c["seed"] for c in cards] == [0, 0]
    configs = [yaml.safe_load((Path(s) / "hiar_config.yaml").read_text()) for s in students]
    assert [c["distill"]["fkl_weight"] for c in configs] == [0.1, 0]
    assert [c["rollout"]["context_noise"] for c in configs] == ["next", "next"]
    for row in results["rows"]:
        for horizon in ("1x", "4x"):
            metrics = next(iter(row["seeds"].values()))[horizon]
            assert 0.0 <= metrics["hierarchical/oracle/caption_consistency"] <= 1.0
            assert 0.0 <= metrics["hierarchical/oracle/static"] <= 1.0
            assert "hierarchical/drift/score" in metrics and "block_first/drift/score" not in metrics
    table = first.stdout[first.stdout.index("| variant |"):]
    assert "t_c = t_{j+1} (HiAR)" in table and "no forward KL" in table and "ODE init" in table

    again = run_ablations(work)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in ("eval-next-s0-4x", "eval-no_fkl-s0-1x", "eval-ode_init-4x"):
        assert json.loads((work / "ablations" / f"{name}.json").read_text())["reused"] is True
    for variant in ("next", "no_fkl"):
        assert "already holds this stage's result" in (work / "logs" / f"distill-{variant}-s0.log").read_text()
    assert json.loads((work / "ablations" / "results.json").read_text())["rows"] == results["rows"]
