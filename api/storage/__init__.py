"""Object storage behind one small interface: S3 (production) or a local directory (embedded mode)."""

from __future__ import annotations

from api.core.config import Settings
from api.storage.base import (
    AccessDenied,
    CompletedPart,
    InvalidKey,
    InvalidPart,
    KeyConflict,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    PutResult,
    Readable,
    StoreError,
    StoreUnavailable,
    TokenExpired,
    UploadNotFound,
    hash_object,
    read_all,
    validate_key,
)
from api.storage.local import LocalStore
from api.storage.s3 import S3Store
from api.storage.tokens import LocalGrant, verify_local_token

__all__ = [
    "AccessDenied",
    "CompletedPart",
    "InvalidKey",
    "InvalidPart",
    "KeyConflict",
    "LocalGrant",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectTooLarge",
    "PutResult",
    "Readable",
    "S3Store",
    "StoreError",
    "StoreUnavailable",
    "TokenExpired",
    "UploadNotFound",
    "LOCAL_STORE_ROUTE",
    "hash_object",
    "make_store",
    "read_all",
    "validate_key",
    "verify_local_token",
]

# Where the API serves local-store presigned URLs (GET downloads, PUT parts): {public_url}/v1/store/{token}.
LOCAL_STORE_ROUTE = "/v1/store"


def make_store(settings: Settings) -> ObjectStore:
    """The store the settings describe."""
    if settings.store_backend == "s3":
        return S3Store(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
            region=settings.s3_region,
            presign_endpoint_url=settings.s3_presign_endpoint_url,
        )
    return LocalStore(
        settings.objects_dir,
        secret=settings.secret_bytes(),
        base_url=settings.public_url.rstrip("/") + LOCAL_STORE_ROUTE,
    )
