"""Feed an async request body to the synchronous object store without holding it in memory.

`ObjectStore.put_stream` is blocking (boto3, file writes), so it runs in a worker thread and pulls
the body from the event loop one piece at a time: at most `chunk` bytes (1 MiB) are buffered here,
and uvicorn's flow control stops reading the socket while we are not asking for more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from functools import partial

import anyio.from_thread
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError
from api.storage import ObjectStore, ObjectTooLarge, PutResult

__all__ = ["SyncBody", "content_length", "receive_body", "DRAIN_LIMIT"]

# Bytes of an over-limit body we still read (and drop) so the client gets to read the 413.
DRAIN_LIMIT = 64 << 20


def content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise ApiError(400, "bad_request", "invalid Content-Length header")
    return int(raw)


async def receive_body(request: Request, store: ObjectStore, key: str, max_bytes: int, too_large: ApiError
                       ) -> PutResult:
    """Stream the request body to `key`. Past `max_bytes`: `too_large` (after reading what is left, up to
    DRAIN_LIMIT, else with Connection: close); a client that goes away: 400. Either way nothing is stored."""
    body = SyncBody(request.stream())
    try:
        return await anyio.to_thread.run_sync(partial(store.put_stream, key, body, max_bytes=max_bytes))
    except ObjectTooLarge:
        if not await body.drain(DRAIN_LIMIT):
            too_large.headers = {"Connection": "close"}
        raise too_large from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the upload was interrupted; nothing was stored") from None


class SyncBody:
    """An iterable of byte chunks over an async stream, for use from an anyio worker thread."""

    def __init__(self, stream: AsyncIterator[bytes], chunk: int = 1 << 20) -> None:
        self._it = stream.__aiter__()
        self._chunk = chunk
        self._done = False

    async def _next(self) -> bytes:
        buf = bytearray()
        while len(buf) < self._chunk:
            try:
                piece = await self._it.__anext__()
            except StopAsyncIteration:
                self._done = True
                break
            buf += piece
        return bytes(buf)

    def __iter__(self) -> Iterator[bytes]:
        while not self._done:
            data = anyio.from_thread.run(self._next)
            if data:
                yield data

    async def drain(self, limit: int) -> bool:
        """Read and drop what is left (up to `limit` bytes), so the client can read our error response.

        Returns False when the body was longer than `limit` (the connection should then be closed).
        """
        dropped = 0
        while not self._done:
            try:
                piece = await self._it.__anext__()
            except StopAsyncIteration:
                self._done = True
                break
            dropped += len(piece)
            if dropped > limit:
                return False
        return True
