"""The object-store contract shared by the S3 and local-directory backends.

Keys are relative, slash-separated paths ("tenants/ten_x/models/mdl_y/model.safetensors"). Both
backends validate them the same way, so a key that works in embedded mode works on S3 and no key
can climb out of the local store's directory. Multipart follows S3's rules on both backends
(parts 1..10000, every part but the last at least 5 MiB) so a client written against one works
against the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import quote

from api.core.config import MAX_PRESIGN_TTL

__all__ = [
    "StoreError",
    "ObjectNotFound",
    "ObjectTooLarge",
    "InvalidKey",
    "KeyConflict",
    "UploadNotFound",
    "InvalidPart",
    "AccessDenied",
    "TokenExpired",
    "StoreUnavailable",
    "PutResult",
    "ObjectInfo",
    "CompletedPart",
    "Readable",
    "ObjectStore",
    "StreamSource",
    "validate_key",
    "validate_prefix",
    "iter_source",
    "check_ttl",
    "check_part_number",
    "content_disposition",
    "read_all",
    "hash_object",
    "MIN_PART_SIZE",
    "MAX_PART_SIZE",
    "MAX_PART_NUMBER",
    "MAX_KEY_BYTES",
    "MAX_PRESIGN_TTL",
    "CHUNK",
]

MIN_PART_SIZE = 5 * 1024 * 1024  # S3: every part except the last
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
MAX_PART_NUMBER = 10_000
MAX_KEY_BYTES = 1024
CHUNK = 1 << 20  # streaming granularity: nothing larger than this (or one S3 part) sits in memory


# ----------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class for object-store failures."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object at key {key!r}")
        self.key = key


class ObjectTooLarge(StoreError):
    def __init__(self, key: str, max_bytes: int) -> None:
        super().__init__(f"object {key!r} exceeds the limit of {max_bytes} bytes; nothing was stored")
        self.key = key
        self.max_bytes = max_bytes


class InvalidKey(StoreError, ValueError):
    def __init__(self, key: object, why: str) -> None:
        super().__init__(f"invalid object key {key!r}: {why}")
        self.key = key


class KeyConflict(StoreError):
    """The local store keeps keys as files, so "a/b" and "a/b/c" cannot both exist (S3 allows it)."""


class UploadNotFound(StoreError):
    def __init__(self, key: str, upload_id: str) -> None:
        super().__init__(f"no multipart upload {upload_id!r} for key {key!r} (completed, aborted or never created)")
        self.key = key
        self.upload_id = upload_id


class InvalidPart(StoreError):
    """A completion named a part that is missing, has another ETag, is out of order or too small."""


class AccessDenied(StoreError):
    """A presigned token is malformed or its signature does not match."""


class TokenExpired(AccessDenied):
    """A presigned token was valid but its time is up."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or is misconfigured (missing bucket, unwritable directory)."""


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class PutResult:
    key: str
    size: int
    sha256: str  # hex


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True, slots=True)
class CompletedPart:
    part_number: int
    etag: str  # as returned by the part upload (the ETag response header), quotes optional


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


# bytes, a binary file-like object, or any iterable of byte chunks (e.g. a request body stream)
StreamSource = bytes | bytearray | memoryview | Readable | Iterable[bytes]


@runtime_checkable
class ObjectStore(Protocol):
    def put_stream(self, key: str, data: StreamSource, *, max_bytes: int | None = None) -> PutResult:
        """Store `data` at `key` (replacing any object there), hashing as it streams.

        Over `max_bytes` raises ObjectTooLarge and leaves nothing behind (no object, no partial upload).
        """
        ...

    def open(self, key: str) -> Readable:
        """A readable stream of the object; the caller closes it."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (same as S3)."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix` (non-empty); returns how many."""
        ...

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix` (a plain string prefix, as in S3), in key order."""
        ...

    def presigned_get(self, key: str, ttl: int, *, download_name: str | None = None) -> str:
        """A URL that downloads the object without credentials for `ttl` seconds."""
        ...

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload; returns its upload id."""
        ...

    def presigned_part_url(self, key: str, upload_id: str, part_number: int, ttl: int) -> str:
        """A URL that accepts an HTTP PUT of one part's bytes; the response's ETag header goes into complete."""
        ...

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[CompletedPart], *, max_bytes: int | None = None
    ) -> ObjectInfo:
        """Assemble the parts into the object at `key`.

        Over `max_bytes` aborts the upload and raises ObjectTooLarge before anything is assembled.
        No sha256 here: on S3 that would mean reading the whole object back inside the request;
        use hash_object where the digest is needed.
        """
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an upload and its parts; an unknown upload is not an error."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store can be used (for /readyz)."""
        ...


# ----------------------------------------------------------------------------- helpers


def _bad_chars(s: str) -> str | None:
    if "\\" in s:
        return "backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        return "control character"
    return None


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe relative key, else raise InvalidKey."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(key, "empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(key, f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidKey(key, "absolute (starts with '/')")
    if why := _bad_chars(key):
        raise InvalidKey(key, why)
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise InvalidKey(key, "empty, '.' or '..' path segment")
    return key


def validate_prefix(prefix: str, *, allow_empty: bool) -> str:
    """A string prefix: complete segments are checked like a key; the last one may be partial or empty."""
    if not isinstance(prefix, str):
        raise InvalidKey(prefix, "not a string")
    if not prefix:
        if allow_empty:
            return prefix
        raise InvalidKey(prefix, "empty prefix (would match every object)")
    if prefix.startswith("/"):
        raise InvalidKey(prefix, "absolute (starts with '/')")
    if why := _bad_chars(prefix):
        raise InvalidKey(prefix, why)
    *dirs, last = prefix.split("/")
    if any(seg in ("", ".", "..") for seg in dirs) or last in (".", ".."):
        raise InvalidKey(prefix, "empty, '.' or '..' path segment")
    return prefix


def check_ttl(ttl: int) -> int:
    if not 1 <= ttl <= MAX_PRESIGN_TTL:
        raise ValueError(f"presign ttl must be 1..{MAX_PRESIGN_TTL} seconds, got {ttl}")
    return ttl


def check_part_number(part_number: int) -> int:
    if not 1 <= part_number <= MAX_PART_NUMBER:
        raise InvalidPart(f"part number must be 1..{MAX_PART_NUMBER}, got {part_number}")
    return part_number


def iter_source(data: StreamSource, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Byte chunks of `data`, never more than `chunk_size` from a file-like object at a time."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for i in range(0, len(view), chunk_size):
            yield bytes(view[i : i + chunk_size])
        return
    read = getattr(data, "read", None)
    if callable(read):
        while chunk := read(chunk_size):
            yield chunk
        return
    for chunk in data:  # type: ignore[union-attr]
        if chunk:
            yield bytes(chunk)


def read_all(store: ObjectStore, key: str, limit: int | None = None) -> bytes:
    """The object in memory (at most its first `limit` bytes): for small objects and tests."""
    f = store.open(key)
    try:
        return f.read() if limit is None else f.read(limit)
    finally:
        f.close()


def hash_object(store: ObjectStore, key: str) -> PutResult:
    """Size and sha256 of a stored object, streamed."""
    h = hashlib.sha256()
    size = 0
    f = store.open(key)
    try:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    finally:
        f.close()
    return PutResult(key=key, size=size, sha256=h.hexdigest())


def content_disposition(name: str) -> str:
    """``attachment`` header for a download name (RFC 6266: ASCII fallback plus the exact UTF-8 name)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
