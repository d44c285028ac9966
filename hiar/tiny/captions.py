"""The tiny world's captions: attribute values, the fixed caption grammar, parsing, and the train / held-out
prompt sets (the world that renders them: ``hiar.tiny.world``).

A caption describes one coloured shape over a flat background, in a fixed grammar::

    a <colour> <shape> moves <direction> <speed> over a <background> background
    a <colour> <shape> stays still over a <background> background

A static scene ("stays still") can be parsed -- the oracle's motion score needs it -- but it is *not* part of the
train or held-out prompt sets, so a model that stops moving is always wrong.

**Held-out split.**  A fixed set of (colour, direction, background) triples
is never used for training: triple ``(ci, di, bi)`` (indices into
``COLORS``, ``DIRECTIONS``, ``BACKGROUNDS``) is held out iff
``(ci + di + bi) % 6 == 0``.  That is 16 of 96 triples (16.7 %), i.e. 96 of
576 prompts (all shapes and speeds of those triples).  The rule holds out
exactly one colour per (direction, background) pair and at most one value
per other pair, so every single attribute value *and every pair of values*
still occurs in training: evaluation measures compositional generalisation
to unseen combinations, not unseen words.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Tuple

__all__ = [
    "SHAPES",
    "COLORS",
    "BACKGROUNDS",
    "DIRECTIONS",
    "SPEEDS",
    "STILL",
    "Attributes",
    "vocabulary",
    "parse_caption",
    "make_caption",
    "is_heldout",
    "prompt_sets",
    "all_prompts",
    "train_prompts",
    "heldout_prompts",
]

# --------------------------------------------------------------------------
# Attribute values.  Order matters: indices feed the held-out rule.
# --------------------------------------------------------------------------

SHAPES: Tuple[str, ...] = ("square", "circle", "triangle")
COLORS: Tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
BACKGROUNDS: Tuple[str, ...] = ("black", "white", "gray", "brown")
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
SPEEDS: Tuple[str, ...] = ("slowly", "quickly")

#: Marker used for both ``direction`` and ``speed`` of a static scene.
STILL = "still"

_MOVING_TEMPLATE = "a {color} {shape} moves {direction} {speed} over a {background} background"
_STILL_TEMPLATE = "a {color} {shape} stays still over a {background} background"
_GRAMMAR_HELP = (
    "expected 'a <colour> <shape> moves <direction> <speed> over a <background> background' "
    "or 'a <colour> <shape> stays still over a <background> background'"
)


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Attributes:
    """What a caption says: the scene minus its start position.

    A static scene has ``direction == speed == "still"``.
    """

    color: str
    shape: str
    background: str
    direction: str
    speed: str

    def __post_init__(self) -> None:
        _check_choice("colour", self.color, COLORS)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("background", self.background, BACKGROUNDS)
        if (self.direction == STILL) != (self.speed == STILL):
            raise ValueError(
                f"direction {self.direction!r} and speed {self.speed!r}: a static scene "
                f"needs both to be {STILL!r}, a moving one neither"
            )
        if self.direction != STILL:
            _check_choice("direction", self.direction, DIRECTIONS)
            _check_choice("speed", self.speed, SPEEDS)

    @property
    def is_static(self) -> bool:
        return self.direction == STILL

    @property
    def caption(self) -> str:
        return make_caption(self.color, self.shape, self.background, self.direction, self.speed)


def _check_choice(kind: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{value!r} is not a valid {kind}; expected one of {list(allowed)}")


def make_caption(color: str, shape: str, background: str, direction: str, speed: str) -> str:
    """Caption for the given attributes (fixed grammar; see module docstring)."""
    if direction == STILL:
        return _STILL_TEMPLATE.format(color=color, shape=shape, background=background)
    return _MOVING_TEMPLATE.format(
        color=color, shape=shape, direction=direction, speed=speed, background=background
    )


@lru_cache(maxsize=1)
def _vocabulary() -> Tuple[str, ...]:
    fixed = ("a", "moves", "over", "background", "stays", STILL)
    return tuple(sorted(set(fixed + SHAPES + COLORS + BACKGROUNDS + DIRECTIONS + SPEEDS)))


def vocabulary() -> list:
    """Sorted list of every word any valid caption can contain (static ones included)."""
    return list(_vocabulary())


def parse_caption(text: str) -> Attributes:
    """Parse a caption into :class:`Attributes`.

    Matching is case-insensitive and whitespace-tolerant, nothing else
    (no punctuation): the grammar is fixed so that a prompt has exactly one
    meaning the oracle can check.

    Raises:
        ValueError: naming the first unknown word, a word in the wrong slot,
            or describing the expected grammar when the structure is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    words = text.lower().split()
    vocab = set(_vocabulary())
    for w in words:
        if w not in vocab:
            raise ValueError(f"unknown word {w!r} in caption {text!r}; known words: {vocabulary()}")

    def slot(kind: str, value: str, allowed: Sequence[str]) -> str:
        if value not in allowed:
            raise ValueError(
                f"{value!r} is not a {kind} in caption {text!r}; expected one of {list(allowed)}"
            )
        return value

    if len(words) == 10 and words[3] == "moves":
        pattern = ["a", None, None, "moves", None, None, "over", "a", None, "background"]
    elif len(words) == 9 and words[3] == "stays":
        pattern = ["a", None, None, "stays", STILL, "over", "a", None, "background"]
    else:
        raise ValueError(f"malformed caption {text!r}: {_GRAMMAR_HELP}")
    for i, (want, got) in enumerate(zip(pattern, words)):
        if want is not None and want != got:
            raise ValueError(
                f"malformed caption {text!r}: word {i + 1} is {got!r}, expected {want!r}; {_GRAMMAR_HELP}"
            )
    color = slot("colour", words[1], COLORS)
    shape = slot("shape", words[2], SHAPES)
    if words[3] == "moves":
        direction = slot("direction", words[4], DIRECTIONS)
        speed = slot("speed", words[5], SPEEDS)
        background = slot("background colour", words[8], BACKGROUNDS)
    else:
        direction = speed = STILL
        background = slot("background colour", words[7], BACKGROUNDS)
    return Attributes(color=color, shape=shape, background=background, direction=direction, speed=speed)


