"""Keep ``slsrec serve`` running: restart it when it dies, stop it (workers included) on a signal.

The same policy as ``deploy/systemd/slsrec-serve.service`` (``Restart=on-failure``,
``RestartPreventExitStatus=2``) and docker-compose's ``restart: unless-stopped``, for where neither
runs: the demo, ``slsrec chaos`` and ``slsrec serve --supervised``.

- When the child exits, whatever is left of its process group is killed (the workers of a
  ``kill -9``-ed ``slsrec serve --processes N``), so no orphan ever consumes beside its successor.
- Exit code 0 (a clean stop) or :data:`NO_RESTART` (2: a configuration, checkpoint or credentials
  error that a restart cannot fix) ends supervision; any other exit, a crash or a kill, restarts it.
- Restarts back off: ``restart_s``, doubling up to ``max_restart_s``, back to ``restart_s`` once the
  child has run for ``stable_s``.
- :meth:`Supervisor.stop` sends SIGTERM (``slsrec serve`` forwards it to its worker processes) and
  SIGKILL to the whole process group after ``stop_timeout_s``.

>>> import sys
>>> sup = Supervisor([sys.executable, "-c", "import sys; sys.exit(2)"], restart_s=0.01)
>>> sup.run(), sup.restarts
(2, 0)
>>> sup = Supervisor([sys.executable, "-c", "import sys; sys.exit(1)"], restart_s=0.01, max_restarts=2)
>>> sup.run(), sup.restarts
(1, 2)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

NO_RESTART = 2  # slsrec's exit code for user errors (slsrec.cli.main): a restart would fail the same way


class Supervisor:
    """One supervised child process.

    Parameters
    ----------
    argv
        The command, e.g. ``["slsrec", "serve"]``.
    env
        Its environment (default: this process's).
    log_path
        Where its stdout and stderr go (appended across restarts); default: inherited.
    restart_s, max_restart_s, stable_s
        The restart backoff (see the module docstring).
    stop_timeout_s
        How long :meth:`stop` waits after SIGTERM before SIGKILL.
    max_restarts
        Give up after this many restarts (``None``: never).
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, log_path: Path | None = None,
                 restart_s: float = 1.0, max_restart_s: float = 30.0, stable_s: float = 60.0,
                 stop_timeout_s: float = 30.0, max_restarts: int | None = None):
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.restart_s = restart_s
        self.max_restart_s = max_restart_s
        self.stable_s = stable_s
        self.stop_timeout_s = stop_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._started_at = 0.0
        self._backoff = restart_s
        self._restart_at: float | None = None  # a restart is due then
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path is not None else None
        try:
            # Its own process group, so that stop() reaches its workers too, and a terminal's Ctrl-C
            # reaches it only through us (one orderly stop, not two).
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if out is not None:
                out.close()
        self._started_at = time.monotonic()
        self._restart_at = None

    def poll(self) -> int | None:
        """Restart the child if it died and a restart is due; the final exit code once supervision ends."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        _signal_group(self.proc.pid, signal.SIGKILL)  # what it left behind (workers of a killed parent)
        if self._stopping or code in (0, NO_RESTART) or (
                self.max_restarts is not None and self.restarts >= self.max_restarts):
            return code
        now = time.monotonic()
        if self._restart_at is None:
            if now - self._started_at >= self.stable_s:
                self._backoff = self.restart_s
            log.warning("%s exited with %s: restarting in %.1f s", self.argv[0], code, self._backoff)
            self._restart_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.max_restart_s)
        if now >= self._restart_at:
            self.restarts += 1
            self.start()
        return None

    def keep_running(self) -> None:
        """Start it, and restart it from a background thread until :meth:`stop` (for a program that
        does other work meanwhile, as the demo does)."""
        self.start()

        def watch() -> None:
            while not self._stopping and self.poll() is None:
                time.sleep(0.1)

        threading.Thread(target=watch, name="slsrec-supervise", daemon=True).start()

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL the group if it hangs; the child's exit code."""
        self._stopping = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s: killing it", self.argv[0], self.stop_timeout_s)
        _signal_group(self.proc.pid, signal.SIGKILL)  # whatever is left of the group (normally nothing)
        return self.proc.wait()

    def run(self) -> int:
        """Supervise until the child ends for good, or SIGTERM / SIGINT arrives (then stop it); its code."""
        stop = []
        previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop:
                code = self.poll()
                if code is not None:
                    return code
                time.sleep(0.1)
            code = self.stop()
            return 0 if code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else code
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
