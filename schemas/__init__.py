"""Wire contracts (pydantic only): the single source of truth for every Kafka message.

``WIRE_MODELS`` maps each top-level message to its JSON Schema file under ``schemas/json/``;
``python -m schemas`` regenerates those files and a test fails when they drift from the models.

>>> sorted(WIRE_MODELS)[:2]
['click_event', 'dead_letter']
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.drift import DriftAlert, HealthEvent
from schemas.events import (
    ClickEvent,
    DeadLetter,
    InvalidEvent,
    RankedItem,
    Recommendation,
    SessionClosed,
    SessionItem,
    decode_click,
)

__all__ = [
    "ClickEvent",
    "DeadLetter",
    "DriftAlert",
    "HealthEvent",
    "InvalidEvent",
    "JSON_DIR",
    "RankedItem",
    "Recommendation",
    "SessionClosed",
    "SessionItem",
    "WIRE_MODELS",
    "decode_click",
    "json_schemas",
]

JSON_DIR = Path(__file__).parent / "json"

# One file per message on a topic; nested models (RankedItem, SessionItem) live in their $defs.
WIRE_MODELS: dict[str, type[BaseModel]] = {
    "click_event": ClickEvent,
    "recommendation": Recommendation,
    "dead_letter": DeadLetter,
    "session_closed": SessionClosed,
    "drift_alert": DriftAlert,
    "health_event": HealthEvent,
}


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text, exactly as committed under ``schemas/json/``."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in WIRE_MODELS.items()
    }