# --------------------------------------------------------------------------
# Prompt sets and the held-out rule
# --------------------------------------------------------------------------


def is_heldout(color: str, direction: str, background: str) -> bool:
    """Whether the (colour, direction, background) triple is reserved for evaluation.

    Rule: ``(COLORS.index(c) + DIRECTIONS.index(d) + BACKGROUNDS.index(b)) % 6 == 0``.
    Static scenes are in neither split and are never held out.
    """
    if direction == STILL:
        return False
    return (COLORS.index(color) + DIRECTIONS.index(direction) + BACKGROUNDS.index(background)) % 6 == 0


@lru_cache(maxsize=1)
def prompt_sets() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """``(train, held-out)``: sorted caption tuples (cached; :func:`train_prompts` / :func:`heldout_prompts` copy)."""
    train, heldout = [], []
    for c, s, d, v, b in itertools.product(COLORS, SHAPES, DIRECTIONS, SPEEDS, BACKGROUNDS):
        (heldout if is_heldout(c, d, b) else train).append(make_caption(c, s, b, d, v))
    return tuple(sorted(train)), tuple(sorted(heldout))


def train_prompts() -> list:
    """Sorted captions used for training (480 moving-scene prompts)."""
    return list(prompt_sets()[0])


def heldout_prompts() -> list:
    """Sorted held-out captions (96 prompts; disjoint from :func:`train_prompts`)."""
    return list(prompt_sets()[1])


def all_prompts() -> list:
    """Every moving-scene caption, sorted (train + held-out)."""
    return sorted(train_prompts() + heldout_prompts())
