"""A real local webhook receiver: an HTTP server that verifies each delivery's signature with the
`standardwebhooks` package (as a user's receiver would), and can fail, be slow, or redirect."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_" + "ZGVlcGUtdGVzdC1zZWNyZXQtZm9yLXdlYmhvb2tz"  # base64 of a test secret


class Receiver:
    def __init__(self, secret: str = SECRET, port: int = 0) -> None:
        self.secret = secret
        self.deliveries: list[dict[str, Any]] = []  # verified ones, in arrival order
        self.rejected = 0  # signatures that did not verify
        self.fail_next = 0  # answer 500 to this many more deliveries
        self.slow: float = 0.0  # seconds to wait before answering
        self.redirect_to: str | None = None
        self.lock = threading.Lock()
        self._port = port
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/hooks"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.slow:
                    time.sleep(receiver.slow)
                try:
                    payload = Webhook(receiver.secret).verify(body, dict(self.headers))
                except Exception:
                    with receiver.lock:
                        receiver.rejected += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver.lock:
                    if receiver.redirect_to:
                        self.send_response(301)
                        self.send_header("Location", receiver.redirect_to)
                        self.end_headers()
                        return
                    if receiver.fail_next > 0:
                        receiver.fail_next -= 1
                        receiver.deliveries.append({"id": self.headers["webhook-id"], "refused": True, **payload})
                        self.send_response(500)
                        self.end_headers()
                        self.wfile.write(b"try later")
                        return
                    receiver.deliveries.append({"id": self.headers["webhook-id"], "refused": False, **payload})
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def taken(self, job_id: str) -> list[dict[str, Any]]:
        """The deliveries of ``job_id`` that were taken (2xx), in order."""
        with self.lock:
            return [d for d in self.deliveries if not d["refused"] and d["data"].get("id") == job_id]

    def dump(self) -> str:
        with self.lock:
            return json.dumps([{k: d[k] for k in ("id", "type", "refused")} for d in self.deliveries])
