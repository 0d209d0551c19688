"""An SSE client of the API's event streams, for tests that cut Redis under a follower."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import wait_for


@contextmanager
def running_api(log: Path) -> Iterator[str]:
    """A real `deepe api` (no token) on this process's Redis settings; yields its base URL."""
    port = free_port()
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "deepe_tasks", "api", "--insecure", "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()


class Follower:
    """An SSE client of `GET /jobs/{id}/events` that reconnects with Last-Event-ID when its stream
    ends early, as a browser's EventSource does."""

    def __init__(self, base: str, job_id: str) -> None:
        self.url = f"{base}/jobs/{job_id}/events"
        self.ids: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": self.ids[-1]} if self.ids else {}
            try:
                with httpx.stream("GET", self.url, headers=headers, timeout=30) as response:
                    event_id = None
                    for line in response.iter_lines():
                        if line.startswith("id: "):
                            event_id = line[4:]
                        elif line.startswith("data: ") and event_id is not None:
                            self.ids.append(event_id)
                            self.events.append(json.loads(line[6:]))
                            if self.events[-1]["kind"] in ("succeeded", "failed", "cancelled"):
                                return
            except httpx.HTTPError:
                pass
            self.reconnects += 1
            time.sleep(0.5)
