"""Webhooks: each state change of a job posted to the URLs that want it, signed as the Standard
Webhooks specification says, and never lost.

- **The outbox.** Every transition of the state machine (the Lua of `core/lua`) appends
  ``{job, type}`` to the stream ``deepe:webhooks:outbox`` in the same script that changes the
  state, whenever webhooks are on (``deepe:webhooks:on``: some submitter or worker has
  DEEPE_WEBHOOK_URLS) or the job has a URL of its own. A state change and its delivery are thus
  written together: a worker SIGKILLed right after a change leaves the delivery to the others.
- **The dispatcher.** One worker at a time (a lock renewed each round) reads the outbox from
  its start and sends, each round, the oldest undelivered entry of each job (so a job's
  deliveries go in order), several jobs at once (a slow receiver holds up its own job only).
  Only workers with DEEPE_WEBHOOK_URLS or DEEPE_WEBHOOK_SECRET dispatch (set them alike on every
  worker); an entry with no URL to go to (webhooks turned off since) is dropped.
  An entry is deleted once every URL took it (2xx); a failure is retried with exponential
  backoff (the same ``webhook-id``) for DEEPE_WEBHOOK_RETRY_HOURS, then moved to the capped
  stream of failed deliveries, counted in /metrics, and listed and re-sent by `deepe webhooks`.
- **Safe.** Only http and https URLs, each of whose addresses is public unless
  DEEPE_WEBHOOK_ALLOW_PRIVATE=true; checked at submit and again before each request (a name that
  resolves elsewhere later); redirects are not followed; a receiver's answer is kept as a short
  excerpt only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import redis

from deepe_tasks.core import keys
from deepe_tasks.core.errors import InvalidParams, JobNotFound
from deepe_tasks.core.records import JobRecord, mask_secrets
from deepe_tasks.core.settings import Settings

log = logging.getLogger(__name__)

MAX_URL = 2048
ROUND_ENTRIES = 500  # outbox entries looked at per round
LOCK_MS = 15_000
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 3600.0  # seconds before the second try, doubled up to this
FAILED_MAXLEN = 10_000
EXCERPT = 200  # characters of a receiver's answer kept with a failure
SENDERS = 8  # deliveries of different jobs sent at once


class RefusedRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl[:EXCERPT]} not followed", headers, fp)


_opener = urllib.request.build_opener(RefusedRedirect)


def check_url(url: str, allow_private: bool, resolve: bool = True) -> str:
    """``url`` if a webhook may be posted to it; InvalidParams with the reason and the fix if not."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise InvalidParams(f"the webhook URL is empty or longer than {MAX_URL} characters; give an http(s) URL.")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParams(f"the webhook URL {url[:EXCERPT]!r} is not an http or https URL with a host; give one "
                            "such as https://hooks.example.com/deepe.")
    if allow_private or not resolve:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as e:
        raise InvalidParams(f"the webhook host {parts.hostname!r} cannot be resolved ({e}); give a host that "
                            "resolves.") from e
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global or address.is_multicast:
            raise InvalidParams(f"the webhook URL {url[:EXCERPT]!r} leads to {address}, a private, loopback or "
                                "link-local address, which webhooks may not call (a token holder must not reach "
                                "the cluster's internals). Give a public URL, or set DEEPE_WEBHOOK_ALLOW_PRIVATE=true "
                                "where receivers are internal.")
    return url


def configured(settings: Settings) -> bool:
    """Whether this process sends webhooks: it has DEEPE_WEBHOOK_URLS or DEEPE_WEBHOOK_SECRET
    (the same on every worker). A worker with neither leaves the outbox to those that have them."""
    return bool(settings.webhook_url_list) or settings.webhook_secret is not None


ON_FOR = 24 * 3600  # seconds the outbox stays on after the last process with webhook URLs said so


def enable(client: redis.Redis, settings: Settings) -> None:
    """Keep the outbox on where this process has DEEPE_WEBHOOK_URLS (each submit, each dispatcher
    round); once no process has them, it turns itself off a day later (the flag expires)."""
    if settings.webhook_url_list:
        client.set(keys.WEBHOOKS_ON, "1", ex=ON_FOR)


