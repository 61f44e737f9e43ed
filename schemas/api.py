"""Contracts of the HTTP API (``slsrec api``) beyond the records it serves (those are ``schemas.events``).

>>> ApiError(error="not_found", detail="no recommendation for user u9").model_dump_json()
'{"error":"not_found","detail":"no recommendation for user u9"}'
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Id


class _Api(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiError(_Api):
    """Every error answer: a machine-readable kind and one human-readable line."""

    error: Literal["not_found", "unavailable"]
    detail: str


class ActiveUser(_Api):
    user_id: Id
    updates: int = Field(ge=1)  # recommendations in the window


class ActiveUsers(_Api):
    """The users with the most recommendations in the last ``window_s`` seconds, most first."""

    window_s: int
    users: list[ActiveUser]


class Readiness(_Api):
    """``/readyz``: each dependency ``ok`` or the reason it is not."""

    ready: bool
    kafka: str
    redis: str
