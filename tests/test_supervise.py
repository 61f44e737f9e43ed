"""Supervision: slsrec.supervise.Supervisor, and the systemd unit that states the same policy."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import live_processes, wait_until
from slsrec import local
from slsrec.supervise import NO_RESTART, Supervisor

UNITS = local.DEPLOY / "systemd"
# A child that writes its pid to a file, starts a grandchild in its process group, and sleeps.
CHILD = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "a").write(f"{os.getpid()}\\n")
time.sleep(600)
"""


def _pids(path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process in process group ``pgid``: /proc, as zombies still count for killpg."""
    return any(group == pgid for _, _, group in live_processes())


def test_a_killed_child_is_restarted_and_stop_ends_its_whole_group(tmp_path):
    pids = tmp_path / "pids"
    sup = Supervisor([sys.executable, "-c", CHILD, str(pids)], restart_s=0.05)
    sup.start()
    assert wait_until(lambda: len(_pids(pids)) == 1)
    first = _pids(pids)[0]
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: sup.poll() is None and len(_pids(pids)) == 2)
    assert sup.restarts == 1 and sup.pid == _pids(pids)[1] != first
    assert wait_until(lambda: not _group_alive(first), 5.0)  # the killed child's own child went with it
    pgid = sup.pid
    sup.stop()
    assert wait_until(lambda: not _group_alive(pgid), 5.0)  # the grandchild too
    assert sup.poll() is not None  # stopped on purpose: no restart


def test_exit_code_2_is_final_and_other_failures_back_off(tmp_path):
    assert Supervisor([sys.executable, "-c", f"raise SystemExit({NO_RESTART})"], restart_s=0.01).run() == 2
    sup = Supervisor([sys.executable, "-c", "raise SystemExit(1)"], restart_s=0.05, max_restart_s=0.2,
                     max_restarts=4)
    t0 = time.monotonic()
    assert sup.run() == 1 and sup.restarts == 4
    assert time.monotonic() - t0 >= 0.05 + 0.1 + 0.2 + 0.2  # the waits double up to the cap


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


def test_systemd_unit_states_the_supervisor_policy():
    svc = _unit("slsrec-serve.service")["Service"]
    assert svc["ExecStart"].split()[1:] == list(local.APP_COMMANDS["flow"][1:])
    assert svc["ExecStart"].split()[0].endswith("/slsrec")
    assert (svc["Restart"], svc["RestartPreventExitStatus"]) == ("on-failure", str(NO_RESTART))
    assert (svc["KillSignal"], svc["KillMode"]) == ("SIGTERM", "mixed")
    probe = _unit("slsrec-serve-health.service")["Service"]["ExecStart"]
    assert "slsrec health --live || /bin/systemctl restart slsrec-serve" in probe


def test_systemd_units_verify():
    """systemd's own checker finds nothing but the install path, which does not exist here."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check deploy/systemd/"
    units = [str(UNITS / n) for n in ("slsrec-serve.service", "slsrec-serve-health.service",
                                      "slsrec-serve-health.timer")]
    done = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "/opt/slsrec/.venv/bin/slsrec is not executable" not in line]
    assert problems == []
