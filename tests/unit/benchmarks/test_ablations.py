"""benchmarks/ablations.py's own logic: argument checks (before any compute) and how a table cell combines the
training seeds' evaluations. The script end to end: tests/integration/pipeline/test_ablations_script.py (slow)."""

from __future__ import annotations

import math

import pytest

from benchmarks.ablations import METRICS, PAPER_VARIANTS, VARIANTS, cell, combine, parse_args, results_name, table


def test_combine_is_the_mean_of_seed_means_with_the_se_of_that_mean():
    mean, se = combine([(0.2, 0.03), (0.4, 0.04)])
    assert mean == pytest.approx(0.3)
    # Var(mean of two independent means) = (0.03^2 + 0.04^2) / 4
    assert se == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)
    assert combine([(0.5, 0.1)]) == (0.5, 0.1)


def test_cell_shows_each_seed_and_skips_a_missing_metric():
    seeds = {"0": {"4x": {"hierarchical/drift/score": 0.1, "hierarchical/drift/score_se": 0.01}},
             "1": {"4x": {"hierarchical/drift/score": 0.3, "hierarchical/drift/score_se": 0.01}}}
    assert cell(seeds, "4x", "drift/score") == "0.200 ± 0.007 (0.100 / 0.300)"
    assert cell(seeds, "4x", "oracle/motion") == "n/a"
    one = {"-": {"1x": {"hierarchical/oracle/motion": 1.25}}}  # n = 1: no SE key
    assert cell(one, "1x", "oracle/motion") == "1.250 ± 0.000"


def test_table_has_a_row_per_variant_and_a_column_per_metric_and_horizon():
    m = {"hierarchical/oracle/caption_consistency": 0.5}
    results = {"factors": [1, 4], "rows": [
        {"variant": "ode_init", "label": "ODE init", "seeds": {"-": {"1x": m, "4x": m}}},
        {"variant": "next", "label": VARIANTS["next"][0], "seeds": {"0": {"1x": m, "4x": m}}}]}
    lines = table(results).splitlines()
    assert len(lines) == 4
    assert lines[0].count("|") == 2 + len(METRICS) * 2  # variant + every metric x 2 horizons
    assert "static videos 4×" in lines[0]
    assert lines[3].startswith(f"| {VARIANTS['next'][0]} | 0.500 ± 0.000 | 0.500 ± 0.000 | n/a")


@pytest.mark.parametrize("argv, message", [
    (["--variants", "next,bogus"], "unknown variant(s) ['bogus']"),
    (["--seeds", "0", "0"], "repeats a seed"),
    (["--set", "rollout.context_noise=clean"], "set by this script"),
    (["--set", "seed=3"], "set by this script"),
    (["--set", "distill.steps"], "KEY=VALUE"),
    (["--distill-set", "rollout.window_frames=9"], "--distill-set 'rollout.window_frames=9'"),
    (["--distill-set", "teacher.real_score_path"], "KEY=VALUE"),
])
def test_bad_arguments_are_usage_errors_before_any_compute(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--work-dir", "unused", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_papers_variants_and_two_training_seeds():
    args = parse_args(["--work-dir", "w"])
    assert args.variants == list(PAPER_VARIANTS) and args.seeds == [0, 1]
    assert set(PAPER_VARIANTS) <= set(VARIANTS) and "window9" not in PAPER_VARIANTS
    assert parse_args(["--work-dir", "w", "--variants", "window9"]).variants == ["window9"]
    assert {"next", "current", "clean"} <= set(VARIANTS)  # Table 2's three context levels
    assert "distill.fkl_weight=0" in VARIANTS["no_fkl"][1]  # Table 3's without-FKL


def test_each_run_keeps_its_own_results_file_named_by_what_it_ran():
    base = ["--work-dir", "w", "--variants", "next", "--seeds", "0", "1"]
    name = results_name(parse_args(base + ["--set", "distill.steps=120", "--set", "distill.critic_ratio=2"]))
    assert name.startswith("results-") and name.endswith(".json")
    # the order of --set flags does not matter; the overrides, variants and seeds do
    assert results_name(parse_args(base + ["--set", "distill.critic_ratio=2", "--set", "distill.steps=120"])) == name
    others = {results_name(parse_args(base + ["--set", "distill.steps=60"])), results_name(parse_args(base)),
              results_name(parse_args(["--work-dir", "w", "--variants", "next,current", "--seeds", "0", "1"])),
              results_name(parse_args(["--work-dir", "w", "--variants", "next", "--seeds", "0"]))}
    assert name not in others and len(others) == 4
    # distillation-only overrides name a run of their own; a run without them keeps the name it had before
    real = results_name(parse_args(base + ["--distill-set", "teacher.real_score_path=runs/t"]))
    assert real != results_name(parse_args(base)) and real != results_name(parse_args(base + ["--set",
                                                                                                  "teacher.real_score_path=runs/t"]))
