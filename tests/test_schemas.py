"""Wire contracts: every kind of bad click gets a specific reason; valid messages round-trip; the
committed JSON Schema files match the models."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from schemas import JSON_DIR, WIRE_MODELS, json_schemas
from schemas.events import (
    MAX_PAYLOAD_BYTES,
    DeadLetter,
    InvalidEvent,
    Recommendation,
    SessionClosed,
    decode_click,
)

NOW_MS = int(time.time() * 1000)
GOOD = {"event_id": "e-1", "user_id": "u-42", "item_id": "i-7", "ts": NOW_MS - 60_000, "event_type": "view"}


def _raw(**changes) -> bytes:
    event = {**GOOD, **changes}
    return json.dumps({k: v for k, v in event.items() if v is not ...}).encode()


def _reason(raw: bytes | None) -> str:
    with pytest.raises(InvalidEvent) as info:
        decode_click(raw)
    return info.value.reason


# Every kind of bad click and its reason (tests/test_codec.py feeds these to the fast decoder too).
BAD_CLICKS = [
    (b"user u-42 clicked i-7", "not JSON"),
    (b'{"event_id": "e-1", "user_id": ', "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[1, 2, 3]", "wrong shape: expected a JSON object, got array"),
    (b'"a string"', "wrong shape: expected a JSON object, got string"),
    (b"null", "wrong shape: expected a JSON object, got null"),
    (b"", "empty payload"),
    (None, "empty payload"),
    (_raw(user_id=...), "missing field: user_id"),
    (_raw(ts=...), "missing field: ts"),
    (_raw(user_id=42), "wrong type for user_id: expected string, got number"),
    (_raw(ts=str(GOOD["ts"])), "wrong type for ts: expected integer, got string"),
    (_raw(ts=GOOD["ts"] + 0.5), "wrong type for ts: expected integer, got number"),
    (_raw(event_type=3), "wrong type for event_type: expected string, got number"),
    (_raw(event_type="hover"), "unknown event_type: 'hover'"),
    (_raw(extra="x"), "unknown field: extra"),
    (_raw(**{"x\ny": 1}), r"unknown field: x\ny"),
    (_raw(ts=NOW_MS + 86_400_000), "ts in the future"),
    (_raw(ts=10**30), "ts in the future"),
    (_raw(ts=946_684_799_999), "ts before 2000-01-01"),
    (_raw(ts=-1), "ts before 2000-01-01"),
    (_raw(user_id="u\x00x"), "control characters in user_id"),
    (_raw(user_id="u-42\n"), "control characters in user_id"),
    (_raw(item_id="\x1b[31mred"), "control characters in item_id"),
    (_raw(event_id="e\x85"), "control characters in event_id"),
    (_raw(context={"a\tb": 1}), r"control characters in context.a\tb"),
    (_raw(user_id=""), "empty user_id"),
    (_raw(event_id="e" * 129), "event_id too long (129 > 128 characters)"),
    (_raw(context={str(i): i for i in range(17)}), "context too large (17 > 16 entries)"),
    (_raw(context={"page": [1]}), "wrong type for context.page: expected string, number or boolean, got array"),
]


@pytest.mark.parametrize("raw, reason", BAD_CLICKS)
def test_bad_click_gets_a_specific_reason(raw, reason):
    assert _reason(raw) == reason


def test_size_is_checked_before_parsing():
    # Not JSON either, but oversize wins: the decoder must not parse 70 kB of garbage.
    assert _reason(b"x" * 70_000) == f"payload too large (70000 bytes > {MAX_PAYLOAD_BYTES})"
    padded = _raw(context={"pad": "x" * 200})
    assert len(padded) < MAX_PAYLOAD_BYTES and decode_click(padded).context == {"pad": "x" * 200}


def test_reasons_stay_short_whatever_the_input():
    reason = _reason(_raw(event_type="x" * 60_000))
    assert reason.startswith("unknown event_type: 'xxx") and reason.endswith("...") and len(reason) == 200


def test_small_clock_skew_is_tolerated():
    assert decode_click(_raw(ts=NOW_MS + 60_000)).ts == NOW_MS + 60_000


def test_valid_click_round_trips():
    context = {"page": "home", "pos": 3, "promo": True}
    event = decode_click(_raw(event_type="add_to_cart", context=context))
    assert event.model_dump() == {**GOOD, "event_type": "add_to_cart", "context": context}
    assert decode_click(event.model_dump_json().encode()) == event
    with pytest.raises(ValueError):
        event.user_id = "other"  # frozen


def test_printable_unicode_ids_are_fine():
    assert decode_click(_raw(user_id="usuário 42 ✓")).user_id == "usuário 42 ✓"


def test_recommendation_names_one_version_or_cold_start():
    items = [{"item_id": "a", "score": 2.5, "long_score": 1.0, "short_score": 1.5},
             {"item_id": "b", "score": 1.0, "long_score": -0.5, "short_score": 1.5}]
    rec = dict(user_id="u", event_id="e", items=items, model_version="v000003-20261129T103000Z",
               long_term_version="v000003-20261129T103000Z", cold_start=False, alpha=0.4,
               short_term_items=["x", "y"], unknown_item=False, event_ts=NOW_MS, emit_ts=NOW_MS + 3)
    r = Recommendation(**rec)
    assert Recommendation.model_validate_json(r.model_dump_json()) == r
    assert Recommendation(**{**rec, "long_term_version": None, "cold_start": True, "alpha": 0.0}).cold_start
    for bad in ({"long_term_version": None}, {"cold_start": True}, {"alpha": 1.5},
                {"items": [{**items[0], "score": float("nan")}]}, {"items": [{"item_id": "a", "score": 2.5}]},
                {"short_term_items": ["bad\x00id"]}):
        with pytest.raises(ValueError):
            Recommendation(**{**rec, **bad})


def test_dead_letter_keeps_raw_bytes_exactly():
    raw = bytes(range(256))
    d = DeadLetter(raw=raw, topic="clicks", partition=3, offset=1234, reason="not JSON", ts=NOW_MS)
    wire = d.model_dump_json()
    assert "not JSON" in wire and DeadLetter.model_validate_json(wire).raw == raw


def test_session_closed_round_trips_and_checks_order():
    items = [{"item_id": "a", "ts": NOW_MS, "event_type": "view"},
             {"item_id": "b", "ts": NOW_MS + 5, "event_type": "purchase"}]
    s = SessionClosed(user_id="u", items=items, start_ts=NOW_MS, end_ts=NOW_MS + 5, reason="gap")
    assert SessionClosed.model_validate_json(s.model_dump_json()) == s
    with pytest.raises(ValueError):
        SessionClosed(user_id="u", items=items, start_ts=NOW_MS + 5, end_ts=NOW_MS, reason="gap")
    with pytest.raises(ValueError):
        SessionClosed(user_id="u", items=[], start_ts=NOW_MS, end_ts=NOW_MS, reason="gap")


def test_committed_json_schemas_match_the_models():
    committed = {p.name: p.read_text() for p in JSON_DIR.glob("*.schema.json")}
    assert committed == json_schemas(), "JSON Schemas drifted from schemas/: run `python -m schemas` and commit"
    assert len(committed) == len(WIRE_MODELS)


def test_json_schema_describes_the_click_contract():
    schema = json.loads((JSON_DIR / "click_event.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"event_id", "user_id", "item_id", "ts", "event_type"}
    assert schema["properties"]["event_type"]["enum"] == ["view", "click", "add_to_cart", "purchase"]


@pytest.mark.parametrize("change, valid", [
    ({}, True),
    ({"context": {"page": "home", "pos": 3}}, True),
    ({"user_id": "u\x07"}, False),  # the control-character rule travels in the schema
    ({"event_type": "hover"}, False),
    ({"ts": 946_684_799_999}, False),
    ({"extra": 1}, False),
    ({"user_id": 42}, False),
])
def test_a_producer_in_another_language_gets_the_same_answer(change, valid):
    """The committed schema, read by a standard JSON Schema validator, agrees with decode_click."""
    schema = json.loads((JSON_DIR / "click_event.schema.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors({**GOOD, **change}))
    assert (not errors) == valid
    if valid:
        decode_click(_raw(**change))
    else:
        with pytest.raises(InvalidEvent):
            decode_click(_raw(**change))


def test_contracts_import_without_the_ml_stack():
    import subprocess
    import sys

    code = "import sys, schemas; bad = {'torch', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
