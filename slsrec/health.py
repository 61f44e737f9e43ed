"""Liveness and readiness of ``slsrec serve``, as files that a supervisor probes.

Each flow process keeps one small JSON file, ``{health_dir}/process-{id}.json``: its pid, its state
(``starting`` while the model loads, then ``serving`` or ``degraded``) and the time of its latest
heartbeat. The flow beats at every micro-batch and at every sweep (once a second while the stream is
quiet), at most once a second, so a file older than ``health_max_age_s`` means a stuck or dead process.

- **live**: every process file is younger than the maximum age (a process that is loading its model
  beats too).
- **ready**: live, and every process is past ``starting``: it consumes and recommends. Degraded
  mode is ready: it still recommends.

``slsrec health --live | --ready`` exits 0 or 1 with one line, for systemd, Docker's HEALTHCHECK or a
Kubernetes exec probe.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> now = [1000.0]
>>> beat = Heartbeat(folder, process_id=0, clock=lambda: now[0])
>>> beat.beat("starting")
>>> probe(folder, max_age_s=30, ready=True, clock=lambda: now[0])
(False, 'process 0: starting')
>>> now[0] += 0.5; beat.beat("serving"); now[0] += 0.2; beat.beat("serving")  # at most once a second
>>> probe(folder, max_age_s=30, ready=True, clock=lambda: now[0])
(True, 'ready: 1 process(es) serving')
>>> now[0] += 31
>>> probe(folder, max_age_s=30, ready=False, clock=lambda: now[0])
(False, 'process 0: no heartbeat for 31 s')
>>> beat.stop(); probe(folder, max_age_s=30, ready=False)[1].startswith("no flow process has a health file")
True
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

State = Literal["starting", "serving", "degraded"]


class Heartbeat:
    """The health file of one flow process; ``beat`` is cheap enough for the hot path.

    Parameters
    ----------
    folder
        ``settings.health_dir``.
    process_id
        The process's index in its cluster (0 alone).
    every_s
        Write at most this often unless the state changes.
    clock
        Wall-clock seconds (``time.time``); tests pass their own.
    """

    def __init__(self, folder: Path, process_id: int = 0, every_s: float = 1.0,
                 clock: Callable[[], float] = time.time):
        self.folder = Path(folder)
        self.process_id = process_id
        self.every_s = every_s
        self.clock = clock
        self.path = self.folder / f"process-{process_id}.json"
        self._written_at = -float("inf")
        self._state: State | None = None

    def beat(self, state: State = "serving") -> None:
        now = self.clock()
        if state == self._state and now - self._written_at < self.every_s:
            return
        self._written_at, self._state = now, state
        self.folder.mkdir(parents=True, exist_ok=True)
        draft = self.path.with_suffix(f".{os.getpid()}.tmp")
        draft.write_text(json.dumps({"pid": os.getpid(), "state": state, "ts": now}))
        draft.replace(self.path)  # a probe never reads half a file

    def stop(self) -> None:
        """A clean stop: the process no longer claims to be alive."""
        self.path.unlink(missing_ok=True)


def probe(folder: Path, max_age_s: float, ready: bool, clock: Callable[[], float] = time.time) -> tuple[bool, str]:
    """(ok, one line): are all the flow processes with a file in ``folder`` live (and ready)?"""
    files = sorted(Path(folder).glob("process-*.json"))
    if not files:
        return False, f"no flow process has a health file in {folder}"
    states = []
    for f in files:
        try:
            h = json.loads(f.read_text())
        except (OSError, ValueError):
            return False, f"{f.name}: unreadable"
        name = f"process {f.stem.removeprefix('process-')}"
        age = clock() - h["ts"]
        if age > max_age_s:
            return False, f"{name}: no heartbeat for {age:.0f} s"
        if ready and h["state"] == "starting":
            return False, f"{name}: starting"
        states.append(h["state"])
    if not ready:
        return True, f"live: {len(states)} process(es) ({', '.join(sorted(set(states)))})"
    return True, f"ready: {len(states)} process(es) {', '.join(sorted(set(states)))}"
