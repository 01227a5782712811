"""Object-store contract, run against both backends: LocalStore and S3Store on a real SeaweedFS.

For S3 the presigned URLs are fetched over HTTP with httpx, so SeaweedFS itself checks the
signatures and the expiry. For the local store the same URLs are resolved the way the API route
will resolve them (LocalStore.verify / put_part_by_token), which is where its checks live.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from services import S3Config, s3_config  # noqa: F401  (pytest fixture)

from api.core.config import Settings
from api.storage import (
    AccessDenied,
    CompletedPart,
    InvalidKey,
    InvalidPart,
    KeyConflict,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    S3Store,
    TokenExpired,
    hash_object,
    make_store,
    read_all,
    verify_local_token,
)
from api.storage.base import MIN_PART_SIZE, content_disposition

MiB = 1 << 20
SECRET = b"test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def s3_store(s3_config: S3Config) -> S3Store:  # noqa: F811
    # Smallest legal part size, so multipart paths run with a few MiB of test data.
    return s3_config.store(part_size=MIN_PART_SIZE)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store", secret=SECRET, base_url="http://testserver/v1/store")
    return request.getfixturevalue("s3_store")


@pytest.fixture
def prefix(store: ObjectStore) -> Iterator[str]:
    """A fresh key prefix per test: the S3 bucket is shared by the whole session."""
    p = f"t-{uuid.uuid4().hex[:12]}/"
    yield p
    store.delete_prefix(p)


# What the API route does for the local store; HTTP for S3. Both return (status, body, headers).
def http_get(store: ObjectStore, url: str) -> tuple[int, bytes, dict[str, str]]:
    if isinstance(store, LocalStore):
        try:
            grant = store.verify(url.rsplit("/", 1)[1], "get")
            headers = {"content-disposition": content_disposition(grant.download_name)} if grant.download_name else {}
            return 200, read_all(store, grant.key), headers
        except AccessDenied:
            return 403, b"", {}
        except ObjectNotFound:
            return 404, b"", {}
    r = httpx.get(url, timeout=30)
    return r.status_code, r.content, dict(r.headers)


def http_put_part(store: ObjectStore, url: str, data: bytes) -> tuple[int, str]:
    if isinstance(store, LocalStore):
        try:
            return 200, store.put_part_by_token(url.rsplit("/", 1)[1], io.BytesIO(data))
        except AccessDenied:
            return 403, ""
    r = httpx.put(url, content=data, timeout=60)
    return r.status_code, r.headers.get("etag", "")


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def pending_uploads(store: ObjectStore, prefix: str) -> list[str]:
    """Multipart uploads still open under `prefix` (what 'leaving nothing behind' must also cover)."""
    if isinstance(store, LocalStore):
        return [p.name for p in (store.root / "uploads").iterdir()]
    resp = store._client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
    return [u["UploadId"] for u in resp.get("Uploads", [])]


def leftovers(store: ObjectStore) -> list[str]:
    if isinstance(store, LocalStore):
        return [p.name for p in (store.root / "tmp").iterdir()]
    return []


# ----------------------------------------------------------------------------- put / read


@pytest.mark.parametrize("source", ["chunks", "file", "bytes"])
def test_put_stream_hashes_and_round_trips(store: ObjectStore, prefix: str, source: str) -> None:
    data = os.urandom(3 * MiB + 123)
    src = {"chunks": lambda: chunks(data), "file": lambda: io.BytesIO(data), "bytes": lambda: data}[source]()
    key = prefix + "models/m1/model.safetensors"
    res = store.put_stream(key, src)
    assert (res.key, res.size, res.sha256) == (key, len(data), hashlib.sha256(data).hexdigest())
    assert store.exists(key) and store.size(key) == len(data)
    assert read_all(store, key) == data
    assert hash_object(store, key) == res
    assert [(o.key, o.size) for o in store.list_objects(prefix)] == [(key, len(data))]


def test_put_stream_large_goes_multipart_and_streams(store: ObjectStore, prefix: str) -> None:
    # 2.2 parts of the S3 part size: the S3 backend streams it as a 3-part upload; bytes come from a generator.
    pulled = 0

    def gen() -> Iterator[bytes]:
        nonlocal pulled
        for _ in range(11):
            pulled += 1
            yield bytes([pulled]) * MiB

    key = prefix + "big.bin"
    res = store.put_stream(key, gen())
    expected = b"".join(bytes([i]) * MiB for i in range(1, 12))
    assert res.size == 11 * MiB and res.sha256 == hashlib.sha256(expected).hexdigest()
    assert read_all(store, key) == expected
    assert pending_uploads(store, prefix) == []


def test_empty_object(store: ObjectStore, prefix: str) -> None:
    res = store.put_stream(prefix + "empty", iter(()))
    assert (res.size, res.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert store.exists(prefix + "empty") and read_all(store, prefix + "empty") == b""


def test_overwrite_replaces(store: ObjectStore, prefix: str) -> None:
    key = prefix + "a.txt"
    store.put_stream(key, b"first version")
    store.put_stream(key, b"second")
    assert read_all(store, key) == b"second"


@pytest.mark.parametrize("size", [100, 8 * MiB], ids=["small", "multipart"])
def test_size_limit_leaves_nothing(store: ObjectStore, prefix: str, size: int) -> None:
    key = prefix + "too-big.bin"
    with pytest.raises(ObjectTooLarge, match="exceeds the limit of"):
        store.put_stream(key, chunks(b"x" * size, MiB), max_bytes=size - 1)
    assert not store.exists(key)
    assert list(store.list_objects(prefix)) == []
    assert pending_uploads(store, prefix) == []
    assert leftovers(store) == []
    # Exactly at the limit is allowed.
    assert store.put_stream(key, chunks(b"x" * size, MiB), max_bytes=size).size == size


@pytest.mark.parametrize("size", [100, 8 * MiB], ids=["small", "multipart"])
def test_failed_stream_keeps_previous_object(store: ObjectStore, prefix: str, size: int) -> None:
    key = prefix + "model.bin"
    store.put_stream(key, b"old")

    def broken() -> Iterator[bytes]:
        yield from chunks(b"y" * size, MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream(key, broken())
    assert read_all(store, key) == b"old"
    assert pending_uploads(store, prefix) == []
    assert leftovers(store) == []


def test_missing_objects(store: ObjectStore, prefix: str) -> None:
    key = prefix + "nope"
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.open(key)
    with pytest.raises(ObjectNotFound):
        store.size(key)
    store.delete(key)  # no error, as on S3


def test_list_and_delete_prefix(store: ObjectStore, prefix: str) -> None:
    for k in ("p/a/1", "p/a/2", "p/ab", "p/b/3", "q"):
        store.put_stream(prefix + k, k.encode())
    # A plain string prefix, as on S3: "p/a" also matches "p/ab".
    assert [o.key for o in store.list_objects(prefix + "p/a")] == [prefix + k for k in ("p/a/1", "p/a/2", "p/ab")]
    assert store.delete_prefix(prefix + "p/a/") == 2
    assert [o.key for o in store.list_objects(prefix)] == [prefix + k for k in ("p/ab", "p/b/3", "q")]
    store.delete(prefix + "q")
    assert [o.key for o in store.list_objects(prefix)] == [prefix + k for k in ("p/ab", "p/b/3")]


BAD_KEYS = ["../x", "a/../../x", "/etc/passwd", "", "a//b", "a/./b", "a/", "a\\b", "a\x00b", "x" * 1025]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k) if len(k) < 20 else f"len{len(k)}")
def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put_stream(key, b"data")
    with pytest.raises(InvalidKey):
        store.open(key)
    with pytest.raises(InvalidKey):
        store.exists(key)
    with pytest.raises(InvalidKey):
        store.delete(key)
    with pytest.raises(InvalidKey):
        store.presigned_get(key, 60)
    with pytest.raises(InvalidKey):
        store.create_multipart(key)


def test_invalid_prefixes_are_refused(store: ObjectStore) -> None:
    with pytest.raises(InvalidKey, match="empty prefix"):
        store.delete_prefix("")
    for bad in ("../", "/abs", "a/../b", "a\\"):
        with pytest.raises(InvalidKey):
            store.list_objects(bad)  # refused at the call, before iteration


# ----------------------------------------------------------------------------- presigned GET


def test_presigned_get(store: ObjectStore, prefix: str) -> None:
    key = prefix + "artifacts/bundle.nwc"
    data = os.urandom(200_000)
    store.put_stream(key, data)
    status, body, headers = http_get(store, store.presigned_get(key, 60, download_name="smöl bundle.nwc"))
    assert (status, body) == (200, data)
    assert "filename*=UTF-8''sm%C3%B6l%20bundle.nwc" in headers["content-disposition"]


def test_presigned_get_expires(store: ObjectStore, prefix: str) -> None:
    key = prefix + "short-lived"
    store.put_stream(key, b"soon gone")
    # 3 s, not 1: expiry counts from the signing time truncated to the second (X-Amz-Date; the local token's
    # int(time)), so a 1 s URL can have only milliseconds left when it is first fetched.
    url = store.presigned_get(key, 3)
    assert http_get(store, url)[0] == 200
    time.sleep(3.2)
    assert http_get(store, url)[0] == 403


def _flip(c: str) -> str:
    return "A" if c != "A" else "B"


def test_presigned_get_tampered(store: ObjectStore, prefix: str) -> None:
    store.put_stream(prefix + "mine", b"mine")
    store.put_stream(prefix + "other", b"other")
    url = store.presigned_get(prefix + "mine", 60)
    assert http_get(store, url)[0] == 200
    if isinstance(store, LocalStore):
        token = url.rsplit("/", 1)[1]
        payload, sig = token.split(".")
        candidates = [
            url.replace(token, payload[:-1] + _flip(payload[-1]) + "." + sig),
            url.replace(token, payload + "." + sig[:-1] + _flip(sig[-1])),
            url.replace(token, payload),  # signature stripped
            LocalStore(store.root, secret=b"another secret", base_url=store.base_url).presigned_get(
                prefix + "other", 60
            ),
        ]
    else:
        parts = urlsplit(url)
        query = parts.query
        sig_at = query.index("X-Amz-Signature=") + len("X-Amz-Signature=")
        candidates = [
            urlunsplit(parts._replace(path=parts.path.replace("/mine", "/other"))),  # another key, same signature
            urlunsplit(parts._replace(query=query[:sig_at] + _flip(query[sig_at]) + query[sig_at + 1 :])),
            urlunsplit(parts._replace(query=query.replace("X-Amz-Expires=60", "X-Amz-Expires=600"))),
            S3Config(store._client.meta.endpoint_url, "wrong", "credentials", store.bucket).store().presigned_get(
                prefix + "mine", 60
            ),
        ]
    for bad in candidates:
        assert http_get(store, bad)[0] == 403, bad


def test_local_token_checks(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, secret=SECRET, base_url="http://x/v1/store")
    token = store.presigned_get("a/b", 30, download_name="b.bin").rsplit("/", 1)[1]
    grant = verify_local_token(SECRET, token)
    assert (grant.op, grant.key, grant.download_name) == ("get", "a/b", "b.bin")
    with pytest.raises(TokenExpired):
        verify_local_token(SECRET, token, now=grant.expires_at)
    with pytest.raises(AccessDenied):
        verify_local_token(b"other", token)
    with pytest.raises(AccessDenied, match="grants 'get', not 'put_part'"):
        store.verify(token, "put_part")
    # Same signature bytes, another base64 spelling (the last character's two unused bits): still refused.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    payload, sig = token.split(".")
    respelled = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    with pytest.raises(AccessDenied):
        verify_local_token(SECRET, f"{payload}.{respelled}")
    for junk in ("", ".", "abc", "a.b.c", "!!!.???"):
        with pytest.raises(AccessDenied):
            verify_local_token(SECRET, junk)
    with pytest.raises(ValueError):
        store.presigned_get("a/b", 0)


# ----------------------------------------------------------------------------- multipart


def test_multipart_via_presigned_part_urls(store: ObjectStore, prefix: str) -> None:
    key = prefix + "upload/model.safetensors"
    part1, part2 = os.urandom(MIN_PART_SIZE), os.urandom(1000)
    upload_id = store.create_multipart(key)
    # Parts may arrive in any order (parallel clients); completion lists them in order.
    status2, etag2 = http_put_part(store, store.presigned_part_url(key, upload_id, 2, 60), part2)
    status1, etag1 = http_put_part(store, store.presigned_part_url(key, upload_id, 1, 60), part1)
    assert (status1, status2) == (200, 200) and etag1 and etag2
    assert etag1.strip('"') == hashlib.md5(part1).hexdigest()  # S3-style ETag on both backends
    assert not store.exists(key)  # nothing visible before completion
    info = store.complete_multipart(key, upload_id, [CompletedPart(1, etag1), CompletedPart(2, etag2)])
    assert info.size == len(part1) + len(part2)
    assert read_all(store, key) == part1 + part2
    assert hash_object(store, key).sha256 == hashlib.sha256(part1 + part2).hexdigest()
    assert pending_uploads(store, prefix) == []


def test_multipart_part_url_tampered_or_expired(store: ObjectStore, prefix: str) -> None:
    key = prefix + "up.bin"
    upload_id = store.create_multipart(key)
    url = store.presigned_part_url(key, upload_id, 1, 1)
    if isinstance(store, LocalStore):
        token = url.rsplit("/", 1)[1]
        payload, sig = token.split(".")
        tampered = url.replace(token, payload + "." + sig[:-1] + _flip(sig[-1]))
    else:
        tampered = url.replace("partNumber=1", "partNumber=2")
    assert http_put_part(store, tampered, b"x")[0] == 403
    time.sleep(2.2)
    assert http_put_part(store, url, b"x")[0] == 403
    store.abort_multipart(key, upload_id)
    assert pending_uploads(store, prefix) == []


def test_multipart_rejects_bad_parts(store: ObjectStore, prefix: str) -> None:
    key = prefix + "bad.bin"
    upload_id = store.create_multipart(key)
    _, e1 = http_put_part(store, store.presigned_part_url(key, upload_id, 1, 60), b"a" * 1000)
    _, e2 = http_put_part(store, store.presigned_part_url(key, upload_id, 2, 60), b"b" * 1000)
    with pytest.raises(InvalidPart):  # part 1 is below the 5 MiB minimum and not the last
        store.complete_multipart(key, upload_id, [CompletedPart(1, e1), CompletedPart(2, e2)])
    with pytest.raises(InvalidPart):  # wrong ETag
        store.complete_multipart(key, upload_id, [CompletedPart(1, '"' + "0" * 32 + '"')])
    with pytest.raises(InvalidPart):
        store.complete_multipart(key, upload_id, [])
    # A single small part is a valid (last) part.
    assert store.complete_multipart(key, upload_id, [CompletedPart(1, e1)]).size == 1000
    assert read_all(store, key) == b"a" * 1000


def test_multipart_size_limit_aborts(store: ObjectStore, prefix: str) -> None:
    key = prefix + "limit.bin"
    upload_id = store.create_multipart(key)
    _, e1 = http_put_part(store, store.presigned_part_url(key, upload_id, 1, 60), b"z" * MIN_PART_SIZE)
    _, e2 = http_put_part(store, store.presigned_part_url(key, upload_id, 2, 60), b"z" * 10)
    with pytest.raises(ObjectTooLarge):
        store.complete_multipart(
            key, upload_id, [CompletedPart(1, e1), CompletedPart(2, e2)], max_bytes=MIN_PART_SIZE + 9
        )
    assert not store.exists(key)
    assert pending_uploads(store, prefix) == []
    assert leftovers(store) == []


def test_abort_multipart(store: ObjectStore, prefix: str) -> None:
    key = prefix + "aborted.bin"
    upload_id = store.create_multipart(key)
    http_put_part(store, store.presigned_part_url(key, upload_id, 1, 60), b"q" * 100)
    assert pending_uploads(store, prefix) == [upload_id]  # the check the other tests rely on sees open uploads
    store.abort_multipart(key, upload_id)
    store.abort_multipart(key, upload_id)  # idempotent
    assert pending_uploads(store, prefix) == []
    assert not store.exists(key)


# ----------------------------------------------------------------------------- local-only behaviour


def test_local_key_conflict_and_symlink_escape(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s", secret=SECRET, base_url="http://x")
    store.put_stream("a/b", b"file")
    with pytest.raises(KeyConflict):
        store.put_stream("a/b/c", b"under a file")
    with pytest.raises(KeyConflict):
        store.put_stream("a", b"over a directory")
    assert leftovers(store) == []
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    (store.root / "objects" / "link").symlink_to(outside)
    with pytest.raises(InvalidKey, match="outside the store"):
        store.open("link/secret")


def test_local_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s", secret=SECRET, base_url="http://x")
    store.put_stream("t/m/f/x.bin", b"1")
    store.delete_prefix("t/")
    assert list((store.root / "objects").iterdir()) == []


def test_local_part_upload_unknown_upload(tmp_path: Path) -> None:
    from api.storage import UploadNotFound

    store = LocalStore(tmp_path / "s", secret=SECRET, base_url="http://x")
    upload_id = store.create_multipart("k")
    with pytest.raises(UploadNotFound):
        store.presigned_part_url("other-key", upload_id, 1, 60)
    with pytest.raises(UploadNotFound):
        store.put_part("k", "../../etc", 1, b"x")
    with pytest.raises(InvalidPart):
        store.presigned_part_url("k", upload_id, 10_001, 60)


# ----------------------------------------------------------------------------- factory


def test_make_store_from_settings(tmp_path: Path, s3_config: S3Config) -> None:  # noqa: F811
    local = make_store(Settings(data_dir=tmp_path, public_url="https://nwc.example/", secret_key="k"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "objects").resolve()
    assert local.presigned_get("a", 60).startswith("https://nwc.example/v1/store/")
    s3 = make_store(Settings(data_dir=tmp_path, s3_presign_endpoint_url="https://s3.example", **s3_config.settings()))
    assert isinstance(s3, S3Store)
    s3.ping()
    url = s3.presigned_get("a", 60)
    assert url.startswith(f"https://s3.example/{s3_config.bucket}/a?")  # path-style, public host
