"""hiar.io.text: the word tokenizer and the frozen tiny UMT5 text encoder (offline, CPU, a few seconds)."""

import pytest
import torch

from hiar.io.text import DEFAULT_MAX_LENGTH, TextEncoder, build_word_tokenizer
from hiar.tiny.captions import make_caption, parse_caption, train_prompts, vocabulary

CAPTION = make_caption("red", "square", "gray", "left", "slowly")  # a train prompt (not held out)


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return TextEncoder.tiny(vocabulary())


def n_tokens(prompt: str) -> int:
    return len(prompt.split()) + 1  # one token per word, plus </s>


def test_tokenizer_ids_eos_and_lowercase():
    tok = build_word_tokenizer(["red", "square"], max_length=8)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("Red  SQUARE").input_ids == [3, 4, 1]  # lower-cased, whitespace-split, T5-style </s>
    assert tok("").input_ids == [1]
    assert tok("red blue").input_ids == [3, 2, 1]  # unknown -> <unk> at the tokenizer level
    with pytest.raises(ValueError, match="special tokens"):
        build_word_tokenizer(["</s>"], 8)
    with pytest.raises(ValueError, match="split"):
        build_word_tokenizer(["don't"], 8)


def test_shape_dtype_and_zero_padding(enc):
    prompts = [CAPTION, train_prompts()[0], ""]
    emb = enc.encode(prompts)
    assert emb.shape == (3, enc.max_length, enc.d_model) == (3, 16, 64)
    assert emb.dtype == torch.float32 and not emb.requires_grad
    for row, prompt in zip(emb, prompts):
        n = n_tokens(prompt) if prompt else 1
        assert torch.all(row[n:] == 0), "padded positions must be exactly zero (WanPipeline convention)"
        assert torch.all(row[:n].norm(dim=-1) > 0)
    assert not any(p.requires_grad for p in enc.model.parameters()), "the text encoder is frozen"


def test_empty_prompt_is_the_null_embedding(enc):
    null = enc.null_embedding(2)
    assert torch.equal(null, enc.encode(["", ""]))
    assert torch.equal(null[0], enc.encode("")[0])  # a single string is a batch of one
    assert not torch.equal(null[0], enc.encode([CAPTION])[0])


def test_prompts_differing_only_in_direction_or_word_order_differ(enc):
    right = CAPTION.replace(" left ", " right ")
    parse_caption(right)  # a valid caption differing from CAPTION only in its direction
    # Same bag of words, different order (the encoder does not check grammar; order must still matter).
    reordered = "a square red moves slowly left over a gray background"
    assert sorted(reordered.split()) == sorted(CAPTION.split())
    a, b, c = enc.encode([CAPTION, right, reordered])
    assert (a - b).abs().max() > 1e-2
    assert (a - c).abs().max() > 1e-2
    # batching does not change a prompt's embedding
    torch.testing.assert_close(enc.encode([right])[0], b, rtol=0, atol=1e-5)


def test_unknown_word_raises_naming_word_and_prompt(enc):
    bad = "a purple square moves left slowly over a gray background"
    with pytest.raises(ValueError, match="purple") as info:
        enc.encode([CAPTION, bad])
    assert bad in str(info.value)


def test_too_long_prompt_raises_unless_truncating(enc):
    long = " ".join(["a"] * 20)
    with pytest.raises(ValueError, match="max_length"):
        enc.encode([long])
    emb = enc.encode([long], truncation=True)
    assert emb.shape == (1, 16, 64) and torch.all(emb[0].norm(dim=-1) > 0)


def test_tiny_is_deterministic_and_leaves_global_rng_alone(enc):
    state = torch.get_rng_state()
    again = TextEncoder.tiny(vocabulary(), seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    sd_a, sd_b = enc.model.state_dict(), again.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    other = TextEncoder.tiny(vocabulary(), seed=1)
    assert not torch.equal(other.model.shared.weight, enc.model.shared.weight)


def test_save_load_round_trip(enc, tmp_path):
    enc.save_pretrained(tmp_path)
    expected = ("tokenizer/tokenizer.json", "text_encoder/config.json", "text_encoder/model.safetensors")
    for f in expected + ("hiar_text.json",):
        assert (tmp_path / f).is_file(), f
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert (loaded.max_length, loaded.d_model) == (enc.max_length, enc.d_model)
    prompts = [CAPTION, "", train_prompts()[7]]
    assert torch.equal(loaded.encode(prompts), enc.encode(prompts))
    # max_length: argument > hiar_text.json > Wan's 512
    assert TextEncoder.from_pretrained(tmp_path, max_length=24).encode([""]).shape == (1, 24, 64)
    (tmp_path / "hiar_text.json").unlink()
    assert TextEncoder.from_pretrained(tmp_path).max_length == DEFAULT_MAX_LENGTH == 512


def test_missing_directory_or_subfolder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        TextEncoder.from_pretrained(missing)
    assert "tokenizer/ and text_encoder/" in str(info.value)
    (tmp_path / "partial" / "tokenizer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/"):
        TextEncoder.from_pretrained(tmp_path / "partial")
