"""One client cannot starve or bloat the API: a real `deepe api` on a private Redis, driven over
raw sockets where a client misbehaves (idle followers, huge bodies, stalled headers), and the
in-process app for the odd `Last-Event-ID`.

The server runs with small limits (4 streams per token, 64 KiB bodies, 2 s for headers) so that
each limit is reached with a handful of connections.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus
from deepe_tasks.fixtures.embedded import RedisServer, free_port
from tests.helpers import wait_for

TOKENS = [f"limits-token-{i}" for i in range(21)]
STREAMS_PER_TOKEN = 4
MAX_BODY = 64 * 1024
HEADER_TIMEOUT = 2
HANG_GUARD = 30.0  # seconds: far beyond any answer here, only there so that a failure does not hang
LAST_ID = f"{2**64 - 1}-{2**64 - 1}"


class Server:
    """`deepe api` in its own process, on a Redis of its own (a test may stop that one)."""

    def __init__(self, folder: Path) -> None:
        self.redis = RedisServer(folder=folder / "redis").start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DEEPE_REDIS_URL": self.redis.url, "DEEPE_API_TOKENS": ",".join(TOKENS),
               "DEEPE_API_MAX_STREAMS_PER_TOKEN": str(STREAMS_PER_TOKEN), "DEEPE_API_MAX_BODY_BYTES": str(MAX_BODY),
               "DEEPE_API_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "deepe_tasks", "api", "--port", str(self.port)], env=env,
                                     stdout=(folder / "api.log").open("wb"), stderr=subprocess.STDOUT)
        self.r = redis.Redis.from_url(self.redis.url, decode_responses=True)

    def healthz(self) -> int:
        return int(httpx.get(f"{self.url}/healthz", timeout=HANG_GUARD).status_code)

    def up(self) -> bool:
        try:
            return self.healthz() == 200
        except httpx.HTTPError:
            return False

    def status(self, field: str) -> int:
        """A number of the server's /proc/PID/status (Threads, VmHWM in kB ...)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def threads(self) -> int:
        return self.status("Threads")

    def peak_rss(self) -> int:
        """The server's peak resident memory so far, in bytes."""
        return self.status("VmHWM") * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.r.close()
            self.redis.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("limits"))
    try:
        wait_for(s.up, timeout=60)
        yield s
    finally:
        s.stop()


def queued_job(r: redis.Redis) -> str:
    """A queued job on a queue no worker consumes: it stays quiet."""
    job_id = f"limits-{uuid.uuid4().hex[:10]}"
    record = JobRecord(id=job_id, method="m", method_sha256="sha-" + job_id, params={}, output_dir="/o", queue="quiet-q")
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    return job_id


def ended_job(r: redis.Redis) -> str:
    job_id = queued_job(r)
    assert jobstore.claim(r, job_id, "w1", 60_000, Event(kind=EventKind.STARTED, job=job_id), worker="w1",
                          started_at=time.time(), pid=1).record is not None
    assert jobstore.finish(r, job_id, 1, Event(kind=EventKind.SUCCEEDED, job=job_id), status=JobStatus.SUCCEEDED,
                           error=None, metrics={}, output_dir="/o")
    return job_id


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    """What the server sent until ``marker`` (or until it closed the connection)."""
    deadline = time.monotonic() + HANG_GUARD
    while marker not in data:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"{marker!r} did not come within {HANG_GUARD} s; got {data[-300:]!r}") from None
        if not chunk:
            break
        data += chunk
    return data


