"""Ctrl-C during the tests stops the run's Ray and removes its folder (tests/ray_cleanup.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_cleanup import processes_using
from test_adapters_support import REPO

HOLD_RAY = """
import os
import time
from pathlib import Path


def test_hold_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    Path(os.environ["READY_FILE"]).write_text(os.environ["RAY_TMPDIR"])
    time.sleep(600)
"""


@pytest.mark.slow
def test_ctrl_c_stops_the_runs_ray_and_removes_its_folder(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    (tmp_path / "test_hold.py").write_text(HOLD_RAY)
    ready = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    env.update(READY_FILE=str(ready), PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "ray_cleanup", "-q", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_hold.py")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        folder = ready.read_text()
        assert Path(folder, "ray").is_dir() and processes_using(folder), "Ray runs from the run's folder"
        proc.send_signal(signal.SIGINT)  # to pytest alone: Ray's processes do not see it
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in out, out[-3000:]
    assert not Path(folder).exists(), "the run's Ray folder was left behind"
    assert processes_using(folder) == [], "Ray processes were left running"
