"""Object store in a local directory (embedded mode).

Layout under `root`::

    objects/<key>                   the objects, one file per key
    tmp/                            writes in progress (same filesystem, so publishing is one rename)
    uploads/<upload_id>/key         multipart upload: the key it is for
    uploads/<upload_id>/<00001>     ... and its parts

A reader never sees a half-written object: every write goes to tmp/ and is renamed into place.
Presigned URLs point at the API (`base_url`/<token>), which verifies the token and streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from api.storage.base import (
    CHUNK,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    AccessDenied,
    CompletedPart,
    InvalidKey,
    InvalidPart,
    KeyConflict,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    PutResult,
    StoreUnavailable,
    StreamSource,
    UploadNotFound,
    check_part_number,
    check_ttl,
    iter_source,
    validate_key,
    validate_prefix,
)
from api.storage.tokens import LocalGrant, sign_local_token, verify_local_token

__all__ = ["LocalStore"]

_UPLOAD_ID_HEX = 32


class LocalStore:
    def __init__(self, root: Path | str, *, secret: bytes, base_url: str) -> None:
        self.root = Path(root).resolve()
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._uploads = self.root / "uploads"
        for d in (self._objects, self._tmp, self._uploads):
            d.mkdir(parents=True, exist_ok=True)
        if not secret:
            raise ValueError("LocalStore needs a non-empty signing secret")
        self._secret = secret
        self.base_url = base_url.rstrip("/")

    # ------------------------------------------------------------------ paths

    def _path(self, key: str) -> Path:
        path = self._objects.joinpath(*validate_key(key).split("/"))
        # validate_key already rules out '..'; this also catches a symlink planted inside the tree.
        if not path.resolve().is_relative_to(self._objects):
            raise InvalidKey(key, "resolves outside the store")
        return path

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        validate_key(key)
        if len(upload_id) != _UPLOAD_ID_HEX or not all(c in "0123456789abcdef" for c in upload_id):
            raise UploadNotFound(key, upload_id)
        d = self._uploads / upload_id
        try:
            recorded = (d / "key").read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UploadNotFound(key, upload_id) from None
        if recorded != key:
            raise UploadNotFound(key, upload_id)
        return d

    # ------------------------------------------------------------------ writing

    def _write_tmp(
        self, data: StreamSource, max_bytes: int | None, key: str, algo: str = "sha256"
    ) -> tuple[Path, int, str]:
        """Stream `data` into a temp file; returns (path, size, hex digest). Removes the file on any failure."""
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(name)
        h = hashlib.new(algo, usedforsecurity=algo != "md5")
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in iter_source(data):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ObjectTooLarge(key, max_bytes)
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())  # the rename must not publish a file whose data is still in page cache only
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, size, h.hexdigest()

    def _publish(self, tmp: Path, key: str) -> None:
        dest = self._path(key)
        try:
            # A concurrent delete may prune the parent between mkdir and rename; one retry settles it.
            for attempt in range(3):
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, dest)
                    return
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            raise KeyConflict(f"key {key!r} collides with an existing key in the local store: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def put_stream(self, key: str, data: StreamSource, *, max_bytes: int | None = None) -> PutResult:
        self._path(key)  # validate before reading any data
        tmp, size, digest = self._write_tmp(data, max_bytes, key)
        self._publish(tmp, key)
        return PutResult(key=key, size=size, sha256=digest)

    # ------------------------------------------------------------------ reading

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix, allow_empty=True)  # here, not in the generator: a bad prefix fails at the call
        return self._iter_objects(prefix)

    def _iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the deepest directory the prefix names completely, then filter as a string prefix.
        base_dir = prefix.rpartition("/")[0]
        start = self._objects.joinpath(*base_dir.split("/")) if base_dir else self._objects
        found: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self._objects).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):  # deleted while listing
                        found.append(ObjectInfo(key=key, size=(Path(dirpath) / name).stat().st_size))
        yield from sorted(found, key=lambda o: o.key)

    # ------------------------------------------------------------------ deleting

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove now-empty parent directories so deleted prefixes do not linger as folders."""
        while directory != self._objects and directory.is_relative_to(self._objects):
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop
                return
            directory = directory.parent

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        n = 0
        for obj in list(self.list_objects(prefix)):
            self.delete(obj.key)
            n += 1
        return n

    # ------------------------------------------------------------------ presigning

    def presigned_get(self, key: str, ttl: int, *, download_name: str | None = None) -> str:
        validate_key(key)
        grant = LocalGrant(op="get", key=key, expires_at=_expiry(ttl), download_name=download_name)
        return f"{self.base_url}/{sign_local_token(self._secret, grant)}"

    def presigned_part_url(self, key: str, upload_id: str, part_number: int, ttl: int) -> str:
        self._upload_dir(key, upload_id)
        check_part_number(part_number)
        grant = LocalGrant(
            op="put_part", key=key, expires_at=_expiry(ttl), upload_id=upload_id, part_number=part_number
        )
        return f"{self.base_url}/{sign_local_token(self._secret, grant)}"

    def verify(self, token: str, op: str) -> LocalGrant:
        """The grant of a token this store signed, for operation `op` ("get" or "put_part"), else AccessDenied.

        What the API route for `base_url`/{token} calls before it streams an object or accepts a part.
        """
        grant = verify_local_token(self._secret, token)
        if grant.op != op:
            raise AccessDenied(f"store token grants {grant.op!r}, not {op!r}")
        return grant

    def put_part_by_token(self, token: str, data: StreamSource) -> str:
        """Accept a part uploaded to a presigned part URL; returns the ETag to send back."""
        grant = self.verify(token, "put_part")
        assert grant.upload_id is not None and grant.part_number is not None  # verify_local_token checked
        return self.put_part(grant.key, grant.upload_id, grant.part_number, data)

    # ------------------------------------------------------------------ multipart

    def create_multipart(self, key: str) -> str:
        self._path(key)
        upload_id = secrets.token_hex(_UPLOAD_ID_HEX // 2)
        d = self._uploads / upload_id
        d.mkdir()
        (d / "key").write_text(key, encoding="utf-8")
        return upload_id

    def put_part(self, key: str, upload_id: str, part_number: int, data: StreamSource) -> str:
        """Store one part (what the API's PUT /v1/store/{token} does); returns its quoted ETag (md5, as S3)."""
        d = self._upload_dir(key, upload_id)
        check_part_number(part_number)
        # The ETag is the part's md5, as on S3, so clients treat both backends alike.
        tmp, _size, etag = self._write_tmp(data, MAX_PART_SIZE, key, algo="md5")
        try:
            os.replace(tmp, d / f"{part_number:05d}.{etag}")
        finally:
            tmp.unlink(missing_ok=True)
        # A re-uploaded part replaces the earlier one, as on S3.
        for old in d.glob(f"{part_number:05d}.*"):
            if old.name != f"{part_number:05d}.{etag}":
                old.unlink(missing_ok=True)
        return f'"{etag}"'

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[CompletedPart], *, max_bytes: int | None = None
    ) -> ObjectInfo:
        d = self._upload_dir(key, upload_id)
        if not parts:
            raise InvalidPart("a multipart upload needs at least one part")
        files: list[Path] = []
        prev = 0
        for i, part in enumerate(parts):
            check_part_number(part.part_number)
            if part.part_number <= prev:
                raise InvalidPart("parts must be listed in ascending part-number order")
            prev = part.part_number
            etag = part.etag.strip().strip('"')
            # The ETag becomes part of a file name: only an md5 hex string may get that far.
            f = d / f"{part.part_number:05d}.{etag}"
            if len(etag) != 32 or not all(c in "0123456789abcdef" for c in etag) or not f.is_file():
                raise InvalidPart(f"part {part.part_number} was not uploaded or has another ETag")
            if i < len(parts) - 1 and f.stat().st_size < MIN_PART_SIZE:
                raise InvalidPart(f"part {part.part_number} is smaller than {MIN_PART_SIZE} bytes and not the last")
            files.append(f)
        total = sum(f.stat().st_size for f in files)
        if max_bytes is not None and total > max_bytes:
            self.abort_multipart(key, upload_id)
            raise ObjectTooLarge(key, max_bytes)
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="mpu-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for f in files:
                    with f.open("rb") as src:
                        shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._publish(tmp, key)
        shutil.rmtree(d, ignore_errors=True)
        return ObjectInfo(key=key, size=total)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            d = self._upload_dir(key, upload_id)
        except UploadNotFound:
            return
        shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ health

    def ping(self) -> None:
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp, prefix="ping-")
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            raise StoreUnavailable(f"local store {self.root} is not writable: {e}") from e


def _expiry(ttl: int) -> int:
    return int(time.time()) + check_ttl(ttl)
