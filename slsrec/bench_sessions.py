"""``slsrec bench-sessions``: the serving core against the number of open sessions, and bounded memory.

The serving core alone (:class:`slsrec.serving.Recommender` on one :class:`SessionTable`, what one
worker holds), without Kafka or the dataflow, one torch thread, an ML-1M-sized SLSRec with random
weights and a published long-term state for every user. Each row runs in its own process, so that
its peak RSS is its own:

- **open N** (10k, 100k, 1M): N users open a session with one event each, then 50,000 more events
  fall on random open sessions. Reported: CPU per event at N open sessions, bytes of RSS per open
  session, and the snapshots (:class:`slsrec.serving.sessions.SessionLog`, as
  ``flows.shards.ShardLogic.snapshot`` writes them): the full base written after opening, and the
  delta after the 50,000 events (an epoch of 10 s at 5,000 events/s), each the stall it puts into
  the stream, and its size; and the first write of a new file (a re-base: a share of
  ``roll_sessions`` sessions, where it used to be all of them). Then the cost of one micro-batch of
  1, 4, 16, 64 and 512 events on random open sessions, and its least-squares line: a fixed cost per
  micro-batch plus a cost per event. The fixed part is what a paced stream pays most: its
  micro-batches are small.
- **cap**: ``--users`` distinct users (1M by default) stream through one table with
  ``max_open_sessions`` set; reported: peak RSS, and the open sessions at the end (the cap).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ML1M_USERS, ML1M_ITEMS = 6040, 3706
STEADY_EVENTS = 50_000
BATCH = 512
MICRO_BATCHES = (1, 4, 16, 64, 512)  # sizes whose cost per micro-batch is measured
MICRO_EVENTS = 8_000  # events per size (at least 20 micro-batches)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(open_sessions: int, cap: int | None) -> dict:
    """One row, in this process: ``open_sessions`` distinct users, then (without a cap) steady events."""
    import gc

    from slsrec.data import Vocab
    from slsrec.model import SLSRec, SLSRecConfig
    from slsrec.serving import Recommender, SessionTable, click
    from slsrec.serving.sessions import SessionLog
    from slsrec.store import LongTerm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SLSRec(SLSRecConfig(n_users=ML1M_USERS, n_items=ML1M_ITEMS))
    items = Vocab([str(k) for k in range(1, ML1M_ITEMS + 1)], padding=True)
    d = model.config.d
    state = LongTerm((np.random.default_rng(0).normal(size=d) / np.sqrt(d)).astype(np.float32), 0.0,
                     model.config.long_len)
    rec = Recommender(model, items, lambda users: ("v1", [state] * len(users)), "bench", gap_ms=1800_000,
                      max_segment=model.config.max_segment, max_open_sessions=cap)
    table = SessionTable()
    rng = np.random.default_rng(1)
    t0 = int(time.time() * 1000) - 3_600_000
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)  # as `slsrec serve`

    def run(users: np.ndarray, tag: str, batch: int = BATCH) -> float:
        """CPU µs per event of ``users``' events (one each, in order) in micro-batches of ``batch``."""
        item = rng.integers(1, ML1M_ITEMS + 1, len(users))
        batches = [[click(f"{tag}{k + j}", f"user{u}", str(i), t0 + k + j)
                    for j, (u, i) in enumerate(zip(users[k:k + batch].tolist(), item[k:k + batch].tolist()))]
                   for k in range(0, len(users), batch)]  # made before the clock starts
        c0 = time.process_time()
        for b in batches:
            rec.process(table, b)
        return (time.process_time() - c0) / len(users) * 1e6

    rss0 = _rss_mb()
    open_us = run(np.arange(open_sessions), "o")
    row = {"open_sessions": len(table), "users": open_sessions, "cap": cap, "open_us_per_event": open_us,
           "bytes_per_session": (_rss_mb() - rss0) * 2**20 / max(len(table), 1)}
    if cap is None:
        log = SessionLog(Path(tempfile.mkdtemp(prefix="slsrec-bench-")), rebase_bytes=2**40)
        row["base_ms"], row["base_mb"] = _timed_write(log, table)
        row["steady_us_per_event"] = run(rng.integers(0, open_sessions, STEADY_EVENTS), "s")
        row["delta_ms"], row["delta_mb"] = _timed_write(log, table)
        log.rebase()
        row["rebase_ms"], row["rebase_mb"] = _timed_write(log, table)
        shutil.rmtree(log.directory)
        per_call = [run(rng.integers(0, open_sessions, max(MICRO_EVENTS, 20 * b)), f"m{b}-", b) * b
                    for b in MICRO_BATCHES]
        row["micro_batch_us"] = per_call  # in the order of MICRO_BATCHES
        row["fixed_us"], row["per_event_us"] = _line(MICRO_BATCHES, per_call)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _line(sizes: Sequence[int], per_call: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``fixed + per_event * size`` through (micro-batch size, µs per micro-batch).

    >>> _line([1, 4, 16], [110.0, 140.0, 260.0])
    (100.0, 10.0)
    """
    per_event, fixed = np.polyfit(sizes, per_call, 1)
    return round(float(fixed), 6), round(float(per_event), 6)


def _timed_write(log, table) -> tuple[float, float]:
    w0 = time.perf_counter()
    log.write(table)
    return (time.perf_counter() - w0) * 1000, log.last_bytes / 2**20


def bench(sizes: list[int], users: int, cap: int) -> list[dict]:
    rows = []
    for n, c in [(n, None) for n in sizes] + [(users, cap)]:
        out = subprocess.run([sys.executable, "-m", "slsrec.bench_sessions", str(n), str(c or 0)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def report(rows: list[dict], sizes: list[int], users: int, cap: int, load: tuple[float, float] | None) -> str:
    lines: list[str] = [] if load is None else [f"machine   {platform.machine()}, {os.cpu_count()} cores; load average "
                                     f"{load[0]:.1f} at start, {load[1]:.1f} at end"]
    lines += ["serving core alone (no Kafka), one thread, ML-1M-sized SLSRec, one event per user to open",
             "",
             "| open sessions | µs/event opening | µs/event at N open | events per CPU s at N open | bytes per open "
             f"session (RSS) | snapshot: delta after {STEADY_EVENTS:,} events, ms (MB) | full base, ms (MB) | "
             "re-base: first write of a new file, ms (MB) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["cap"] is None:
            lines.append(f"| {r['open_sessions']:,} | {r['open_us_per_event']:.0f} | {r['steady_us_per_event']:.0f} | "
                         f"{1e6 / r['steady_us_per_event']:,.0f} | {r['bytes_per_session']:,.0f} | "
                         f"{r['delta_ms']:,.0f} ({r['delta_mb']:.1f}) | {r['base_ms']:,.0f} ({r['base_mb']:.1f}) | "
                         f"{r['rebase_ms']:,.0f} ({r['rebase_mb']:.1f}) | {r['peak_rss_mb']:,.0f} |")
    lines += ["", "cost of one micro-batch (CPU µs) on random open sessions, and its line: fixed + per event x size",
              "", "| open sessions | " + " | ".join(f"{b} event{'s' if b > 1 else ''}" for b in MICRO_BATCHES)
              + " | fixed per micro-batch | per event |", "|---" * (len(MICRO_BATCHES) + 3) + "|"]
    for r in rows:
        if r["cap"] is None:
            lines.append(f"| {r['open_sessions']:,} | " + " | ".join(f"{us:,.0f}" for us in r["micro_batch_us"])
                         + f" | {r['fixed_us']:,.0f} | {r['per_event_us']:.0f} |")
    capped = rows[-1]
    lines += ["", f"cap       {capped['users']:,} distinct users through one worker with max_open_sessions="
              f"{capped['cap']:,}: {capped['open_sessions']:,} open at the end, peak RSS {capped['peak_rss_mb']:,.0f} MB "
              f"({capped['open_us_per_event']:.0f} µs/event)",
              f"command   slsrec bench-sessions --sizes {','.join(map(str, sizes))} --users {users} --cap {cap}"]
    return "\n".join(lines)


if __name__ == "__main__":
    n, c = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(one(n, c or None)))