def _message_id(entry_id: str, fields: dict[str, str]) -> str:
    return fields.get("msg") or f"msg_{entry_id.replace('-', '_')}"


def body(kind: str, job_id: str, record: JobRecord | None) -> bytes:
    data = mask_record(record) if record is not None else {"id": job_id}
    return json.dumps({"type": kind, "timestamp": datetime.now(UTC).isoformat(), "data": data},
                      default=str).encode()


def mask_record(record: JobRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    data["params"] = mask_secrets(data["params"])
    data.pop("pid", None)
    return data


def post(url: str, msg_id: str, payload: bytes, settings: Settings) -> str | None:
    """Send one delivery; None if the receiver took it (2xx), else why not (short)."""
    from standardwebhooks.webhooks import Webhook

    try:
        check_url(url, settings.webhook_allow_private)
    except InvalidParams as e:
        return str(e)[:EXCERPT]
    at = datetime.now(UTC)
    headers = {"Content-Type": "application/json", "User-Agent": "deepe-webhooks",
               "webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp()))}
    if settings.webhook_secret is not None:
        headers["webhook-signature"] = Webhook(settings.webhook_secret.get_secret_value()).sign(msg_id, at, payload.decode())
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=settings.webhook_timeout) as answer:
            answer.read(EXCERPT)
            return None
    except urllib.error.HTTPError as e:
        excerpt = e.read(EXCERPT).decode(errors="replace") if e.fp is not None else ""
        return f"HTTP {e.code}: {(excerpt or str(e.reason))[:EXCERPT]}"
    except Exception as e:  # refused, timed out, reset: tried again later
        return f"{type(e).__name__}: {e}"[:EXCERPT]


class Dispatcher:
    """Sends the outbox, one worker at a time (``holder`` names this one)."""

    def __init__(self, client: redis.Redis, settings: Settings, holder: str) -> None:
        self.client, self.settings, self.holder = client, settings, holder
        self.pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="deepe-webhook")

    def _lead(self) -> bool:
        if self.client.set(keys.WEBHOOK_LOCK, self.holder, px=LOCK_MS, nx=True):
            return True
        if self.client.get(keys.WEBHOOK_LOCK) == self.holder:  # (a client with decode_responses)
            self.client.pexpire(keys.WEBHOOK_LOCK, LOCK_MS)
            return True
        return False

    def round(self, now: float | None = None) -> dict[str, int]:
        """One round: each job's oldest due delivery sent. What it did, counted."""
        now = time.time() if now is None else now
        done = {"delivered": 0, "retried": 0, "failed": 0}
        if not self._lead():
            return done
        entries: Any = self.client.xrange(keys.WEBHOOK_OUTBOX, count=ROUND_ENTRIES)
        if not entries:
            return done
        states: dict[str, Any] = dict(zip([e[0] for e in entries],
                          self.client.hmget(keys.WEBHOOK_RETRIES, [e[0] for e in entries]), strict=True))
        seen: set[str] = set()
        due = []
        for entry_id, fields in entries:
            job = fields.get("job", "")
            if job in seen:
                continue  # a job's deliveries go in order: its older one first
            seen.add(job)
            state = json.loads(states.get(entry_id) or "{}")
            if state.get("next_at", 0) <= now:
                due.append((entry_id, fields, state))
        for (entry_id, fields, state), error in zip(due, self.pool.map(self._send, due), strict=True):
            done[self._settle(entry_id, fields, state, error, now)] += 1
        return done

    def _send(self, item: tuple[str, dict[str, str], dict[str, Any]]) -> str | None:
        entry_id, fields, state = item
        job = fields.get("job", "")
        try:
            raw: Any = self.client.hgetall(keys.job(job))
            record: JobRecord | None = JobRecord.from_redis(raw) if raw else None
        except Exception:  # expired meanwhile: the id alone
            record = None
        urls = [*self.settings.webhook_url_list, *([record.webhook] if record and record.webhook else [])]
        payload = body(fields.get("type", "job.unknown"), job, record)
        errors = []
        for url in urls:
            if url in state.get("done", []):
                continue
            error = post(url, _message_id(entry_id, fields), payload, self.settings)
            if error is None:
                state.setdefault("done", []).append(url)
            else:
                errors.append(f"{urllib.parse.urlsplit(url).netloc}: {error}")
        return "; ".join(errors) or None

    def _settle(self, entry_id: str, fields: dict[str, str], state: dict[str, Any], error: str | None,
                now: float) -> str:
        pipe = self.client.pipeline(transaction=True)
        if error is None:
            pipe.xdel(keys.WEBHOOK_OUTBOX, entry_id)
            pipe.hdel(keys.WEBHOOK_RETRIES, entry_id)
            pipe.hincrby(keys.STATS, "webhooks:delivered", 1)
            pipe.execute()
            return "delivered"
        written = int(entry_id.split("-")[0]) / 1000
        if now - written > self.settings.webhook_retry_hours * 3600:
            log.error("webhook %s of job %s given up after %d tries: %s", fields.get("type"), fields.get("job"),
                      state.get("tries", 0) + 1, error)
            pipe.xadd(keys.WEBHOOK_FAILED, {"job": fields.get("job", ""), "type": fields.get("type", ""),
                                            "msg": _message_id(entry_id, fields), "error": error[:EXCERPT],
                                            "tries": str(state.get("tries", 0) + 1)},
                      maxlen=FAILED_MAXLEN, approximate=True)
            pipe.xdel(keys.WEBHOOK_OUTBOX, entry_id)
            pipe.hdel(keys.WEBHOOK_RETRIES, entry_id)
            pipe.hincrby(keys.STATS, "webhooks:failed", 1)
            pipe.execute()
            return "failed"
        tries = int(state.get("tries", 0)) + 1
        wait = min(BACKOFF_FIRST * 2 ** (tries - 1), BACKOFF_MAX)
        pipe.hset(keys.WEBHOOK_RETRIES, entry_id, json.dumps({"tries": tries, "next_at": now + wait,
                                                              "error": error[:EXCERPT], "done": state.get("done", [])}))
        pipe.execute()
        log.warning("webhook %s of job %s: %s; trying again in %.0f s", fields.get("type"), fields.get("job"), error,
                    wait)
        return "retried"


