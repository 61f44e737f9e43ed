"""Online quality and drift detection for the streaming flow: River detectors, one set per worker.

The flow feeds one value per signal per event (``None`` when the event says nothing about a signal):

============  ==========================================================  ================
signal        value per event                                             default detector
============  ==========================================================  ================
hit           1 if the item was in the user's previous top-K (online HR)  ADWIN
ndcg          the item's NDCG@K gain against that top-K                   none by default
alpha         fusion gate of a warm user (cold starts pass ``None``)      PageHinkley
cold_start    1 if the user has no long-term vector                       ADWIN
unknown_item  1 if the item is unknown to the model                       ADWIN
============  ==========================================================  ================

Only ``hit`` of the two quality streams is monitored by default: ``ndcg`` moves with it, and one
alert per change is enough (pass ``detectors`` to watch it too). The default parameters were chosen by measurement: see the drift section
of ``docs/benchmarks.md`` and ``python tests/test_drift.py``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

from river.base import DriftDetector
from river.drift import ADWIN, PageHinkley

from schemas.drift import DriftAlert


class Quality(NamedTuple):
    hit: bool  # the item was in the previous top-K
    ndcg: float  # 1 / log2(rank + 2) for a hit at 0-based rank, else 0


def next_item_quality(item_id: Hashable, top_k: Sequence[Hashable]) -> Quality:
    """Online HR@K and NDCG@K of one event against the top-K recommended at the event before it.

    >>> next_item_quality("b", ["a", "b", "c"])
    Quality(hit=True, ndcg=0.6309297535714575)
    >>> next_item_quality("z", ["a", "b", "c"])
    Quality(hit=False, ndcg=0.0)
    """
    try:
        rank = top_k.index(item_id)  # a C loop for lists and arrays: this runs for every event
    except ValueError:
        return Quality(False, 0.0)
    return Quality(True, 1.0 / math.log2(rank + 2))


class OnlineQuality:
    """Online HR@K and NDCG@K: was each user's next item in the top-K recommended just before it?

    Parameters
    ----------
    k
        How many of the recommended items count.

    Examples
    --------
    >>> q = OnlineQuality(k=2)
    >>> q.update("u1", "a", ["b", "c"]) is None  # first event of u1: nothing to score yet
    True
    >>> q.update("u1", "c", ["d", "e"])  # c was 2nd in the previous top-2
    Quality(hit=True, ndcg=0.6309297535714575)
    >>> q.update("u1", "e", ["a", "b", "e"])  # e was 2nd again
    Quality(hit=True, ndcg=0.6309297535714575)
    >>> q.update("u1", "e", ["f"])  # the list held e only at rank 3, beyond k
    Quality(hit=False, ndcg=0.0)
    >>> q.n, q.hr, round(q.ndcg, 4)
    (3, 0.6666666666666666, 0.4206)
    """

    def __init__(self, k: int = 10):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self._reset()

    def _reset(self) -> None:
        self._last: dict[Hashable, tuple] = {}  # user -> top-K recommended at the user's last event
        self._n = 0
        self._hits = 0
        self._ndcg = 0.0

    def update(self, user_id: Hashable, item_id: Hashable, recommended: Sequence[Hashable]) -> Quality | None:
        """Score ``item_id`` against the user's previous top-K, then remember ``recommended``.

        Returns ``None`` at a user's first event, when there is nothing to score against.
        """
        previous = self._last.get(user_id)
        self._last[user_id] = tuple(recommended[: self.k])
        if previous is None:
            return None
        q = next_item_quality(item_id, previous)
        self._n += 1
        self._hits += q.hit
        self._ndcg += q.ndcg
        return q

    @property
    def n(self) -> int:
        """Events scored so far."""
        return self._n

    @property
    def hr(self) -> float:
        """Online HR@K over all scored events (0 before any)."""
        return self._hits / self._n if self._n else 0.0

    @property
    def ndcg(self) -> float:
        """Online NDCG@K over all scored events (0 before any)."""
        return self._ndcg / self._n if self._n else 0.0


def default_detectors() -> dict[str, DriftDetector]:
    """One fresh River detector per monitored signal, with the measured defaults."""
    return {
        # Rates in [0, 1]: ADWIN's bound needs no scale. delta=0.002 gave no false alarm on 20 synthetic
        # streams, median delay 1.4k events after a taste shift; 0.02 was faster but false-alarmed.
        "hit": ADWIN(delta=0.002),
        # alpha is a continuous gate; PH's delta and threshold are in its units (measured at sd 0.15).
        # No forgetting (alpha=1): with River's 0.9999 the fading sum wanders enough to false-alarm.
        "alpha": PageHinkley(min_instances=100, delta=0.02, threshold=10.0, alpha=1.0),
        "cold_start": ADWIN(delta=0.002),
        "unknown_item": ADWIN(delta=0.002),
    }


class _Track:
    """Running state of one signal: its detector and the values seen since the detector's last reset."""

    def __init__(self, detector: DriftDetector, window: int):
        self.detector = detector
        self.n = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=window)


