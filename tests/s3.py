"""A real S3 HTTP endpoint for the tests: moto's standalone server (`moto_server`, as s3fs's own
test suite uses), on a free port, with its buckets made through the S3 API itself."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepe_tasks.fixtures.embedded import free_port

# What every process of a test reads (the test's own, its workers): the standard AWS variables.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "deepe-test", "AWS_SECRET_ACCESS_KEY": "deepe-test-secret",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def moto_binary() -> str | None:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else shutil.which("moto_server")


class MotoServer:
    def __init__(self, log_file: Path, cpus: set[int] | None = None) -> None:
        self.port = free_port()
        self.log_file = log_file
        self.cpus = cpus  # the CPUs it may run on (a benchmark keeps it off the trainer's)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> MotoServer:
        binary = moto_binary()
        if binary is None:
            raise RuntimeError("moto_server is not installed: pip install 'moto[server]' (the test extra has it)")
        with self.log_file.open("ab") as out:
            cpus = self.cpus
            self.proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log_file.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("moto_server did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def make_bucket(self, name: str) -> None:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=self.endpoint,
                               key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        fs.mkdir(name)


@contextmanager
def aws_environment(env: dict[str, str]) -> Iterator[None]:
    """These variables in this process (for its submits and checks), restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def moto_with_bucket(log: Path, bucket: str) -> Iterator[MotoServer]:
    """A moto server with ``bucket`` made, this process's AWS variables pointing at it; stopped after."""
    server = MotoServer(log).start()
    try:
        with aws_environment(server.env):
            server.make_bucket(bucket)
            yield server
    finally:
        server.stop()
