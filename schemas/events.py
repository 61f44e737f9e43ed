"""Wire contracts of the click stream: what producers send and what the flow writes back.

Pydantic only (no torch, no numpy), so a producer imports these without the ML stack. Every model is
frozen and forbids unknown fields. Timestamps are epoch milliseconds.

The flow decodes raw Kafka values with :func:`decode_click`, which turns every kind of bad input into
an :class:`InvalidEvent` with a short reason that ends up in the dead letter:

>>> e = decode_click(b'{"event_id": "e1", "user_id": "u1", "item_id": "i9",'
...                  b' "ts": 1700000000000, "event_type": "click"}')
>>> e.user_id, e.event_type
('u1', 'click')
>>> decode_click(b'{"event_id": "e1", "user_id": "u1", "item_id": "i9",'
...              b' "ts": 1700000000000, "event_type": "hover"}')
Traceback (most recent call last):
  ...
schemas.events.InvalidEvent: unknown event_type: 'hover'
>>> decode_click(b"")
Traceback (most recent call last):
  ...
schemas.events.InvalidEvent: empty payload
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

MAX_PAYLOAD_BYTES = 64 * 1024  # a click is ~150 bytes; anything near this is abuse or a bug
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_FUTURE_MS = 10 * 60 * 1000  # tolerated producer clock skew
MAX_ID_CHARS = 128
MAX_CONTEXT_ENTRIES = 16
MAX_REASON_CHARS = 200

EventType = Literal["view", "click", "add_to_cart", "purchase"]


# No control characters (Unicode Cc: C0, DEL, C1): they break logs, Redis keys and CSV exports.
# A pattern rather than a Python check, so that the JSON Schema carries the rule to producers.
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=NO_CONTROL)]
EpochMs = Annotated[int, Field(ge=0)]
ContextValue = Annotated[
    StrictStr, Field(max_length=256)
] | StrictBool | StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)]
ContextKey = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_CONTROL)]


class _Wire(BaseModel):
    # bytes travel as URL-safe base64 in JSON (DeadLetter.raw).
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class ClickEvent(_Wire):
    """One user interaction, the value of a message on topic ``clicks`` (key: ``user_id``).

    ``ts`` must lie between 2000-01-01 and a few minutes from now (producer clock skew).
    """

    event_id: Id  # unique per event; consumers de-duplicate on it
    user_id: Id
    item_id: Id  # unknown items are valid: new products appear all the time
    ts: int = Field(ge=MIN_TS_MS)  # epoch ms
    event_type: EventType
    context: dict[ContextKey, ContextValue] | None = Field(None, max_length=MAX_CONTEXT_ENTRIES)

    @field_validator("ts")
    @classmethod
    def _not_in_future(cls, ts: int) -> int:
        if ts > time.time() * 1000 + MAX_FUTURE_MS:
            raise PydanticCustomError("ts_in_future", "ts in the future")
        return ts


class RankedItem(_Wire):
    """One recommended item. Its score is ``long_score + short_score``: the parts the user's long-term
    interest and the current session's short-term intent contributed (``slsrec.explain``); either may
    be negative."""

    item_id: Id
    score: float = Field(allow_inf_nan=False)
    long_score: float = Field(allow_inf_nan=False)  # alpha * (long-term vector . item)
    short_score: float = Field(allow_inf_nan=False)  # (1 - alpha) * (short-term vector . item)


class Recommendation(_Wire):
    """The flow's answer to one event, on topic ``recommendations`` (key: ``user_id``).

    ``long_term_version`` names the published vector set the user's long-term vector came from; it is
    ``None`` exactly when the recommendation had no long-term vector: ``cold_start`` (the version has
    none for this user) or ``long_term == "unavailable"``.

    ``long_term`` says where the long-term side came from: ``fresh`` (Redis answered, or its cached
    answer is younger than the cache TTL), ``cached`` (Redis is slow or down: the last vector this
    worker read, however old) or ``unavailable`` (Redis is down and nothing was cached for the user:
    short-term only). The last two are the flow's degraded mode.
    """

    user_id: Id
    event_id: Id  # the event that caused it, for de-duplication after a resume (at-least-once)
    items: list[RankedItem] = Field(max_length=1000)  # best first
    model_version: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    long_term_version: str | None = Field(max_length=MAX_ID_CHARS)
    cold_start: bool
    long_term: Literal["fresh", "cached", "unavailable"] = "fresh"
    alpha: float = Field(ge=0.0, le=1.0)  # fusion gate: weight of the long-term interest
    # The session's known items the short-term vector was built from, oldest first: the current segment
    # (at most the model's max_segment items; earlier segments of a long session count as long-term).
    short_term_items: list[Id] = Field(max_length=1000)
    unknown_item: bool  # the causing event's item is not in the model's vocabulary
    event_ts: EpochMs
    emit_ts: EpochMs

    @model_validator(mode="after")
    def _one_version_or_cold(self) -> Recommendation:
        unavailable = self.long_term == "unavailable"
        if self.cold_start and unavailable:
            raise ValueError("cold_start is unknown while the long-term store is unavailable")
        if (self.cold_start or unavailable) != (self.long_term_version is None):
            raise ValueError("long_term_version must be None exactly when cold_start is set or long_term is "
                             "unavailable")
        return self


class DeadLetter(_Wire):
    """An input message the flow could not use, on topic ``clicks.dlq``, with why.

    ``raw`` is the message value byte for byte (URL-safe base64 in JSON); ``partition`` and ``offset``
    are ``None`` for errors that the Kafka client reports without a message.
    """

    raw: bytes
    topic: str
    partition: int | None = Field(ge=0)
    offset: int | None = Field(ge=0)
    reason: str = Field(min_length=1, max_length=1000)
    ts: EpochMs  # when it was dead-lettered


class SessionItem(_Wire):
    item_id: Id
    ts: EpochMs
    event_type: EventType


class SessionClosed(_Wire):
    """A finished session, on topic ``sessions``: the history that long-term retraining learns from."""

    user_id: Id
    items: list[SessionItem] = Field(min_length=1)  # in arrival order
    start_ts: EpochMs
    end_ts: EpochMs
    reason: Literal["gap", "shutdown", "evicted"]  # inactivity, flow stopped, state bound reached

    @model_validator(mode="after")
    def _ordered(self) -> SessionClosed:
        if self.end_ts < self.start_ts:
            raise ValueError("end_ts before start_ts")
        return self


class InvalidEvent(ValueError):
    """A click message that cannot be used; ``reason`` is short and goes into the dead letter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_click(raw: bytes | None) -> ClickEvent:
    """Decode and validate one Kafka message value as a :class:`ClickEvent`.

    Raises
    ------
    InvalidEvent
        With the first problem found, e.g. ``not JSON``, ``missing field: user_id``,
        ``ts in the future``, ``payload too large (70000 bytes > 65536)``.

    Examples
    --------
    >>> decode_click(b'{"event_id": "e1"}')
    Traceback (most recent call last):
      ...
    schemas.events.InvalidEvent: missing field: user_id
    """
    if not raw:
        raise InvalidEvent("empty payload")
    if len(raw) > MAX_PAYLOAD_BYTES:  # before parsing: never spend CPU on a huge payload
        raise InvalidEvent(f"payload too large ({len(raw)} bytes > {MAX_PAYLOAD_BYTES})")
    try:
        # Strict: a producer that sends "ts": "1700..." or "user_id": 42 has a bug worth seeing.
        return ClickEvent.model_validate_json(raw, strict=True)
    except ValidationError as e:
        reason = _reason(e.errors()[0])
        # Reasons quote the input; a 60 kB bogus field name must not make a 60 kB dead-letter reason.
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        raise InvalidEvent(reason) from None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _reason(err: ErrorDetails) -> str:
    """One pydantic error as a short, specific dead-letter reason."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
    field = ".".join(str(p) for p in loc[:2])  # context errors add the union member: drop it
    field = "".join(c if c.isprintable() else repr(c)[1:-1] for c in field)  # never echo control chars
    if kind == "json_invalid":
        return "not JSON"
    if kind in ("model_type", "model_attributes_type"):
        return f"wrong shape: expected a JSON object, got {_json_type(value)}"
    if kind == "missing":
        return f"missing field: {field}"
    if kind == "extra_forbidden":
        return f"unknown field: {field}"
    if kind == "literal_error":
        if isinstance(value, str):
            return f"unknown {field}: {value!r}"
        return f"wrong type for {field}: expected string, got {_json_type(value)}"
    if kind == "greater_than_equal" and loc == ("ts",):
        return "ts before 2000-01-01"
    if kind == "ts_in_future":
        return "ts in the future"
    if kind == "string_pattern_mismatch":  # NO_CONTROL is the only pattern
        return f"control characters in {field}"
    if kind == "string_too_short":
        return f"empty {field}"
    if kind == "string_too_long":
        return f"{field} too long ({len(value)} > {err['ctx']['max_length']} characters)"
    if kind == "too_long":
        return f"{field} too large ({len(value)} > {err['ctx']['max_length']} entries)"
    if loc[:1] == ("context",) and kind.endswith("_type"):
        return f"wrong type for {field}: expected string, number or boolean, got {_json_type(value)}"
    if kind.endswith("_type") or kind == "int_from_float":
        expected = err["msg"].removeprefix("Input should be a valid ")
        return f"wrong type for {field}: expected {expected}, got {_json_type(value)}"
    return f"invalid {field}: {err['msg']}"
