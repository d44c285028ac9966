"""benchmarks/compare_students.py on a real MLflow store (SQLite) holding per-sample tables with known values:
the paired difference and its SE against numpy, the sample order of each table ignored, bad input rejected."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from benchmarks.compare_students import main

KEYS = [[f"prompt {i}", seed] for i in range(6) for seed in (0, 1)]
CAPTION, DRIFT, MOTION = "hierarchical/oracle/caption_consistency", "hierarchical/drift/score", "hierarchical/oracle/motion"


def log_evaluation(student: str, horizon: str, caption: list[float], order: list[int], name: str = "eval-x-s0-"):
    """One evaluation run as benchmarks/ablations.py names and tags it, its samples written in ``order``."""
    import mlflow

    with mlflow.start_run(run_name=f"{name}{horizon}"):
        mlflow.set_tag("hiar.model_uri", student)
        values = {CAPTION: caption, DRIFT: [0.1] * len(caption), MOTION: [1.0 + c for c in caption]}
        mlflow.log_dict({"keys": [KEYS[i] for i in order],
                         "values": {k: [v[i] for i in order] for k, v in values.items()}}, "per_sample.json")


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.create_experiment("hiar-eval")
    # the runs go there through the environment, not mlflow.set_experiment: that one stays set in this process and
    # a later test's job in it (tests/services.py job_here) could then not reopen a run of its own experiment
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hiar-eval")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_paired_difference_over_seeds_matches_numpy(store, capsys):
    rng = np.random.default_rng(0)
    students = {name: str(store / "students" / name) for name in ("a0", "a1", "b0", "b1")}
    caption = {name: rng.uniform(0, 1, len(KEYS)).round(3).tolist() for name in students}
    for name, path in students.items():
        order = list(range(len(KEYS)))
        if name.startswith("b"):
            order = order[::-1]  # another sample order: the pairing goes by (prompt, seed), not position
        log_evaluation(path, "1x", caption[name], order)
    assert main(["--work-dir", str(store), "--a", students["a0"], students["a1"],
                 "--b", students["b0"], students["b1"]]) == 0
    out = capsys.readouterr().out
    d = (np.add(caption["b0"], caption["b1"]) - np.add(caption["a0"], caption["a1"])) / 2
    want_se = d.std(ddof=1) / math.sqrt(d.size)
    line = next(ln for ln in out.splitlines() if "caption_consistency" in ln)
    got = re.search(r"B - A ([+-][0-9.]+) ± ([0-9.]+) \(n = (\d+)", line)
    assert got, line
    assert float(got.group(1)) == pytest.approx(d.mean(), abs=5e-4)
    assert float(got.group(2)) == pytest.approx(want_se, abs=5e-4)
    assert int(got.group(3)) == len(KEYS)
    assert ("separated" in line) and (("NOT" in line) == (abs(d.mean()) <= 2 * want_se))


def test_unequal_seed_counts_and_a_missing_store_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--work-dir", str(tmp_path), "--a", "x", "y", "--b", "z"])
    assert exc.value.code == 2 and "one per training seed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--work-dir", str(tmp_path / "nowhere"), "--a", "x", "--b", "z"])
    assert exc.value.code == 2 and "no MLflow store" in capsys.readouterr().err


def test_a_student_without_evaluations_is_named(store):
    log_evaluation(str(store / "a"), "1x", [0.5] * len(KEYS), list(range(len(KEYS))))
    with pytest.raises(SystemExit) as exc:
        main(["--work-dir", str(store), "--a", str(store / "a"), "--b", str(store / "never-evaluated")])
    assert "never-evaluated" in str(exc.value.code)


def test_a_student_compared_with_itself_sampled_another_way(store, capsys):
    """--b-name picks the evaluations named so (the same student, another inference setting); the default prefix
    never takes them, even though they are the newest."""
    student = str(store / "students" / "s0")
    log_evaluation(student, "4x", [0.2] * len(KEYS), list(range(len(KEYS))))
    log_evaluation(student, "4x", [0.5] * len(KEYS), list(range(len(KEYS))), name="window9-s0-")
    assert main(["--work-dir", str(store), "--a", student, "--b", student, "--b-name", "window9-"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "caption_consistency" in ln)
    assert "A 0.200  B 0.500" in line and "B - A +0.300" in line
    assert main(["--work-dir", str(store), "--a", student, "--b", student]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "caption_consistency" in ln)
    assert "B - A +0.000" in line


def test_a_student_under_a_linked_directory_is_found_by_its_relative_path(store, capsys, monkeypatch):
    """An evaluation records the absolute path it was given, links kept (a work dir whose students/ links to another
    run's); the same student named relative to the working directory is found through either spelling."""
    real = store / "elsewhere" / "students"
    real.mkdir(parents=True)
    (store / "work").mkdir()
    (store / "work" / "students").symlink_to(real, target_is_directory=True)
    log_evaluation(str(store / "work" / "students" / "s0"), "1x", [0.3] * len(KEYS), list(range(len(KEYS))))
    log_evaluation(str(real / "s1"), "1x", [0.6] * len(KEYS), list(range(len(KEYS))))
    monkeypatch.chdir(store)
    assert main(["--work-dir", str(store), "--a", "work/students/s0", "--b", "work/students/s1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "caption_consistency" in ln)
    assert "A 0.300  B 0.600" in line