def follow(server: Server, token: str, job_id: str, last_event_id: str | None = None) -> tuple[int, socket.socket, bytes]:
    """Open `GET /jobs/{id}/events` on a raw socket: (status, the socket, what came so far). A 200
    stream that replays is read up to its first message, so that it is known to be open."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD)
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    sock.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
                 .encode())
    head = read_until(sock, b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status == 200 and last_event_id is None:
        head = read_until(sock, b"\n\n", head.partition(b"\r\n\r\n")[2])
    return status, sock, head


def test_idle_followers_hold_no_thread_and_every_route_still_answers(server: Server) -> None:
    # Given 60 idle followers of a quiet job (more than the 40 threads of the server's pool)
    job_id = queued_job(server.r)
    threads_before = server.threads()
    followers = []
    try:
        for i in range(60):
            status, sock, first = follow(server, TOKENS[i % 20], job_id)
            followers.append(sock)
            assert status == 200 and b"event: queued" in first
        # Then they hold no thread of the server
        assert server.threads() - threads_before < 15, (threads_before, server.threads())
        # and every route still answers (a route that waited for a thread would time out here)
        assert server.healthz() == 200
        answer = httpx.get(f"{server.url}/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKENS[0]}"},
                           timeout=HANG_GUARD)
        assert answer.status_code == 200 and answer.json()["status"] == "queued"
    finally:
        for sock in followers:
            sock.close()


def test_a_follower_whose_job_expires_sees_its_stream_end(server: Server) -> None:
    # Given a follower that reconnected (Last-Event-ID) to a quiet job just before it expires
    job_id = queued_job(server.r)
    queued_id = str(server.r.xrange(keys.events(job_id))[0][0])  # type: ignore[index]
    status, sock, head = follow(server, TOKENS[20], job_id, last_event_id=queued_id)
    assert status == 200
    try:
        # When the job's record expires
        server.r.pexpire(keys.job(job_id), 1)
        # Then the stream ends (the last chunk of a chunked body), instead of keepalives for ever
        body = read_until(sock, b"\r\n0\r\n\r\n", head)
        assert body.endswith(b"\r\n0\r\n\r\n") and b"event:" not in body
    finally:
        sock.close()
    # and a stream of the job that is gone now answers 404
    gone = httpx.get(f"{server.url}/jobs/{job_id}/events", headers={"Authorization": f"Bearer {TOKENS[20]}"},
                     timeout=HANG_GUARD)
    assert gone.status_code == 404


def test_a_token_past_its_stream_limit_gets_429_until_it_closes_one(server: Server) -> None:
    job_id = queued_job(server.r)
    token = TOKENS[20]
    opened = [follow(server, token, job_id) for _ in range(STREAMS_PER_TOKEN)]
    try:
        # Given a token with as many streams open as it may hold
        assert [status for status, _, _ in opened] == [200] * STREAMS_PER_TOKEN
        # When it opens one more
        status, refused, head = follow(server, token, job_id)
        answer = read_until(refused, b"}", head)
        refused.close()
        # Then that one gets 429, with a Retry-After and a sentence that names the limit
        assert status == 429
        assert b"retry-after: " in answer.lower() and b"DEEPE_API_MAX_STREAMS_PER_TOKEN" in answer
        # while another token still gets its streams
        other_status, other, _ = follow(server, TOKENS[19], job_id)
        other.close()
        assert other_status == 200
        # When it closes one, its slot is free again
        opened.pop()[1].close()

        def reopened() -> bool:
            status, sock, _ = follow(server, token, job_id)
            if status == 200:
                opened.append((status, sock, b""))
            else:
                sock.close()
            return status == 200

        wait_for(reopened, timeout=HANG_GUARD, interval=0.2)
    finally:
        for _, sock, _ in opened:
            sock.close()


def post_huge_body(server: Server, headers: str, declared: int, send: int) -> bytes:
    """POST /jobs declaring ``declared`` bytes and sending up to ``send`` of them from a thread
    (the server may close the connection before it has them all): the answer that came back."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD)
    sock.sendall(f"POST /jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n{headers}\r\n".encode())

    def body() -> None:
        # Valid JSON of exactly `declared` bytes: a server that reads it all can parse it too.
        head, tail = b'{"method": "sft-demo", "params": {"X": "', b'"}}'
        data = memoryview(head + b"a" * (declared - len(head) - len(tail)) + tail)[:send]
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server answered and closed the connection: the rest is never read

    sender = threading.Thread(target=body, daemon=True)
    sender.start()
    try:
        return read_until(sock, b"}")
    finally:
        sender.join(HANG_GUARD)
        sock.close()


BIG = 50_000_000  # bytes: a body the server must not hold (its whole peak RSS is about 60 MB)


def test_an_unauthenticated_huge_body_gets_401_without_being_read(server: Server) -> None:
    # Given a client without a token that sends a 50 MB body
    peak_before = server.peak_rss()
    answer = post_huge_body(server, "", declared=BIG, send=BIG)
    # Then it gets 401, and the server never held the body
    assert answer.startswith(b"HTTP/1.1 401") and b"Authorization: Bearer" in answer
    assert server.peak_rss() - peak_before < BIG // 4, (peak_before, server.peak_rss())


