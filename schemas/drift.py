"""What the flow writes to topic ``drift`` (key: worker id): a ``DriftAlert`` when a drift detector
fires, a ``HealthEvent`` when a worker enters or leaves degraded mode.

Pydantic only, so a consumer (a dashboard, the retrainer's trigger) reads them without torch.

>>> a = DriftAlert(signal="hit", detector="ADWIN", worker_id="0", ts=1_700_000_000_000,
...                n_seen=1500, window=200, mean_before=0.31, mean_after=0.12,
...                params={"delta": 0.002, "clock": 32})
>>> DriftAlert.model_validate_json(a.model_dump_json()) == a
True
>>> DriftAlert(**{**a.model_dump(), "ts": -1})
Traceback (most recent call last):
  ...
pydantic_core._pydantic_core.ValidationError: 1 validation error for DriftAlert
ts
  Input should be greater than or equal to 0 [type=greater_than_equal, input_value=-1, input_type=int]
    ...
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DriftAlert(BaseModel):
    """One detector firing on one signal of one worker.

    The window statistics say what changed: the signal's mean over the ``window`` most recent values
    (``mean_after``) against its mean over the values before them since the detector's last reset
    (``mean_before``; ``None`` when the detector fired before the window filled).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: str = Field(min_length=1)  # hit, ndcg, alpha, cold_start, unknown_item
    detector: str = Field(min_length=1)  # River class name, e.g. ADWIN, PageHinkley
    worker_id: str
    ts: int = Field(ge=0)  # epoch ms of the event that made the detector fire
    n_seen: int = Field(ge=1)  # values the detector saw since its last reset, this one included
    window: int = Field(ge=1)  # how many recent values mean_after covers
    mean_before: float | None
    mean_after: float
    params: dict[str, float | int | str]  # the detector's constructor arguments
    model_version: str | None = None  # the model version serving when it fired


class HealthEvent(BaseModel):
    """One worker entering or leaving degraded mode.

    ``degraded``: the long-term store stopped answering (down, frozen, past its deadline) or lost the
    version in use (restarted empty); recommendations go on from the short-term state and the cached
    long-term vectors, flagged in ``Recommendation.long_term``. ``recovered``: back to normal.

    >>> e = HealthEvent(state="degraded", component="redis", reason="Redis at 127.0.0.1:6379 is unreachable",
    ...                 worker_id="0", ts=1_700_000_000_000, long_term_version="v000003-20261201T000000Z")
    >>> HealthEvent.model_validate_json(e.model_dump_json()) == e
    True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: Literal["degraded", "recovered"]
    component: Literal["redis"]  # the service whose loss degrades the flow
    reason: str = Field(min_length=1, max_length=1000)  # one line; never a secret (no URL, no password)
    worker_id: str
    ts: int = Field(ge=0)  # epoch ms of the change
    long_term_version: str | None = None  # the version the worker holds (cached vectors are of it)
