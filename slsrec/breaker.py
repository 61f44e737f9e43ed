"""A circuit breaker: stop calling a service that keeps failing, and probe it now and then.

The flow calls Redis for every micro-batch. When Redis is slow or gone, each call costs its whole
deadline; after ``failures`` failed calls in a row the breaker *opens* and calls are skipped
outright (the caller serves without the service). After ``reset_s`` it lets one probe through
(*half-open*): a success closes it, a failure opens it again for twice as long, up to
``max_reset_s`` (reconnection with exponential backoff).

>>> now = [0.0]
>>> b = CircuitBreaker(failures=2, reset_s=1.0, max_reset_s=4.0, clock=lambda: now[0])
>>> b.allow(), b.state
(True, 'closed')
>>> b.record_failure(); b.state
'closed'
>>> b.record_failure(); b.state, b.allow()
('open', False)
>>> now[0] = 1.0
>>> b.allow(), b.state, b.allow()  # one probe at a time
(True, 'half_open', False)
>>> b.record_failure(); b.state, b.open_for_s  # the probe failed: open twice as long
('open', 2.0)
>>> now[0] = 2.5
>>> b.allow()
False
>>> now[0] = 3.0
>>> b.allow(), b.record_success(), b.state, b.open_for_s
(True, None, 'closed', 1.0)
>>> b.opened, b.closed  # closed -> open and back, since the start
(1, 1)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Counts consecutive failures of one service and decides whether the next call may go.

    Parameters
    ----------
    failures
        Consecutive failed calls that open the breaker.
    reset_s
        How long it stays open before the first probe.
    max_reset_s
        The longest it stays open: each failed probe doubles the wait up to this.
    clock
        Seconds, monotonic (``time.monotonic``); tests pass their own.
    """

    def __init__(self, failures: int = 3, reset_s: float = 1.0, max_reset_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.reset_s = reset_s
        self.max_reset_s = max_reset_s
        self.clock = clock
        self.opened = 0  # times it went from closed to open
        self.closed = 0  # times it went back to closed
        self._reset()

    def _reset(self) -> None:
        self._state: State = "closed"
        self._failed = 0  # consecutive failures
        self._open_until = 0.0
        self._open_for = self.reset_s
        self._probing = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def open_for_s(self) -> float:
        """How long the breaker stays open after its next (or latest) opening."""
        return self._open_for

    def allow(self) -> bool:
        """May a call go now? In the half-open state only one probe is let through at a time."""
        if self._state == "closed":
            return True
        if self._state == "open" and self.clock() >= self._open_until:
            self._state, self._probing = "half_open", False
        if self._state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        if self._state != "closed":
            self.closed += 1
        self._reset()

    def record_failure(self) -> None:
        self._failed += 1
        if self._state == "half_open":
            self._open_for = min(self._open_for * 2, self.max_reset_s)
            self._open(self._open_for)
        elif self._state == "closed" and self._failed >= self.failures:
            self.opened += 1
            self._open(self._open_for)

    def _open(self, seconds: float) -> None:
        self._state, self._probing = "open", False
        self._open_until = self.clock() + seconds
