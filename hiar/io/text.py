"""The text path: prompts -> the per-token embeddings the DiT cross-attends to.

Both presets go through the *same* real ``transformers`` interfaces, so nothing downstream knows which one
it has:

* ``wan2.1-1.3b``: Wan2.1's UMT5-XXL encoder and its SentencePiece tokenizer, loaded from the ``tokenizer/``
  and ``text_encoder/`` folders of a local diffusers-format Wan2.1 directory (max length 512).
* ``tiny``: a word-level tokenizer over the synthetic world's closed vocabulary (built offline with the
  ``tokenizers`` library) and a small randomly initialised ``UMT5EncoderModel``. It is FROZEN, never trained:
  a random transformer already maps different captions (including the same words in another order, thanks to
  its relative-position attention bias) to clearly different embeddings, which is all the DiT needs to learn
  from; being frozen and seeded it is deterministic, so the teacher, the data it generates and the student
  all see identical conditioning.

Conventions follow diffusers' ``WanPipeline._get_t5_prompt_embeds``: tokenise with ``</s>`` appended and pad
to ``max_length``, run the encoder with the attention mask, then set every padded position to exactly zero
(diffusers trims each sequence to its real length and pads with zeros). The empty prompt ``""`` is valid: it
tokenises to just ``</s>`` and is the *unconditional* embedding used for classifier-free guidance and caption
dropout (Wan's own negative prompt is text; here the null condition is the empty string).

Both directories use the diffusers pipeline layout, so one model directory can hold ``tokenizer/``,
``text_encoder/``, ``vae/`` and ``transformer/`` side by side, exactly like a Wan2.1 checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

__all__ = [
    "PAD_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "DEFAULT_MAX_LENGTH",
    "build_word_tokenizer",
    "TextEncoder",
]

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
#: Special tokens and their ids: the same ids as T5/UMT5's SentencePiece vocabulary (pad 0, eos 1, unk 2),
#: so a tiny config is a faithful miniature of the real one.
_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: Wan2.1's ``max_sequence_length`` (its DiT was trained on 512 text tokens).
DEFAULT_MAX_LENGTH = 512

TOKENIZER_SUBFOLDER = "tokenizer"
TEXT_ENCODER_SUBFOLDER = "text_encoder"
#: Our own small metadata file next to the two subfolders (the max length is not part of either).
META_FILE = "hiar_text.json"

_LAYOUT_HELP = (
    f"expected {TOKENIZER_SUBFOLDER}/ and {TEXT_ENCODER_SUBFOLDER}/ subfolders (diffusers pipeline layout), "
    f"e.g. a Wan2.1 diffusers checkpoint or a directory written by TextEncoder.save_pretrained"
)

PathLike = Union[str, os.PathLike]


def build_word_tokenizer(words: Sequence[str], max_length: int) -> transformers.PreTrainedTokenizerFast:
    """A T5-style word-level tokenizer over a closed vocabulary, built offline.

    Why word-level: the synthetic world's captions use a few dozen fixed words, so one token per word is the
    simplest exact tokenisation, and wrapping it as a ``PreTrainedTokenizerFast`` gives it the same API
    (``save_pretrained``/``AutoTokenizer.from_pretrained``, padding, masks) as the real UMT5 tokenizer.

    Vocabulary: ``<pad>`` = 0, ``</s>`` = 1 (eos, appended to every sequence like T5), ``<unk>`` = 2, then the
    words (lower-cased, duplicates dropped, order kept). Input is lower-cased and split on whitespace (the
    ``Whitespace`` pre-tokenizer also splits punctuation off, which then maps to ``<unk>``; ``TextEncoder``
    rejects such prompts instead of encoding them).

    Raises:
        ValueError: for a non-positive ``max_length``, an empty word, a word that is a special token, or a
            word the whitespace pre-tokenizer would split (it could never be produced as one token).
    """
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    pre = pre_tokenizers.Whitespace()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for raw in words:
        word = str(raw).strip().lower()
        if not word:
            raise ValueError(f"empty word {raw!r} in the vocabulary")
        if word in _SPECIAL_TOKENS:
            raise ValueError(f"word {raw!r} clashes with the special tokens {list(_SPECIAL_TOKENS)}")
        pieces = [p for p, _ in pre.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(
                f"word {raw!r} is split by the whitespace pre-tokenizer into {pieces}; "
                f"vocabulary words must be single alphanumeric tokens"
            )
        vocab.setdefault(word, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    eos_id = vocab[EOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=int(max_length),
        padding_side="right",
    )


class TextEncoder:
    """A tokenizer plus a frozen ``UMT5EncoderModel``: prompts -> ``[B, max_length, d_model]`` float32.

    Construct with :meth:`tiny` (the tiny preset) or :meth:`from_pretrained` (a local directory: either one
    written by :meth:`save_pretrained` or a Wan2.1 diffusers checkpoint). The encoder is put in eval mode with
    gradients off: it is conditioning, never trained here.
    """

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        model: transformers.UMT5EncoderModel,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; padding to max_length needs one")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self._max_length = int(max_length)

    # ------------------------------------------------------------------ construction

    @classmethod
    def tiny(
        cls, words: Sequence[str], d_model: int = 64, num_layers: int = 2, num_heads: int = 4, d_ff: int = 128,
        max_length: int = 16, seed: int = 0,
    ) -> "TextEncoder":
        """A small random UMT5 encoder over ``words``, identical for identical arguments.

        The weights come from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so building one
        neither depends on nor disturbs the caller's global RNG state. Dropout is 0 and the model is float32.
        """
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        tokenizer = build_word_tokenizer(words, max_length)
        config = transformers.UMT5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=d_model // num_heads,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # what UMT5-XXL uses
            is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = transformers.UMT5EncoderModel(config)
        return cls(tokenizer, model.to(torch.float32), max_length=max_length)

    @classmethod
    def from_pretrained(
        cls,
        directory: PathLike,
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "TextEncoder":
        """Load ``directory/tokenizer`` and ``directory/text_encoder`` from local files only.

        Works for a directory written by :meth:`save_pretrained` and for a Wan2.1 diffusers checkpoint
        (UMT5-XXL; pass ``dtype=torch.bfloat16`` there to halve its ~22 GB float32 footprint -- outputs are
        float32 either way). ``max_length``: the argument, else the saved ``hiar_text.json``, else 512
        (Wan2.1's value). Never touches the network.

        Raises:
            FileNotFoundError: the directory or one of the two subfolders is missing.
        """
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"text encoder directory {str(root)!r} does not exist; {_LAYOUT_HELP}")
        missing = [s + "/" for s in (TOKENIZER_SUBFOLDER, TEXT_ENCODER_SUBFOLDER) if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"text encoder directory {str(root)!r} lacks {', '.join(missing)}; {_LAYOUT_HELP}"
            )
        if max_length is None:
            meta = root / META_FILE
            max_length = json.loads(meta.read_text())["max_length"] if meta.is_file() else DEFAULT_MAX_LENGTH

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only below is the real guard
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(root / TOKENIZER_SUBFOLDER), local_files_only=True
        )
        model = transformers.UMT5EncoderModel.from_pretrained(
            str(root / TEXT_ENCODER_SUBFOLDER), local_files_only=True, dtype=dtype
        )
        return cls(tokenizer, model.to(device), max_length=int(max_length))

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write ``tokenizer/``, ``text_encoder/`` (config.json + model.safetensors) and ``hiar_text.json``."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(root / TOKENIZER_SUBFOLDER))
        self.model.save_pretrained(str(root / TEXT_ENCODER_SUBFOLDER))
        (root / META_FILE).write_text(json.dumps({"max_length": self._max_length}, indent=2) + "\n")
        return root

    # ------------------------------------------------------------------ properties

    @property
    def d_model(self) -> int:
        """Embedding width (the DiT's ``text_dim``)."""
        return int(self.model.config.d_model)

    @property
    def max_length(self) -> int:
        """Sequence length of every embedding (padded with zeros)."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ encoding

    def encode(self, prompts: Union[str, Sequence[str]], truncation: bool = False) -> torch.Tensor:
        """Embed prompts: ``[B, max_length, d_model]`` float32 on the encoder's device, no grad.

        Padded positions (everything after a prompt's ``</s>``) are exactly zero, as in WanPipeline. The empty
        prompt ``""`` is allowed and gives the unconditional (null) embedding. A single string is treated as a
        batch of one.

        Raises:
            ValueError: a prompt contains words the tokenizer does not know (every such word and the prompt
                are named) -- checked before the model runs, so a typo never becomes a silent ``<unk>`` or a
                crash deep in the model; or a prompt is longer than ``max_length`` tokens (``</s>`` included)
                and ``truncation`` is False (with ``truncation=True`` it is cut like diffusers does).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        self._check_prompts(prompts, truncation)

        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self._max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden.to(torch.float32)
        # torch.where, not a multiply: padding must be exactly zero even if a padded row held inf/nan.
        return torch.where(mask.bool()[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))

    def null_embedding(self, batch: int = 1) -> torch.Tensor:
        """The unconditional embedding (``encode([""] * batch)``) for CFG and caption dropout."""
        if int(batch) < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return self.encode([""] * int(batch))

    def _check_prompts(self, prompts: list[str], truncation: bool) -> None:
        """Reject unknown words and over-long prompts with a message naming them."""
        # Offsets let us quote the offending text itself; a slow (Python) tokenizer has none, so fall back
        # to naming the unknown token.
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=fast)
        offset_rows = enc["offset_mapping"] if fast else [[(0, 0)] * len(ids) for ids in enc["input_ids"]]
        unk = self.tokenizer.unk_token_id
        for prompt, ids, offsets in zip(prompts, enc["input_ids"], offset_rows):
            if unk is not None:
                bad = [prompt[a:b] or self.tokenizer.unk_token for i, (a, b) in zip(ids, offsets) if i == unk]
                if bad:
                    unique = list(dict.fromkeys(bad))
                    raise ValueError(
                        f"unknown word(s) {unique} in prompt {prompt!r}: not in the tokenizer's vocabulary "
                        f"({len(self.tokenizer)} tokens)"
                    )
            if len(ids) > self._max_length and not truncation:
                raise ValueError(
                    f"prompt {prompt!r} is {len(ids)} tokens (with </s>), more than max_length="
                    f"{self._max_length}; shorten it or pass truncation=True"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab={len(self.tokenizer)}, d_model={self.d_model}, "
            f"layers={self.model.config.num_layers}, max_length={self.max_length})"
        )
