"""Object store on S3 or an S3-compatible server (SeaweedFS, MinIO, ...) via boto3.

Path-style addressing and SigV4 are forced: S3-compatible servers behind a plain host name
cannot serve virtual-host buckets, and SigV4 is the only signature they all check. Uploads
of unknown length stream as multipart in `part_size` pieces, so memory stays at one part.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import boto3
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError

from api.storage.base import (
    MIN_PART_SIZE,
    CompletedPart,
    InvalidPart,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    PutResult,
    Readable,
    StoreError,
    StoreUnavailable,
    StreamSource,
    UploadNotFound,
    check_part_number,
    check_ttl,
    content_disposition,
    iter_source,
    validate_key,
    validate_prefix,
)

__all__ = ["S3Store"]

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_BAD_PART = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Store:
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        presign_endpoint_url: str | None = None,
        part_size: int = 8 * 1024 * 1024,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} (the S3 minimum)")
        self.bucket = bucket
        self.part_size = part_size
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            # botocore >= 1.36 adds CRC checksums to every upload by default; several S3-compatible
            # servers reject or ignore them. Send them only where the API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs are computed locally; they may need the host name clients use, not ours.
        self._presigner: Any = (
            session.client("s3", endpoint_url=presign_endpoint_url, config=config)
            if presign_endpoint_url and presign_endpoint_url != endpoint_url
            else self._client
        )

    # ------------------------------------------------------------------ errors

    def _translate(self, e: Exception, key: str, upload_id: str | None = None) -> StoreError:
        if isinstance(e, ClientError):
            code = _code(e)
            if code in _NOT_FOUND:
                return ObjectNotFound(key)
            if code == "NoSuchUpload" and upload_id is not None:
                return UploadNotFound(key, upload_id)
            if code in _BAD_PART:
                return InvalidPart(f"{code}: {e}")
            if code == "NoSuchBucket":
                return StoreUnavailable(f"bucket {self.bucket!r} does not exist")
            return StoreError(f"S3 {code or 'error'} on {key!r}: {e}")
        return StoreUnavailable(f"S3 unreachable: {e}")

    # ------------------------------------------------------------------ writing

    def put_stream(self, key: str, data: StreamSource, *, max_bytes: int | None = None) -> PutResult:
        validate_key(key)
        h = hashlib.sha256()
        size = 0
        buf = bytearray()
        upload_id: str | None = None
        parts: list[CompletedPart] = []
        try:
            for chunk in iter_source(data):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(key, max_bytes)
                h.update(chunk)
                buf += chunk
                while len(buf) >= self.part_size:
                    if upload_id is None:
                        upload_id = self.create_multipart(key)
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buf[: self.part_size])))
                    del buf[: self.part_size]
            if upload_id is None:
                # Small object: one PUT, no multipart bookkeeping.
                self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf))
            else:
                if buf:
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buf)))
                self._complete(key, upload_id, parts)
        except BaseException as e:
            if upload_id is not None:
                # Leave nothing behind: an abandoned multipart upload keeps its parts (and bills them) forever.
                with contextlib.suppress(Exception):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            if isinstance(e, ClientError | BotoCoreError):
                raise self._translate(e, key, upload_id) from e
            raise
        return PutResult(key=key, size=size, sha256=h.hexdigest())

    def _upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> CompletedPart:
        resp = self._client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return CompletedPart(part_number=number, etag=resp["ETag"])

    def _complete(self, key: str, upload_id: str, parts: Sequence[CompletedPart]) -> None:
        self._client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p.part_number, "ETag": _quoted(p.etag)} for p in parts]},
        )

    # ------------------------------------------------------------------ reading

    def open(self, key: str) -> Readable:
        validate_key(key)
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, key) from e

    def _head(self, key: str) -> dict[str, Any]:
        validate_key(key)
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, key) from e

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix, allow_empty=True)  # here, not in the generator: a bad prefix fails at the call
        return self._iter_objects(prefix)

    def _iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=obj["Key"], size=int(obj["Size"]))
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, prefix) from e

    # ------------------------------------------------------------------ deleting

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as e:
            err = self._translate(e, key)
            if not isinstance(err, ObjectNotFound):
                raise err from e

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        keys = [o.key for o in self.list_objects(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[i : i + 1000]
            try:
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as e:
                raise self._translate(e, prefix) from e
            if errors := resp.get("Errors"):
                raise StoreError(f"S3 could not delete {len(errors)} objects under {prefix!r}: {errors[:3]}")
        return len(keys)

    # ------------------------------------------------------------------ presigning

    def presigned_get(self, key: str, ttl: int, *, download_name: str | None = None) -> str:
        validate_key(key)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if download_name is not None:
            params["ResponseContentDisposition"] = content_disposition(download_name)
        return self._presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=check_ttl(ttl))

    def presigned_part_url(self, key: str, upload_id: str, part_number: int, ttl: int) -> str:
        validate_key(key)
        check_part_number(part_number)
        return self._presigner.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part_number},
            ExpiresIn=check_ttl(ttl),
        )

    # ------------------------------------------------------------------ multipart

    def create_multipart(self, key: str) -> str:
        validate_key(key)
        try:
            return self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, key) from e

    def _uploaded_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """part number -> (etag without quotes, size) for what the server holds."""
        out: dict[int, tuple[str, int]] = {}
        pages = self._client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)
        for page in pages:
            for p in page.get("Parts", []):
                out[int(p["PartNumber"])] = (str(p["ETag"]).strip('"'), int(p["Size"]))
        return out

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[CompletedPart], *, max_bytes: int | None = None
    ) -> ObjectInfo:
        validate_key(key)
        if not parts:
            raise InvalidPart("a multipart upload needs at least one part")
        for p in parts:
            check_part_number(p.part_number)
        try:
            held = self._uploaded_parts(key, upload_id)
            # Presigned part PUTs cannot cap their size, so the limit is checked here, before assembly.
            if max_bytes is not None:
                total = sum(held[p.part_number][1] for p in parts if p.part_number in held)
                if total > max_bytes:
                    self.abort_multipart(key, upload_id)
                    raise ObjectTooLarge(key, max_bytes)
            self._complete(key, upload_id, parts)
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, key, upload_id) from e
        return ObjectInfo(key=key, size=self.size(key))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        validate_key(key)
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as e:
            err = self._translate(e, key, upload_id)
            if not isinstance(err, UploadNotFound | ObjectNotFound):
                raise err from e

    # ------------------------------------------------------------------ health

    def ping(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            raise StoreUnavailable(f"bucket {self.bucket!r} not usable: {_code(e)} {e}") from e
        except BotoCoreError as e:
            raise StoreUnavailable(f"S3 unreachable: {e}") from e


def _quoted(etag: str) -> str:
    etag = etag.strip()
    return etag if etag.startswith('"') else f'"{etag}"'