def pending(client: redis.Redis, count: int = 100) -> list[dict[str, Any]]:
    """Deliveries not sent yet, oldest first, with their retry state."""
    entries: Any = client.xrange(keys.WEBHOOK_OUTBOX, count=count)
    states: Any = client.hmget(keys.WEBHOOK_RETRIES, [e[0] for e in entries]) if entries else []
    return [{"id": entry_id, "msg": _message_id(entry_id, fields), **fields, **json.loads(state or "{}")}
            for (entry_id, fields), state in zip(entries, states, strict=True)]


def failed(client: redis.Redis, count: int = 100) -> list[dict[str, Any]]:
    """Deliveries given up, newest first."""
    found: Any = client.xrevrange(keys.WEBHOOK_FAILED, count=count)
    return [{"id": entry_id, **fields} for entry_id, fields in found]


def resend(client: redis.Redis, failed_id: str) -> str:
    """Put a failed delivery back in the outbox (its webhook-id kept); the new entry's id."""
    found: Any = client.xrange(keys.WEBHOOK_FAILED, failed_id, failed_id)
    if not found:
        raise JobNotFound(f"no failed delivery {failed_id!r}; `deepe webhooks --failed` lists them.")
    fields = found[0][1]
    new_id = str(client.xadd(keys.WEBHOOK_OUTBOX, {"job": fields["job"], "type": fields["type"], "msg": fields["msg"]}))
    client.xdel(keys.WEBHOOK_FAILED, failed_id)
    return new_id


def run_dispatcher(stop: threading.Event, client_factory: Any, settings: Settings, holder: str,
                   interval: float = 1.0) -> None:
    """A worker's dispatcher thread: a round a second while this worker leads."""
    dispatcher: Dispatcher | None = None
    while not stop.wait(interval):
        try:
            if dispatcher is None:
                dispatcher = Dispatcher(client_factory(), settings, holder)
            enable(dispatcher.client, settings)
            dispatcher.round()
        except Exception as e:  # Redis away: the next round tries again
            log.warning("webhooks: %s", e)
