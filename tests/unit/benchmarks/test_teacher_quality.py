"""benchmarks/teacher_quality.py: argument errors before any compute, and one real (small) run on the shipped teacher."""

from __future__ import annotations

import pytest

from benchmarks.teacher_quality import COLUMNS, SHIPPED, main


def test_a_path_that_is_not_a_teacher_bundle_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--teacher", str(tmp_path)])
    assert exc.value.code == 2
    assert "not a teacher bundle" in capsys.readouterr().err


def test_a_bad_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--set", "teacher.num_step=24"])
    assert exc.value.code == 2
    assert "unknown field" in capsys.readouterr().err


def test_the_shipped_teacher_gets_a_row_of_scores_with_standard_errors(capsys):
    assert main(["--teacher", str(SHIPPED), "--prompts", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]  # after the sampler's settings
    assert lines[0] == "| teacher | n | " + " | ".join(COLUMNS) + " |"
    cells = lines[2].strip("| ").split(" | ")
    assert cells[:2] == [str(SHIPPED), "3"]
    means = [float(c.split(" ± ")[0]) for c in cells[2:]]
    assert len(means) == len(COLUMNS) and all(v >= 0 for v in means)
    assert 0.0 <= means[COLUMNS.index("static")] <= 1.0


def test_window_starts_between_latent_frames_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--windows", "0", "-3"])
    assert exc.value.code == 2
    assert "--windows: start frames must be non-negative multiples" in capsys.readouterr().err


def test_window_errors_grow_with_the_noise_and_are_paired_across_starts():
    from benchmarks.teacher_quality import window_errors
    from hiar.config import load_config
    from hiar.methods.pretrain import load_teacher

    model, text, codec, _ = load_teacher(SHIPPED)
    errors = window_errors(model.eval(), text, codec, load_config("tiny"), 4, [0, 12], sigmas=(0.1, 0.9))
    assert set(errors) == {(s, f) for s in (0.1, 0.9) for f in (0, 12)}
    for f in (0, 12):  # a denoiser is far closer to the clean video at sigma 0.1 than at 0.9
        assert errors[(0.1, f)][0] < 0.5 * errors[(0.9, f)][0] and errors[(0.1, f)][1] >= 0
    again = window_errors(model.eval(), text, codec, load_config("tiny"), 4, [12], sigmas=(0.9,))
    assert again[(0.9, 12)] == errors[(0.9, 12)]  # the same noise whatever else is measured
