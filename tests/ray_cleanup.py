"""The test run's Ray stops with the run, also on Ctrl-C: a pytest plugin (tests/conftest.py loads its hooks).

Every Ray cluster the tests start, in-process (``ray.init``) or in a ``grape-rewards serve --ray`` subprocess, keeps
its sessions under one folder of this run (``RAY_TMPDIR``, which Ray reads). At the end of the run, however it ends
(pytest runs ``pytest_unconfigure`` after an interrupt too), the in-process Ray is shut down, any process still
running from that folder is stopped, and the folder is removed: nothing is left running, nothing left in /tmp.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

STOP_GRACE_S = 10.0
"""How long a Ray process has to exit after SIGTERM before it is killed."""


def processes_using(folder: str) -> list[int]:
    """The ids of this user's processes whose command line names ``folder`` (Ray's processes name their session
    folder), this one excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if folder in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop_processes(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each of ``pids``, then SIGKILL those still alive after ``grace_s``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pytest_configure(config: pytest.Config) -> None:
    if "RAY_TMPDIR" in os.environ:
        return  # the caller chose the folder (and cleans it up)
    folder = tempfile.mkdtemp(prefix="grape-ray-", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    os.environ["RAY_TMPDIR"] = folder
    config.stash[RAY_FOLDER] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(RAY_FOLDER, None)
    if folder is None:
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        serve = sys.modules.get("ray.serve")
        try:
            if serve is not None:
                serve.shutdown()
        finally:
            ray.shutdown()
    stop_processes(processes_using(folder))
    shutil.rmtree(folder, ignore_errors=True)
    os.environ.pop("RAY_TMPDIR", None)


RAY_FOLDER = pytest.StashKey[str]()
