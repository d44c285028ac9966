"""benchmarks/frame_strip.py: bad --model specs are usage errors before any compute; a real strip from a bundle."""

from __future__ import annotations

import cv2
import pytest

from benchmarks.frame_strip import GAP, LABEL_WIDTH, TEXT_ROW, main
from benchmarks.teacher_quality import SHIPPED


@pytest.mark.parametrize("spec", ["no-equals-sign", "=hiar/assets/tiny-teacher", "label=/does/not/exist"])
def test_a_model_that_is_not_label_equals_bundle_is_a_usage_error(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", spec, "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "LABEL=PATH" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_strip_has_a_reference_row_and_a_row_per_model_for_each_prompt(tmp_path):
    out = tmp_path / "strip.png"
    # any bundle rolls out; the shipped teacher is the one in every checkout (quality is not the point here)
    assert main(["--model", f"a=label={SHIPPED}", "--out", str(out), "--prompts", "2", "--factor", "1",
                 "--every", "3", "--scale", "2"]) == 0
    image = cv2.imread(str(out))
    frames, size = 12 // 3, 16 * 2  # 12 frames at 1x, every 3rd; 16 px enlarged twice
    assert image.shape[1] == LABEL_WIDTH + frames * size + (frames - 1) * GAP
    assert image.shape[0] == 2 * (TEXT_ROW + 2 * (size + GAP))  # per prompt: caption bar, reference + one model
