"""benchmarks/consistency_over_time.py: segment means against a hand count; its "all" column is the oracle's
caption consistency of the same videos; bad arguments are usage errors before any compute."""

from __future__ import annotations

import re

import numpy as np
import pytest

from benchmarks.consistency_over_time import main, segment_means
from benchmarks.teacher_quality import SHIPPED


def test_segment_means_by_hand():
    # 2 videos of 7 frames: 6 pairs; segments of 3 frames take pairs [0, 3) and [3, 6)
    curves = np.array([[1, 1, 0, 0, 0, 1], [1, 0, 0, 1, 1, 1]])
    (m0, se0), (m1, se1), (m_all, se_all) = segment_means(curves, 3)
    assert m0 == pytest.approx((2 / 3 + 1 / 3) / 2) and m1 == pytest.approx((1 / 3 + 1) / 2)
    assert m_all == pytest.approx((3 / 6 + 4 / 6) / 2)
    # standard error of two values a, b: |a - b| / 2
    assert se0 == pytest.approx(abs(2 / 3 - 1 / 3) / 2) and se1 == pytest.approx(abs(1 / 3 - 1) / 2)
    assert se_all == pytest.approx(abs(3 / 6 - 4 / 6) / 2)
    # a last segment shorter than the others, and one video (no standard error)
    (_, _), (m_last, _), (_, _) = segment_means(curves[:, :5], 3)
    assert m_last == pytest.approx((0 + 1) / 2)  # pairs 3 and 4: [0, 0] and [1, 1]
    assert np.isnan(segment_means(curves[:1], 3)[0][1])


@pytest.mark.parametrize("curves, segment", [(np.zeros(5), 2), (np.zeros((2, 0)), 2), (np.zeros((2, 4)), 0)])
def test_segment_means_refuses_bad_input(curves, segment):
    with pytest.raises(ValueError):
        segment_means(curves, segment)


@pytest.mark.parametrize("args", [["--model", "no-equals-sign"], ["--model", f"a={SHIPPED}", "--segment", "-1"],
                                  ["--model", f"a={SHIPPED}", "--seeds", "-3"]])
def test_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "usage" in capsys.readouterr().err


def test_all_column_is_the_oracles_caption_consistency(capsys):
    from hiar.config import load_config
    from hiar.core.generation import generate_frames
    from hiar.io.bundle import load_bundle
    from hiar.methods.pretrain import eval_prompts
    from hiar.tiny.oracle import score_clip

    # any bundle rolls out; the shipped teacher is the one in every checkout (quality is not the point here)
    assert main(["--model", f"teacher={SHIPPED}", "--prompts", "2", "--seeds", "0", "--factor", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("caption consistency by frames"))
    assert header.split()[-3:] == ["0-12", "12-24", "all"]
    cells = {line[:36].strip(): [float(x) for x in re.findall(r"(\d\.\d{3}) ±", line)]
             for line in out.splitlines() if " ± " in line}
    assert cells["reference (the world)"] == [1.0, 1.0, 1.0]

    cfg = load_config("tiny")
    prompts = eval_prompts(2)
    blocks = cfg.video.train_latent_frames // cfg.rollout.frames_per_block * 2
    videos = generate_frames(load_bundle(SHIPPED), prompts, [0, 0], blocks, "hierarchical")
    expected = np.mean([score_clip(v, p)["caption_consistency"] for v, p in zip(videos, prompts)])
    assert cells["teacher"][-1] == pytest.approx(expected, abs=5e-4)
