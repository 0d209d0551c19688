"""A real `mlflow server` on SQLite for the tests, on a free port; it can be stopped and started
again on the same port and database (a tracking server that goes away mid-job)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from deepe_tasks import Job
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import wait_for


def mlflow_binary() -> str | None:
    here = Path(sys.executable).parent / "mlflow"
    return str(here) if here.exists() else shutil.which("mlflow")


class MlflowServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> MlflowServer:
        binary = mlflow_binary()
        if binary is None:
            raise RuntimeError("mlflow is not installed: pip install mlflow (the test extra has it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "server.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [binary, "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                 "--default-artifact-root", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def client(server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def ended_run(server: MlflowServer, job: Job, timeout: float = 90) -> Any:
    """The job's run (deepe's own), once the tracker ended it."""
    def done() -> Any:
        run_id = job.info().get("mlflow_run")
        if not run_id:
            return None
        run = client(server).get_run(run_id)
        return run if run.info.status != "RUNNING" else None
    return wait_for(done, timeout=timeout)
