"""Evaluation and gate for real video: the CLIP text-video alignment scorer (a tiny random CLIPModel saved in
transformers' own format, loaded from a local or s3:// weights directory), skipped scorers that never gate as 0,
the gate's named checks (registry.gate_metrics) and the tiny oracle for the tiny preset only."""

import math

import numpy as np
import pytest

import hiar.eval.drift as D
from hiar.eval import learned as L
from hiar.eval import scorers as S
from hiar.config import HiarConfig, load_config
from hiar.eval.gate import CHECK_NAMES, decide, gate_metric_keys

PROMPTS = ("a red circle moving left", "a blue square on the right")
WORDS = ("a", "red", "blue", "circle", "square", "moving", "left", "right", "on", "the", "cat", "dog")


def save_tiny_clip(root):
    """A random tiny CLIPModel + CLIPTokenizer (a byte-pair vocabulary built here, offline) + CLIPProcessor, saved
    with save_pretrained into ``root/clip`` -- the layout ClipTextAlignmentScorer reads.  Returns that folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5 without torchvision
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(WORDS))):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    out = root / "clip"
    CLIPModel(config).save_pretrained(out)
    image_processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_mean=[0.48145466, 0.4578275, 0.40821073],
                                     image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer-weights")
    save_tiny_clip(root)
    return root


def video(seed=0, frames=20, size=24):
    rng = np.random.default_rng(seed)
    base = rng.random((size, size, 3), dtype=np.float32)
    return np.stack([np.roll(base, 2 * t, axis=1) for t in range(frames)])


# ---------------------------------------------------------------------------------------------- the scorer
def test_clip_text_alignment_loads_the_saved_model_and_follows_the_prompt(clip_weights):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    scorer = L.ClipTextAlignmentScorer(clip_weights)
    assert scorer.available() == (True, "")
    frames = video()[:4]
    values = [scorer.score_prompt_segment(frames, p) for p in PROMPTS]
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in values)
    assert values[0] != pytest.approx(values[1], abs=1e-6)  # another prompt, another alignment
    with pytest.raises(TypeError, match="needs the prompt"):
        scorer.score_segment(frames)

    # the same number from the model's own forward: logits_per_text = exp(logit_scale) * cosine
    model = CLIPModel.from_pretrained(str(clip_weights / "clip"), local_files_only=True).eval()
    tokens = AutoTokenizer.from_pretrained(str(clip_weights / "clip"), local_files_only=True)([PROMPTS[0]],
                                                                                          return_tensors="pt")
    pixels = L._to_model_input(frames, 32, L._CLIP_MEAN, L._CLIP_STD)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cosine = (out.logits_per_text / model.logit_scale.exp()).mean().item()
    assert values[0] == pytest.approx(cosine, abs=1e-5)


def test_alignment_is_reported_per_segment_and_stays_out_of_the_drift_score(clip_weights):
    clip = video(seed=1)
    with_prompt = D.drift_report(clip, fps=8, weights_dir=clip_weights, prompt=PROMPTS[0])
    pixel_only = D.drift_report(clip, fps=8, scorers=[])
    assert len(with_prompt.alignment["clip_text"]) == 5 and "clip_text" not in with_prompt.skipped
    assert with_prompt.drift_score == pytest.approx(pixel_only.drift_score)  # not a drift metric
    m = with_prompt.to_metrics()
    assert m["drift/num_metrics"] == 3.0
    assert m["alignment/clip_text"] == pytest.approx(np.mean(with_prompt.alignment["clip_text"]))
    assert m["alignment/clip_text_slope"] == pytest.approx(D.fit_slope(with_prompt.alignment["clip_text"]))
    assert [f"alignment/clip_text_seg{k}" in m for k in range(5)] == [True] * 5

    no_prompt = D.drift_report(clip, fps=8, weights_dir=clip_weights)
    assert not no_prompt.alignment and "needs the prompt" in no_prompt.skipped["clip_text"]
    assert "alignment/clip_text" not in no_prompt.to_metrics()

    # aggregated over videos, and still there after the JSON round trip the evaluation actors use
    import dataclasses
    import json

    other = D.drift_report(video(seed=2), fps=8, weights_dir=clip_weights, prompt=PROMPTS[1])
    agg = D.aggregate([D.DriftReport(**json.loads(json.dumps(dataclasses.asdict(r)))) for r in (with_prompt, other)])
    assert agg.alignment["clip_text"] == pytest.approx(
        np.mean([with_prompt.alignment["clip_text"], other.alignment["clip_text"]], axis=0).tolist())
    assert "clip_text" not in agg.skipped


def test_missing_weights_are_skipped_with_the_reason_never_zero(tmp_path, monkeypatch):
    monkeypatch.delenv(S.WEIGHTS_ENV, raising=False)
    missing = tmp_path / "no-weights-here"
    ok, why = L.ClipTextAlignmentScorer(missing).available()
    assert not ok and str(missing / "clip") in why
    report = D.drift_report(video(), fps=8, weights_dir=missing, prompt=PROMPTS[0])
    assert set(report.skipped) == {"dinov2_similarity", "lpips_distance", "musiq", "clip_iqa", "clip_text"}
    assert not report.alignment and not any(k.startswith("alignment/") for k in report.to_metrics())
    ok, why = L.ClipTextAlignmentScorer().available()
    assert not ok and S.WEIGHTS_ENV in why


def test_lpips_and_musiq_without_their_library_are_skipped_with_the_reason(tmp_path):
    """Neither ``lpips`` nor ``pyiqa`` installs beside this torch (no torchvision): with their weight folders
    present the scorers say which package is missing instead of crashing or scoring 0."""
    (tmp_path / "lpips").mkdir()
    (tmp_path / "musiq").mkdir()
    for cls, module in ((L.LpipsDistanceScorer, "lpips"), (L.MusiqScorer, "pyiqa")):
        try:
            __import__(module)
        except Exception:  # noqa: BLE001 - the case this environment has
            ok, why = cls(tmp_path).available()
            assert not ok and f"{module!r} package is not importable" in why
        else:  # pragma: no cover - where the library exists the empty folder is the problem
            ok, why = cls(tmp_path).available()
            assert not ok and "could not be loaded" in why


def test_weights_directory_from_s3(s3_server, clip_weights, tmp_path, monkeypatch):
    """The same weights uploaded under an s3:// prefix load through the fetch cache and give the same value; the
    evaluation plan keeps the URI (its identity does not depend on a node's cache path) and a prefix with nothing
    under it is an input error before any compute."""
    from tests.services import random_bundle

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HIAR_CACHE_DIR", str(tmp_path / "cache"))
    client = s3_server.client()
    client.create_bucket(Bucket="hiar-weights")
    for f in sorted((clip_weights / "clip").iterdir()):
        client.upload_file(str(f), "hiar-weights", f"scorers/clip/{f.name}")
    uri = "s3://hiar-weights/scorers"

    frames = video(seed=3)[:4]
    local = L.ClipTextAlignmentScorer(clip_weights).score_prompt_segment(frames, PROMPTS[0])
    remote = L.ClipTextAlignmentScorer(uri)
    assert remote.available() == (True, ""), remote.available()
    assert remote.score_prompt_segment(frames, PROMPTS[0]) == pytest.approx(local, abs=1e-6)
    assert str(remote.root).startswith(str(tmp_path / "cache"))
    monkeypatch.setenv(S.WEIGHTS_ENV, uri)  # the environment variable takes a URI too
    assert L.ClipTextAlignmentScorer().available() == (True, "")
    monkeypatch.delenv(S.WEIGHTS_ENV)
    ok, why = L.ClipTextAlignmentScorer("s3://hiar-weights/nothing-here").available()
    assert not ok and "could not be fetched" in why

    from hiar.platform.evaluation_plan import EvalInputError, plan_evaluation

    bundle = random_bundle(tmp_path / "bundle")
    plan = plan_evaluation(load_config("tiny", [f"run_dir={tmp_path}", f"eval.scorer_weights={uri}"]), str(bundle))
    assert plan.weights_dir == uri
    with pytest.raises(EvalInputError, match="scorer weights.*no objects"):
        plan_evaluation(load_config("tiny", [f"run_dir={tmp_path}", "eval.scorer_weights=s3://hiar-weights/none"]),
                        str(bundle))


# ---------------------------------------------------------------------------------------------- evaluation
def test_non_tiny_preset_gets_no_oracle_and_the_actor_reports_alignment(clip_weights, tmp_path):
    """A non-tiny preset is never scored by the tiny world's oracle; the actor passes each item's prompt to the
    alignment scorer, so the evaluation metrics hold alignment/clip_text (and its segments) per mode."""
    from hiar.eval.summary import summarize
    from hiar.platform.evaluation import EvalActor
    from hiar.platform.evaluation_plan import plan_evaluation
    from tests.services import random_bundle

    bundle = random_bundle(tmp_path / "bundle")
    prompts = tmp_path / "prompts.txt"
    # tiny-world captions (the random bundle's text encoder knows only those words): even captions the oracle
    # could parse are not oracle-scored under a non-tiny preset
    from hiar.methods.pretrain import eval_prompts

    prompts.write_text("\n".join(eval_prompts(4, "heldout")) + "\n")
    wan = load_config("wan2.1-1.3b", [f"run_dir={tmp_path}", f"data.prompts={prompts}", "data.heldout_prompts=2",
                                      "eval.num_prompts=2"])
    plan = plan_evaluation(wan, str(bundle))
    assert not plan.use_oracle and len(plan.prompts) == 2
    assert plan_evaluation(load_config("tiny", [f"run_dir={tmp_path}"]), str(bundle)).use_oracle

    actor = EvalActor(str(bundle), load_config("tiny").to_dict(), ["hierarchical"], num_blocks=4, segments=5,
                      use_oracle=plan.use_oracle, weights_dir=str(clip_weights))
    out = actor({"index": [0, 1], "prompt": list(plan.prompts), "seed": [0, 0], "sample": [False, False]})
    metrics, reports, _, table = summarize([{k: v[i] for k, v in out.items()} for i in (0, 1)], ["hierarchical"])
    assert -1.0 <= metrics["hierarchical/alignment/clip_text"] <= 1.0
    per_video = table["values"]["hierarchical/alignment/clip_text"]  # the gate pairs these
    assert metrics["hierarchical/alignment/clip_text"] == pytest.approx(np.mean(per_video))
    assert metrics["hierarchical/alignment/clip_text_se"] == pytest.approx(abs(per_video[0] - per_video[1]) / 2)
    assert "hierarchical/alignment/clip_text_seg4" in metrics
    assert not any("/oracle/" in k for k in metrics)
    assert "dinov2_similarity" in reports["hierarchical"].skipped and "clip_text" not in reports["hierarchical"].skipped


# ---------------------------------------------------------------------------------------------- the gate
def _m(drift, dyn, align=None, mode="hierarchical", **extra):
    """Per-sample table of 4 samples with these values (no spread: tests/unit/eval/test_gate.py tests the statistics);
    ``extra``: more metrics, by their name under the mode."""
    from tests.services import sample_table

    out = {f"{mode}/drift/score": drift, f"{mode}/dynamics/dynamic_degree": dyn, f"{mode}/drift/num_metrics": 3,
           **{f"{mode}/drift/{k}": v for k, v in extra.items()}}
    if align is not None:
        out[f"{mode}/alignment/clip_text"] = align
    return sample_table(out)


WAN = ["drift", "dynamics", "alignment"]
TH = dict(max_drift_increase=0.0, max_dynamics_drop=0.05, gate_margin_se=3.0)


def test_gate_with_alignment_gated_but_skipped_decides_on_the_other_checks():
    why = {"clip_text": "weights not found at /w/clip"}
    passed = decide(_m(0.1, 0.5), _m(0.2, 0.5), checks=WAN, skip_reasons=why, **TH)
    assert passed.passed and [c.name for c in passed.checks] == ["drift", "dynamics"]
    assert len(passed.skipped) == 1 and passed.skipped[0].startswith("alignment (hierarchical/alignment/clip_text")
    assert "weights not found at /w/clip" in passed.skipped[0] and "skipped: alignment" in passed.reason
    failed = decide(_m(0.3, 0.5), _m(0.2, 0.5), checks=WAN, **TH)
    assert not failed.passed and [c.name for c in failed.checks if not c.passed] == ["drift"]
    assert failed.skipped and failed.skipped[0].startswith("alignment")  # still said, without a known reason


def test_gate_with_alignment_present_gates_it_and_one_sided_is_an_error():
    r = decide(_m(0.1, 0.5, 0.20), _m(0.2, 0.5, 0.25), checks=WAN, **TH)
    assert not r.passed and [c.name for c in r.checks if not c.passed] == ["alignment"]
    assert r.reason.startswith("gate failed: alignment: hierarchical/alignment/clip_text")
    assert decide(_m(0.1, 0.5, 0.20), _m(0.2, 0.5, 0.25), checks=WAN, max_alignment_drop=0.1, **TH).passed
    # not gated when the preset does not name it, even though both evaluations have it
    assert decide(_m(0.1, 0.5, 0.20), _m(0.2, 0.5, 0.25), checks=["drift", "dynamics"], **TH).passed
    with pytest.raises(ValueError, match="clip_text.*missing from the champion"):
        decide(_m(0.1, 0.5, 0.2), _m(0.2, 0.5), checks=WAN, **TH)


def test_gate_learned_scorer_checks_and_names():
    ch = _m(0.1, 0.5, dinov2_similarity_degradation=0.3)
    cp = _m(0.2, 0.5, dinov2_similarity_degradation=0.1)
    r = decide(ch, cp, checks=["drift", "dynamics", "dinov2", "lpips"], **TH)
    assert not r.passed and [c.name for c in r.checks if not c.passed] == ["dinov2"]
    assert [s.split(" ")[0] for s in r.skipped] == ["lpips"]
    assert decide(ch, cp, checks=["drift", "dynamics", "dinov2"], max_degradation_increase=0.5, **TH).passed
    assert gate_metric_keys("hierarchical", WAN) == {"drift": "hierarchical/drift/score",
                                                     "dynamics": "hierarchical/dynamics/dynamic_degree",
                                                     "alignment": "hierarchical/alignment/clip_text"}
    with pytest.raises(ValueError, match=r"unknown gate check\(s\) \['sharpness'\]; valid: .*alignment"):
        decide(_m(0.1, 0.5), _m(0.2, 0.5), checks=["drift", "dynamics", "sharpness"], **TH)
    with pytest.raises(ValueError, match="must include"):
        decide(_m(0.1, 0.5), _m(0.2, 0.5), checks=["drift", "alignment"], **TH)
    with pytest.raises(ValueError, match="more than once"):
        decide(_m(0.1, 0.5), _m(0.2, 0.5), checks=["drift", "dynamics", "drift"], **TH)


def test_gate_metrics_config_per_preset_and_validation():
    assert HiarConfig().registry.gate_metrics == ["drift", "dynamics", "alignment"]
    assert load_config("wan2.1-1.3b").registry.gate_metrics == ["drift", "dynamics", "alignment"]
    assert load_config("tiny").registry.gate_metrics == ["drift", "dynamics", "quality"]
    assert set(load_config("tiny").registry.gate_metrics) <= set(CHECK_NAMES)
    cfg = load_config("tiny", ["registry.gate_metrics=[drift,dynamics,quality,alignment,dinov2]"])
    assert cfg.registry.gate_metrics[-1] == "dinov2"
    with pytest.raises(ValueError, match=r"registry.gate_metrics: unknown gate check\(s\) \['oracle'\]; valid"):
        load_config("tiny", ["registry.gate_metrics=[drift,dynamics,oracle]"])
    with pytest.raises(ValueError, match="registry.gate_metrics: .*must include"):
        load_config("tiny", ["registry.gate_metrics=[drift]"])
