"""Runs streamrec components as child processes (``python -m stream.cli ...``) and stops them.

The demo starts the worker, the learner and serving this way, each with its log file and its own
state folder; the end-to-end tests do the same.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def spawn(run: Path, name: str, *args: str) -> subprocess.Popen:
    """Start ``streamrec <args>`` with output in ``run/<name>.log`` and state in ``run/<name>-state``."""
    with open(run / f"{name}.log", "wb") as out:
        env = dict(os.environ, STREAMREC_HOME=str(run / f"{name}-state"), PYTHONUNBUFFERED="1")
        return subprocess.Popen([sys.executable, "-m", "stream.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