class DriftMonitor:
    """One worker's drift detectors: feed each event's signals, get a `DriftAlert` when one fires.

    Parameters
    ----------
    worker_id
        Written into every alert, so alerts of several workers can be told apart.
    detectors
        Signal name -> River detector used as a prototype (each monitor works on a clone). Defaults to
        `default_detectors()`. A signal that is not here is refused by `update`.
    window
        How many recent values the alert's ``mean_after`` covers.

    Examples
    --------
    The hit rate falls from 0.4 to 0.1 at event 1000; ADWIN (which checks every 32 values) fires once,
    shortly after.

    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> hits = np.r_[rng.random(1000) < 0.4, rng.random(1000) < 0.1]
    >>> monitor = DriftMonitor(worker_id="0")
    >>> for i, h in enumerate(hits):
    ...     for alert in monitor.update({"hit": h}, ts=1_000 * i):
    ...         print(i, alert.signal, alert.detector, alert.n_seen, alert.mean_before, alert.mean_after)
    1087 hit ADWIN 1088 0.394 0.1
    """

    def __init__(
        self,
        worker_id: str = "0",
        detectors: Mapping[str, DriftDetector] | None = None,
        window: int = 50,
    ):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.worker_id = worker_id
        self.detectors = default_detectors() if detectors is None else dict(detectors)
        self.window = window
        self._reset()

    def _reset(self) -> None:
        self._tracks = {name: _Track(d.clone(), self.window) for name, d in self.detectors.items()}
        self._n_alerts = 0

    def update(
        self, signals: Mapping[str, float | bool | None], ts: int, model_version: str | None = None
    ) -> list[DriftAlert]:
        """Feed one event's signals (``None`` values are skipped); return the alerts this event raised.

        ``ts`` is the event's epoch ms; ``model_version`` the version that served it.
        """
        return [a for _, a in self.update_many({k: [v] for k, v in signals.items()}, [ts], model_version)]

    def update_many(
        self, signals: Mapping[str, Sequence[float | bool | None]], ts: Sequence[int], model_version: str | None = None
    ) -> list[tuple[int, DriftAlert]]:
        """Feed a batch of events' signals, one sequence per signal aligned with ``ts``; return
        ``(event position, alert)`` in event order. The same as :meth:`update` per event, one loop per
        signal (signals are independent)."""
        unknown = signals.keys() - self._tracks.keys()
        if unknown:
            raise ValueError(f"no detector for signal(s) {sorted(unknown)}; monitored: {sorted(self._tracks)}")
        alerts = []
        for name, xs in signals.items():
            t = self._tracks[name]
            update, recent = t.detector.update, t.recent
            for n, x in enumerate(xs):
                if x is None:
                    continue
                x = float(x)
                if x != x:
                    raise ValueError(f"signal {name!r} is NaN; pass None for an event that says nothing about it")
                update(x)
                t.n += 1
                t.total += x
                recent.append(x)
                if t.detector.drift_detected:
                    alerts.append((n, self._alert(name, t, ts[n], model_version)))
                    # The River detector restarts itself at its next update; restart the statistics with it.
                    t.n, t.total = 0, 0.0
                    recent.clear()
        self._n_alerts += len(alerts)
        alerts.sort(key=lambda a: a[0])  # stable: per event, in signal order
        return alerts

    def _alert(self, name: str, t: _Track, ts: int, model_version: str | None) -> DriftAlert:
        recent_total = sum(t.recent)
        n_before = t.n - len(t.recent)
        return DriftAlert(
            signal=name,
            detector=type(t.detector).__name__,
            worker_id=self.worker_id,
            ts=ts,
            n_seen=t.n,
            window=len(t.recent),
            mean_before=round((t.total - recent_total) / n_before, 4) if n_before else None,
            mean_after=round(recent_total / len(t.recent), 4),
            params=t.detector._get_params(),
            model_version=model_version,
        )

    @property
    def n_alerts(self) -> int:
        """Alerts raised so far."""
        return self._n_alerts