def test_a_body_declared_over_the_limit_gets_413_before_it_is_read(server: Server) -> None:
    peak_before = server.peak_rss()
    answer = post_huge_body(server, f"Authorization: Bearer {TOKENS[0]}\r\n", declared=BIG, send=BIG)
    assert answer.startswith(b"HTTP/1.1 413") and b"DEEPE_API_MAX_BODY_BYTES" in answer
    assert server.peak_rss() - peak_before < BIG // 4, (peak_before, server.peak_rss())


def test_a_chunked_body_is_cut_off_at_the_limit(server: Server) -> None:
    # Given a body without a length, in chunks, that grows past the limit
    chunks = [b'{"method": "nope", "params": {"X": "', b"a" * MAX_BODY, b"a" * MAX_BODY, b'"}}']
    answer = httpx.post(f"{server.url}/jobs", content=iter(chunks), timeout=HANG_GUARD,
                        headers={"Authorization": f"Bearer {TOKENS[0]}", "Content-Type": "application/json"})
    # Then it gets 413, naming the limit
    assert answer.status_code == 413 and "DEEPE_API_MAX_BODY_BYTES" in answer.json()["detail"]
    # and a body within the limit is still read
    small = httpx.post(f"{server.url}/jobs", json={"method": "nope", "params": {}}, timeout=HANG_GUARD,
                       headers={"Authorization": f"Bearer {TOKENS[0]}"})
    assert small.status_code == 422 and "nope" in small.json()["detail"]


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTT", b"GET /healthz HTTP/1.1\r\nHost: api\r\n"])
def test_a_connection_that_stalls_in_its_headers_is_closed(server: Server, sent: bytes) -> None:
    # Given a client that sends part of a request's headers (or nothing) and stalls
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD)
    try:
        sock.sendall(sent)
        # Then the server closes the connection (recv sees its end, not our hang guard)
        assert read_until(sock, b"never sent") == b""
    finally:
        sock.close()


def test_an_idle_keep_alive_connection_is_closed_and_a_stalled_second_request_too(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        assert read_until(sock, b"}").startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /heal")
        assert read_until(sock, b"never sent") == b""
    finally:
        sock.close()


def test_last_event_id_of_any_shape_gets_a_clear_answer_never_a_500(http: TestClient, r: redis.Redis) -> None:
    job_id = ended_job(r)
    # The largest id there is: nothing can follow it, so nothing is replayed and the stream ends
    assert http.get(f"/jobs/{job_id}/events?follow=false", headers={"Last-Event-ID": LAST_ID}).json() == []
    whole = http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": LAST_ID})
    assert whole.status_code == 200 and "event:" not in whole.text
    # Beyond 64 bits, negative, or not an id at all: 422 with a sentence naming the header
    for bad in [f"{2**64}-0", f"0-{2**64}", "9" * 400, "-1", "1-2-3", "abc", " 5", "1e5", "١٢"]:
        for follow_ in ("false", "true"):
            headers = {"Last-Event-ID": bad.encode()}  # as bytes: a header may carry any of them
            answer = http.get(f"/jobs/{job_id}/events?follow={follow_}", headers=headers)  # type: ignore[arg-type]
            assert answer.status_code == 422, (bad, answer.status_code, answer.text[:200])
            assert "Last-Event-ID" in answer.json()["detail"], bad


def test_healthz_answers_503_while_redis_cannot_answer_and_200_once_it_can(server: Server) -> None:
    assert server.healthz() == 200
    # When Redis is stopped, then restarted on its port
    server.redis.stop()
    try:
        assert server.healthz() == 503
    finally:
        server.redis.start()
    # Then the first answers after the restart are 200 (or 503 while it loads), never a 500
    answers = [server.healthz() for _ in range(5)]
    assert set(answers) <= {200, 503} and answers[-1] == 200, answers
    # When Redis is frozen (SIGSTOP): 503, within the probe's bound rather than the hang guard
    assert server.redis.proc is not None
    os.kill(server.redis.proc.pid, signal.SIGSTOP)
    try:
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 503
    finally:
        os.kill(server.redis.proc.pid, signal.SIGCONT)
    wait_for(server.up, timeout=HANG_GUARD)
    # and a route that reads Redis while it is stopped answers 503 with a sentence, not 500
    server.redis.stop()
    try:
        jobs = httpx.get(f"{server.url}/jobs", headers={"Authorization": f"Bearer {TOKENS[0]}"}, timeout=HANG_GUARD)
        assert jobs.status_code == 503 and "cannot be reached" in jobs.json()["detail"]
    finally:
        server.redis.start()
