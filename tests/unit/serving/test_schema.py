"""The request contract of hiar/serving/schema.py on its own (no Ray, no HTTP): every malformed body is a 4xx naming
the field, never an exception that would reach the client as a 500 (issue 23)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from hiar.serving.schema import MAX_SEED, Limits, RequestError, VideoRequest, parse_request
from tests.malformed_requests import FIELDS, VALID_PROMPTS, any_request, edge_case_requests

# Small numbers of our own: 3 latent frames per block, Wan's frame rule (1 + 4 (n - 1)), 8 fps, 4 blocks at most;
# the body limit of the serve config.
LIMITS = Limits(max_blocks=4, frames_per_block=3, fps=8, num_frames_for=lambda latent: 1 + 4 * (latent - 1),
                max_prompt_chars=200, max_request_bytes=16384, max_concurrent_streams=2)
PROMPT = VALID_PROMPTS[0]


def rejection(raw: bytes, content_type: str | None = "application/json") -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(raw, content_type, LIMITS)
    return info.value


def locs(err: RequestError) -> list[list]:
    assert isinstance(err.detail, list), err.detail
    return [e["loc"] for e in err.detail]


@pytest.mark.parametrize("raw, field, kind", [
    # overflow: 1e308 s is finite, but 1e308 * fps frames is inf (the 500 of issue 23)
    (f'{{"prompt": "{PROMPT}", "seconds": 1e308}}', "seconds", "too_long"),
    (f'{{"prompt": "{PROMPT}", "seconds": 1.7976931348623157e308}}', "seconds", "too_long"),
    (f'{{"prompt": "{PROMPT}", "seconds": {"1" + "0" * 308}}}', "seconds", "too_long"),  # an int, as a float: 1e308
    (f'{{"prompt": "{PROMPT}", "seconds": 1e999}}', "seconds", "invalid_request"),  # json reads inf
    (f'{{"prompt": "{PROMPT}", "seconds": -0.0}}', "seconds", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "seconds": NaN}}', "seconds", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "seconds": Infinity}}', "seconds", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "seconds": 6}}', "seconds", "too_long"),  # 6 s > 45 frames / 8 fps
    (f'{{"prompt": "{PROMPT}", "num_blocks": 5}}', "num_blocks", "too_long"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 18446744073709551616}}', "num_blocks", "too_long"),
    # integers of more digits than Python converts: json.loads alone raises a ValueError naming no field
    (f'{{"prompt": "{PROMPT}", "num_blocks": {"9" * 5000}}}', "num_blocks", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "seed": -{"9" * 4400}}}', "seed", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "seconds": {"9" * 4400}}}', "seconds", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "seed": {2**63}}}', "seed", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "seed": -1}}', "seed", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "guidance": 1e308}}', "guidance", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "guidance": -Infinity}}', "guidance", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1.0}}', "num_blocks", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": true}}', "num_blocks", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": [1]}}', "num_blocks", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": {{"n": 1}}}}', "num_blocks", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": "1"}}', "num_blocks", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "seed": 1.0}}', "seed", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "stream": null}}', "stream", "invalid_request"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "return_latents": 1}}', "return_latents", "invalid_request"),
    ('{"prompt": null, "num_blocks": 1}', "prompt", "invalid_request"),
    ('{"prompt": ["a"], "num_blocks": 1}', "prompt", "invalid_request"),
    ('{"prompt": "", "num_blocks": 1}', "prompt", "invalid_request"),
    ('{"prompt": " \\t\\n\\u3000", "num_blocks": 1}', "prompt", "invalid_request"),  # whitespace only
    ('{"prompt": "\\u200b\\ufeff", "num_blocks": 1}', "prompt", "invalid_request"),  # invisible only
    ('{"prompt": "blue\\u0000circle", "num_blocks": 1}', "prompt", "invalid_request"),
    ('{"prompt": "\\u001b[31m blue", "num_blocks": 1}', "prompt", "invalid_request"),
    ('{"prompt": "blue \\ud800", "num_blocks": 1}', "prompt", "invalid_request"),  # an unpaired surrogate
    (f'{{"prompt": "{"a" * 201}", "num_blocks": 1}}', "prompt", "prompt_too_long"),
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "prompt": "{PROMPT}"}}', "prompt", "invalid_request"),  # twice
    (f'{{"prompt": "{PROMPT}", "num_blocks": 1, "steps": 4}}', "steps", "invalid_request"),
])
def test_a_malformed_field_is_a_422_naming_that_field(raw, field, kind):
    err = rejection(raw.encode())
    assert (err.status, err.kind) == (422, kind), err.body()
    assert [field] in locs(err), err.body()
    json.dumps(err.body(), allow_nan=False)  # what the app sends


def test_seconds_1e308_is_a_validation_error_of_the_model_itself():
    """The model rejects it given the limits, before any arithmetic outside it."""
    with pytest.raises(ValidationError) as info:
        VideoRequest.model_validate({"prompt": PROMPT, "seconds": 1e308}, context={"limits": LIMITS})
    (error,) = info.value.errors()
    assert error["loc"] == ("seconds",) and error["type"] == "too_long" and "seconds=1e+308" in error["msg"]
    assert LIMITS.blocks_for_seconds(1e308) == LIMITS.max_blocks + 1
    assert LIMITS.blocks_for_seconds(math.inf) == LIMITS.max_blocks + 1
    assert LIMITS.blocks_for_seconds(math.nan) == LIMITS.max_blocks + 1


def test_edge_values_that_are_valid_are_normalised():
    req, num_blocks = parse_request(json.dumps({"prompt": PROMPT, "seconds": 5e-324, "seed": MAX_SEED,
                                                "guidance": -0.0}).encode(), "application/json", LIMITS)
    assert num_blocks == 1 and req.seed == MAX_SEED
    assert req.guidance == 0.0 and math.copysign(1.0, req.guidance) == 1.0  # -0.0 is echoed as 0.0
    # the longest allowed length in seconds maps to the last block, just past it is too long
    assert parse_request(json.dumps({"prompt": PROMPT, "seconds": LIMITS.max_seconds}).encode(),
                         "application/json", LIMITS)[1] == LIMITS.max_blocks
    assert rejection(json.dumps({"prompt": PROMPT, "seconds": LIMITS.max_seconds + 0.01}).encode()).kind == "too_long"


@pytest.mark.parametrize("raw, content_type, status", [
    (b"\xff\xfe\xfd", "application/json", 400),
    (b'{"prompt": "a",', "application/json", 400),
    (b"[" * 3000, "application/json", 400),  # nested too deeply for json.loads
    (b"{}", None, 415),
    (b"{}", "text/plain", 415),
    (b" " * 20000, "application/json", 413),
])
def test_bodies_that_are_not_json_objects(raw, content_type, status):
    err = rejection(raw, content_type)
    assert err.status == status and err.body()["detail"], err.body()


def test_every_edge_value_in_every_field_is_accepted_or_a_4xx_naming_that_field():
    """The deterministic sweep (tests/malformed_requests.py): 1e308, -0.0, 2**63, NaN, 5000-digit literals, every
    JSON type ... in each field; odd prompts; content types. No exception escapes; a 422 names the field."""
    cases = edge_case_requests()
    wrong, accepted = [], 0
    for name, body, content_type in cases:
        field = name.split("=", 1)[0]
        try:
            parse_request(body, content_type, LIMITS)
            accepted += 1
            continue
        except RequestError as err:
            rendered = json.dumps(err.body(), ensure_ascii=True, allow_nan=False)
            if not 400 <= err.status < 500:
                wrong.append((name, err.status))
            elif field in FIELDS + ("extra",) and err.status == 422 and field not in rendered:
                wrong.append((name, "the error does not name the field", err.body()))
        except Exception as err:  # noqa: BLE001 - what the app would answer with a 500
            wrong.append((name, repr(err)[:200]))
    assert not wrong, wrong
    assert len(cases) > 500 and 0 < accepted < len(cases) / 4, accepted


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(any_request())
def test_any_body_is_accepted_or_a_4xx_never_an_exception(request):
    body, content_type = request
    try:
        parse_request(body, content_type, LIMITS)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.kind and err.detail
        json.dumps(err.body(), ensure_ascii=True, allow_nan=False)  # the app's rendering of it
