"""The API's HTTP server: uvicorn, with a deadline on each request's headers.

uvicorn closes an idle keep-alive connection, but not one that sent half a request line and
stalls (1,500 such connections stayed open for 30 s): each connection here must send a request's
headers within ``header_timeout`` seconds of opening, or of its previous response, or is closed.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_BYTES = 16 * 1024  # unfinished request line and headers h11 buffers (its default); past it: 400


def header_deadline(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not all in within
    ``header_timeout`` seconds."""

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            # Still waiting for (the rest of) a request's headers: a request being answered
            # (an event stream) has its headers in and is left alone.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol


def serve(app: Any, host: str, port: int, header_timeout: float) -> None:
    """Serve ``app`` until interrupted: idle keep-alive connections and unfinished request
    headers both get ``header_timeout`` seconds."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, http=header_deadline(header_timeout),
                timeout_keep_alive=max(1, math.ceil(header_timeout)), h11_max_incomplete_event_size=HEADER_BYTES)
