"""Run the service in a background thread on a free loopback port (tests, benchmarks, notebooks).

    with ServerThread(create_app(scorer)) as server:
        httpx.post(server.url + "/get_reward", json=...)
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

RESERVED_BELOW = 20_000
"""Ports under this are left alone: well-known services, and Ray's worker ports (10002-19999 by default)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``, taken below the range the OS hands out for port 0.

    A port the OS picked for port 0 can be handed to the next process that asks, and a local Ray starts dozens
    (one took a test's port before Serve's proxy could bind it); ports between 20,000 and the OS's ephemeral range
    are only ever taken by being asked for.
    """
    low = _ephemeral_low()
    if low - RESERVED_BELOW >= 1000:
        for port in random.sample(range(RESERVED_BELOW, low), 100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # an unusual port layout: let the OS pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The lowest port the OS hands out for port 0 (Linux's default when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


class ServerThread:
    """A real uvicorn server for ``app`` in a daemon thread; :meth:`stop` drains it like SIGTERM does.

    Args:
        app: the ASGI app (usually :func:`grape_rewards.server.create_app`).
        port: the port to bind (default: a free one); reuse a stopped server's port to restart "in place".
        startup_timeout: seconds to wait for the lifespan startup (loading, warm-up).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 120.0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        service = getattr(getattr(app, "state", None), "service", None)
        limits = service.config.uvicorn_limits() if service is not None else {}
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, access_log=False,
                                proxy_headers=False, lifespan="on", timeout_graceful_shutdown=30, **limits)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} failed to start (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server on port {self.port} did not start in {self.startup_timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Turn /ready false, answer what was accepted, stop the batcher, and join the thread."""
        service = getattr(getattr(self.app, "state", None), "service", None)
        if service is not None:
            service.begin_drain()
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the server on port {self.port} did not stop in {timeout} s")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.thread.is_alive():
            self.stop()
