"""The hot path's codec equals the contract: same clicks accepted with the same fields, same dead-letter
reasons, and recommendation bytes equal to pydantic's."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_schemas import BAD_CLICKS, GOOD, NOW_MS, _raw

from schemas.events import InvalidEvent, Recommendation, decode_click
from slsrec.codec import Click, RankedItem, decode_clicks, encode, encode_many, to_model
from slsrec.codec import Recommendation as FastRecommendation


def contract(raw: bytes | None) -> dict | str:
    """What the pydantic path makes of one value: the event's fields, or the dead letter's reason."""
    try:
        return decode_click(raw).model_dump()
    except InvalidEvent as e:
        return e.reason


def fast(values: list[bytes | None]) -> list[dict | str]:
    ok, bad = decode_clicks(values)
    out: list = [None] * len(values)
    for n, c in ok:
        out[n] = msgspec.structs.asdict(c)
    for n, reason in bad:
        out[n] = reason
    assert None not in out  # every value ends as an event or a reason, once
    return out


VALID = [_raw(), _raw(event_type="add_to_cart", context={"page": "home", "pos": 3, "promo": True, "w": 0.5}),
         _raw(user_id="usuário 42 ✓"), _raw(ts=NOW_MS + 60_000), _raw(context={}), _raw(context=None),
         _raw(context={"pad": "x" * 256}), _raw(event_id="e" * 128)]
EDGES = [_raw(context={"pad": "x" * 257}), _raw(context={"": 1}), _raw(context={"k" * 65: 1}),
         _raw(context={"big": 10**30}), _raw(context={"f": 1e308 * 10}), _raw(ts=True), _raw(user_id=None),
         b'{"event_id": "e", "event_id": "f", "user_id": "u", "item_id": "i", "ts": %d, "event_type": "view"}' % NOW_MS,
         b"x" * 70_000, _raw(event_type="x" * 60_000), _raw(**{"x\ny": 1}), b" " + _raw() + b"\n"]


@pytest.mark.parametrize("raw", [raw for raw, _ in BAD_CLICKS] + VALID + EDGES)
def test_the_fast_decoder_agrees_with_the_contract_on_every_kind_of_input(raw):
    assert fast([raw]) == [contract(raw)]


def test_a_batch_keeps_positions_and_reasons():
    values = [raw for raw, _ in BAD_CLICKS] + VALID
    assert fast(values) == [contract(v) for v in values]
    ok, bad = decode_clicks(values)
    assert [reason for _, reason in bad] == [reason for _, reason in BAD_CLICKS]
    assert [n for n, _ in ok] == list(range(len(BAD_CLICKS), len(values)))


ids = st.text(st.characters(codec="utf-8"), max_size=140)
context_values = st.one_of(st.text(max_size=300), st.booleans(), st.integers(), st.floats(), st.none(),
                           st.lists(st.integers(), max_size=2))
fields = st.fixed_dictionaries({}, optional={
    "event_id": st.one_of(ids, st.integers()), "user_id": ids, "item_id": st.one_of(ids, st.none()),
    "ts": st.one_of(st.integers(NOW_MS - 10**12, NOW_MS + 10**9), st.floats(), st.text(max_size=3)),
    "event_type": st.sampled_from(["view", "click", "add_to_cart", "purchase", "hover", ""]),
    "context": st.one_of(st.none(), st.dictionaries(st.text(max_size=70), context_values, max_size=18)),
    "extra": st.integers()})


@settings(max_examples=400, deadline=None)
@given(st.one_of(fields.map(lambda d: json.dumps({**GOOD, **d} if len(d) < 3 else d).encode()), st.binary(max_size=200)))
def test_any_input_gets_the_same_answer_from_both_paths(raw):
    assert fast([raw]) == [contract(raw)]


# Scores below 1e16 in size: above, pydantic writes 1e+16 where msgspec writes 1e16 (the same JSON number).
score = st.floats(-1e16, 1e16, exclude_min=True, exclude_max=True)
item_id = st.text(min_size=1, max_size=20).filter(lambda s: s.isprintable())
items = st.lists(st.builds(RankedItem, item_id, score, score, score), max_size=12)


@settings(max_examples=200, deadline=None)
@given(items, st.floats(0.0, 1.0), st.booleans(), st.text(min_size=1, max_size=10).filter(str.isprintable),
       st.lists(item_id, max_size=5))
def test_the_fast_encoder_writes_what_pydantic_writes(ranked, alpha, cold, user, session):
    now = int(time.time() * 1000)
    rec = FastRecommendation(user_id=user, event_id="e-1", items=ranked, model_version="v000001-x",
                             long_term_version=None if cold else "v000001-x", cold_start=cold, long_term="fresh",
                             alpha=alpha, short_term_items=session, unknown_item=not cold, event_ts=now - 5, emit_ts=now)
    model = to_model(rec)  # validates against the contract
    assert isinstance(model, Recommendation)
    assert encode(rec) == model.model_dump_json().encode()
    assert encode_many([rec, rec]) == [encode(rec)] * 2  # the flow's one call per micro-batch


def test_a_click_encodes_to_a_contract_event():
    c = Click("e", "u", "i", NOW_MS, "view", {"a": 1})
    assert decode_click(encode(c)).model_dump() == msgspec.structs.asdict(c)
