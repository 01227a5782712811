"""Feed an async request body to the synchronous object store without holding it in memory.

`ObjectStore.put_stream` is blocking (boto3, file writes), so it runs in a worker thread and pulls
the body from the event loop one piece at a time: at most `chunk` bytes (1 MiB) are buffered here,
and uvicorn's flow control stops reading the socket while we are not asking for more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio.from_thread

__all__ = ["SyncBody"]


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
