"""The evaluation's HiAR vs block-first contrast (hiar.eval.summary): a paired difference with its standard error,
checked against statistics.stdev, and the line that says whether the two modes are told apart."""

import math
import statistics

from hiar.eval.summary import SEPARATED_SE, contrast, contrast_text, mode_contrast


def table(hier: list, block: list, key: str = "drift/score") -> dict:
    return {"keys": [[f"p{i}", 0] for i in range(len(hier))],
            "values": {f"hierarchical/{key}": hier, f"block_first/{key}": block}}


def test_paired_difference_and_its_standard_error():
    hier, block = [0.10, 0.30, 0.52, 0.21, None], [0.12, 0.35, 0.55, 0.22, 0.4]
    out = mode_contrast(table(hier, block))
    diffs = [a - b for a, b in zip(hier[:4], block[:4])]  # the sample without a hierarchical value is left out
    assert math.isclose(out["contrast/drift/score"], statistics.fmean(diffs), rel_tol=1e-12)
    assert math.isclose(out["contrast/drift/score_se"], statistics.stdev(diffs) / math.sqrt(4), rel_tol=1e-12)
    assert out["contrast/drift/score_pairs"] == 4


def test_pairing_separates_what_two_overlapping_means_would_not():
    # prompts differ a lot in difficulty, block-first is worse on every one of them by about 0.02
    hier = [0.05, 0.20, 0.40, 0.60, 0.80, 0.15, 0.35, 0.70]
    block = [h + 0.02 + 0.002 * (i % 3) for i, h in enumerate(hier)]
    m = mode_contrast(table(hier, block))
    d, se, n, separated = contrast(m)
    assert d < 0 and n == 8 and separated and abs(d) > 10 * se
    unpaired_se = math.hypot(statistics.stdev(hier), statistics.stdev(block)) / math.sqrt(8)
    assert abs(d) < SEPARATED_SE * unpaired_se  # the two means' own errors would have hidden it
    assert "separated" in contrast_text(m) and "NOT" not in contrast_text(m)


def test_equal_modes_are_said_to_be_not_told_apart():
    hier = [0.10, 0.30, 0.52, 0.21, 0.44, 0.18]
    block = [0.12, 0.27, 0.55, 0.20, 0.41, 0.19]  # differences of both signs around zero
    m = mode_contrast(table(hier, block))
    d, se, n, separated = contrast(m)
    assert not separated and abs(d) <= SEPARATED_SE * se
    assert "NOT separated" in contrast_text(m) and "n = 6" in contrast_text(m)


def test_no_contrast_without_both_modes_or_two_samples():
    assert mode_contrast({"keys": [["a", 0]], "values": {"hierarchical/drift/score": [0.1]}}) == {}
    assert mode_contrast(table([0.1], [0.2])) == {}  # one sample: no standard error
    assert contrast({}) is None and contrast_text({}) is None
