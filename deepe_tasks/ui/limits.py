"""What one client may cost the API: the token checked and the body capped before it is read,
and a bounded number of open event streams per token."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import Counter
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_REQUIRED = "A valid `Authorization: Bearer <token>` header is required."
STREAM_RETRY_AFTER = 5  # seconds a client refused a stream should wait: streams end as their jobs do


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header ("" when there is none)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def valid_token(tokens: list[str], given: str) -> bool:
    """Whether ``given`` is one of ``tokens``, compared in constant time."""
    # As bytes: compare_digest refuses str with non-ASCII characters (a header can carry them).
    return any(secrets.compare_digest(given.encode(), t.encode()) for t in tokens)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body has sent more than the limit (a chunked one, or one
    that lied about its length); FastAPI passes an HTTPException on unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit), headers={"Connection": "close"})


def too_large(limit: int) -> str:
    return (f"The request body is larger than {limit} bytes (DEEPE_API_MAX_BODY_BYTES); "
            "send a smaller one (a job's parameters are a few kilobytes).")


class BodyGate:
    """ASGI middleware in front of the app: a request that carries a body is refused before a byte
    of it is read when its token is wrong (401) or its declared length is over the limit (413), and
    cut off with 413 once a body without a length passes the limit. FastAPI reads a body before it
    runs the route's dependencies, so without this an unauthenticated 600 MB body is read and
    parsed before the 401. The refusals close the connection: the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, tokens: list[str], max_bytes: int) -> None:
        self.app = app
        self.tokens = tokens
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and (length is None or length.strip() in ("", "0")):
            await self.app(scope, receive, send)  # no body: nothing to guard
            return
        if self.tokens and not valid_token(self.tokens, bearer(headers.get("authorization"))):
            await refuse(scope, receive, send, 401, TOKEN_REQUIRED, {"WWW-Authenticate": "Bearer"})
            return
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            await refuse(scope, receive, send, 413, too_large(self.max_bytes))
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as e:  # raised where no FastAPI route turned it into the answer
            if started:
                raise
            await refuse(scope, receive, send, 413, e.detail)


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                 headers: dict[str, str] | None = None) -> None:
    """Answer at once and close the connection, so that the body left unread is never read."""
    response = JSONResponse({"detail": detail}, status_code=status, headers={**(headers or {}), "Connection": "close"})
    await response(scope, receive, send)


class StreamSlots:
    """Open event streams per client: its token (its address when the API runs without tokens).

    Counted in this process: each API process holds its own streams."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()  # taken in a route's thread, given back in the event loop

    def take(self, client: str) -> Callable[[], None]:
        """One slot for ``client``, or HTTP 429; returns the call that gives it back (once)."""
        key = hashlib.sha256(client.encode("utf-8", "surrogateescape")).hexdigest()
        with self._lock:
            if self._open[key] >= self.limit:
                raise HTTPException(429, (
                    f"This client already has {self.limit} event streams open (DEEPE_API_MAX_STREAMS_PER_TOKEN); "
                    "close one, or follow fewer jobs at once."), headers={"Retry-After": str(STREAM_RETRY_AFTER)})
            self._open[key] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self._lock:
                if not given_back:
                    given_back = True
                    self._open[key] -= 1
                    if self._open[key] <= 0:
                        del self._open[key]

        return give_back

    def open(self) -> int:
        """How many streams are open, all clients together."""
        with self._lock:
            return sum(self._open.values())
