"""Hypothesis strategies for ``POST /v1/videos`` requests that a client may send: every JSON type in every field
(the known ones and unknown ones), edge numbers that pass a naive check (1e308, -0.0, 2**63, 5e-324, integers
of thousands of digits, NaN/Infinity literals), odd prompts (unpaired surrogates, control and invisible
characters, blank, empty, longer than the body limit), random bytes and random content types.

Each example is ``(body bytes, Content-Type header or None for no header)``. Shared by the schema's unit test
(``tests/unit/serving/test_schema.py``, no Ray) and the HTTP test against the running app (``tests/integration/serving/test_serving.py``).
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

FIELDS = ("prompt", "num_blocks", "seconds", "seed", "guidance", "stream", "return_latents")
VALID_PROMPTS = ("a blue circle moves down quickly over a black background",
                 "a red square moves left slowly over a gray background")
JSON_TYPE = "application/json"
#: one block each (the tiny model: 3 frames a block at 8 fps), so the few valid examples cost little compute
VALID_REQUESTS = ({"prompt": VALID_PROMPTS[0], "num_blocks": 1}, {"prompt": VALID_PROMPTS[1], "seconds": 0.25})

# Numbers that a bound check in the wrong place lets through: overflow to inf in arithmetic, signed zero, just past
# 64 bits, subnormal, the bounds themselves and just beyond them. The riskiest first: hypothesis favours them.
EDGE_NUMBERS = (1e308, 1.7976931348623157e308, -0.0, 2**63, 5e-324, float("nan"), float("inf"), float("-inf"),
                -1e308, 2**64, -(2**63) - 1, 10**40, 2**63 - 1, 1e-308, -5e-324, 0, 1, -1, 0.0, 0.5, 1.5, 2.0, 2**31,
                2**53 + 1, 20, 20.0, 20.000001, 256, 257, 96.0, 96.000001)
# One value of every JSON type that is not a number.
OTHER_JSON_VALUES = (None, True, False, "", "1", "NaN", [], [1], {}, {"prompt": "a"})
# Number literals json.loads reads but json.dumps never writes: digits beyond Python's int conversion limit,
# floats that round to inf or 0, signed zeros.
NUMBER_LITERALS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0", "-0.0", "0e0", "2E308",
                   "9" * 5000, "-" + "9" * 5000, "1" + "0" * 400, "1" + "0" * 308, "0." + "0" * 400 + "1",
                   "9223372036854775808", "18446744073709551616", "1.0", "1e0", "1E+2")
ODD_PROMPTS = ("", " ", "\t\n\r ", "\u3000\u00a0", "\u200b", "\ufeff", "\u200d\u200b\u2060", "\x00", "\x1b[31m",
               "blue\x00circle", "\x7f", "\x85", "\ud800", "blue \udfff circle", "\U0001f600", "e\u0301",
               "\u202eevil", "\u0130", "a" * 2001, "blue " * 400, "blue " * 5000)
NEAR_MISS_NAMES = ("Prompt", "PROMPT", "num_block", "numBlocks", "second", "seeds", "guidance_scale", "Stream",
                   "latents", "", " prompt", "prompt\x00", "\ud800", "model", "steps", "width")
CONTENT_TYPES = (None, "", JSON_TYPE, "application/json; charset=utf-8", "Application/JSON", "application/json;",
                 "application/json ", "application/json; charset=latin-1", "application/jsonx", "text/json",
                 "text/plain", "application/x-ndjson", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "*/*", "video/mp4")

any_text = st.text(st.characters(exclude_categories=()), max_size=24)  # surrogates and controls included
prompts = st.one_of(st.sampled_from(VALID_PROMPTS + ODD_PROMPTS), any_text,
                    st.builds(lambda word, n: word * n, st.sampled_from(["blue ", "a", "\u200b", "\U0001f600 "]),
                              st.integers(0, 5000)))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text, st.sampled_from(EDGE_NUMBERS))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text), inner, max_size=3)),
    max_leaves=6)
# each known field: any JSON value, or one of the right type near or past its limits
plausible = {
    "prompt": prompts,
    "num_blocks": st.one_of(st.integers(-3, 300), st.integers()),
    "seconds": st.one_of(st.floats(), st.floats(-1, 120), st.integers(-3, 10**40)),
    "seed": st.one_of(st.integers(), st.integers(2**63 - 3, 2**63 + 3)),
    "guidance": st.one_of(st.floats(), st.floats(-1, 21), st.integers(-3, 30)),
    "stream": st.booleans(),
    "return_latents": st.booleans(),
}
edge_numbers = st.sampled_from(EDGE_NUMBERS)
unknown_fields = st.dictionaries(st.one_of(st.sampled_from(NEAR_MISS_NAMES), any_text), json_values, max_size=2)
content_types = st.one_of(st.sampled_from(CONTENT_TYPES), st.from_regex(r"[!-~][ -~]{0,40}", fullmatch=True))


@st.composite
def json_objects(draw):
    """A JSON object, mostly a valid request with a few fields replaced, removed or added (so that one bad value
    is not hidden behind others), sometimes any fields at all; NaN/Infinity are written as JSON literals."""
    if draw(st.integers(0, 3)) < 3:  # hypothesis favours small draws: the common case is 0
        body = dict(draw(st.sampled_from(VALID_REQUESTS)))
        for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)):
            choice = draw(st.integers(0, 5))
            if choice < 5:
                body[name] = draw((plausible[name], edge_numbers, edge_numbers, json_values, json_values)[choice])
            else:
                body.pop(name, None)
    else:
        body = draw(st.fixed_dictionaries({}, optional={name: st.one_of(plausible[name], edge_numbers, json_values)
                                                        for name in FIELDS}))
    if draw(st.integers(0, 3)) == 3:
        extra = draw(unknown_fields)
        body = {**extra, **body} if draw(st.booleans()) else {**body, **extra}
    text = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # an unpaired surrogate unescaped: invalid UTF-8, as sent raw


@st.composite
def number_literal_bodies(draw):
    """A valid-looking request whose one field holds a number literal ``json.dumps`` would never write."""
    field = draw(st.sampled_from(FIELDS + ("extra",)))
    literal = draw(st.one_of(st.sampled_from(NUMBER_LITERALS),
                             st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
                                           fullmatch=True)))
    return _with_literal(draw(st.sampled_from(VALID_REQUESTS)), field, literal)


def _with_literal(valid: dict, field: str, literal: str) -> bytes:
    """``valid`` with ``field`` (added or replaced) holding the raw JSON ``literal``; a length replaces the other."""
    rest = {k: v for k, v in valid.items() if k != field and not (field in ("num_blocks", "seconds")
                                                                  and k in ("num_blocks", "seconds"))}
    head = json.dumps(rest)[:-1]
    return f'{head}{", " if rest else ""}"{field}": {literal}}}'.encode()


@st.composite
def any_request(draw):
    """Three in four a JSON body (mostly a near-valid request object), else random bytes; mostly sent as JSON."""
    kind = draw(st.integers(0, 7))
    if kind < 4:
        body = draw(json_objects())
    elif kind == 4:
        body = draw(number_literal_bodies())
    elif kind == 5:
        body = json.dumps(draw(json_values), allow_nan=True).encode("utf-8", "surrogatepass")
    else:
        body = draw(st.binary(max_size=256))
    content_type = draw(content_types) if draw(st.integers(0, 3)) == 3 else JSON_TYPE
    return body, content_type


def edge_case_requests() -> list[tuple[str, bytes, str | None]]:
    """Every edge number, number literal and non-number JSON type in every field (and an unknown one) of a
    valid request, every odd prompt, every content type: ``(name, body, content type)``, about 550."""
    cases = []
    for field in FIELDS + ("extra",):
        valid = VALID_REQUESTS[1] if field == "seconds" else VALID_REQUESTS[0]
        for value in EDGE_NUMBERS + OTHER_JSON_VALUES:
            cases.append((f"{field}={value!r}", _with_literal(valid, field, json.dumps(value)), JSON_TYPE))
        for literal in NUMBER_LITERALS:
            cases.append((f"{field}={literal[:20]}", _with_literal(valid, field, literal), JSON_TYPE))
    for prompt in ODD_PROMPTS:
        body = json.dumps({**VALID_REQUESTS[0], "prompt": prompt}).encode()
        cases.append((f"prompt={prompt[:20]!r}", body, JSON_TYPE))
    for content_type in CONTENT_TYPES:
        cases.append((f"content-type={content_type!r}", json.dumps(VALID_REQUESTS[0]).encode(), content_type))
    return cases
