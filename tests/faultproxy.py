"""A TCP proxy in front of Redis that cuts a link at an exact moment of the protocol.

A worker given the proxy's URL reaches Redis only through it. When a client sends a command
that contains ``trigger`` (for instance ``SETUSER``: the worker makes the attempt's Redis user
right after its claim), the proxy drops that command, closes every connection it carries, and
refuses new ones for ``blackout`` seconds: a network blip that strikes at the same moment on
every run, which a random link cut hits only now and then.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class FaultProxy:
    def __init__(self, target_port: int, trigger: bytes, blackout: float, times: int = 1) -> None:
        self.target_port = target_port
        self.trigger = trigger
        self.blackout = blackout
        self.left = times  # how many times the trigger may still fire
        self.fired_at: list[float] = []
        self._dark_until = 0.0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]

    def url(self, target_url: str) -> str:
        """``target_url`` (a redis:// URL of the target) pointed at the proxy instead."""
        return target_url.replace(f":{self.target_port}/", f":{self.port}/")

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self._cut()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if time.monotonic() < self._dark_until:
                client.close()  # the link is down: the connection fails at once
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self.trigger in data and self._fire():
                    break  # the command never reaches Redis
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _fire(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            self.fired_at.append(time.monotonic())
            self._dark_until = time.monotonic() + self.blackout
        self._cut()
        return True

    def _cut(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            self._close(s)

    @staticmethod
    def _close(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
