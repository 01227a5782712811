"""Model uploads against a real server, on SQLite + local store and on PostgreSQL + SeaweedFS S3: streamed
PUTs, resumable multipart uploads through presigned part URLs, validation at the door (each bad input
gets its 4xx and leaves no object, no open upload and no row behind), finalize, delete, and a real
model (MiniLM) uploaded through the Python client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from api_support import (  # noqa: F401  (pytest fixtures)
    ApiServer,
    MiB,
    postgres_server,
    raw_safetensors,
    s3_config,
    safetensors_bytes,
    server,
    tiny_model_files,
)
from sqlalchemy import func, select

from api.client import NWCClient
from api.db.models import Model, ModelFile
from api.services import models as model_service
from api.services.validation import ST_DTYPES as API_DTYPES
from api.storage import read_all


def _rows(server: ApiServer, model_id: str) -> int:  # noqa: F811
    with server.db() as s:
        return s.scalar(select(func.count()).select_from(ModelFile).where(ModelFile.model_id == model_id))


def _assert_clean(server: ApiServer, tenant_id: str, model_id: str) -> None:  # noqa: F811
    """Nothing stored for the model: no objects, no open multipart uploads, no file rows, no temp files."""
    assert server.objects(tenant_id) == []
    assert server.open_uploads(tenant_id) == []
    assert _rows(server, model_id) == 0
    if server.backend == "sqlite-local":
        assert list((server.store.root / "tmp").iterdir()) == []  # type: ignore[attr-defined]


def test_dtypes_match_the_codec() -> None:
    from codec.source import ST_DTYPES

    assert API_DTYPES == set(ST_DTYPES)


def test_every_codec_dtype_passes_the_header_check() -> None:
    """The safetensors library reads each accepted dtype's header (no numpy type needed, e.g. BF16, F8)."""
    import io

    from api.services.validation import check_safetensors

    header, offset = {}, 0
    for i, dtype in enumerate(sorted(API_DTYPES)):
        size = 3 * {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
        header[f"t{i}"] = {"dtype": dtype, "shape": [3], "data_offsets": [offset, offset + size]}
        offset += size
    data = raw_safetensors(header, b"\0" * offset)
    check_safetensors("model.safetensors", io.BytesIO(data).read, len(data))


def test_streamed_upload_finalize_list_delete(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    r = c.post("/v1/models", json={"name": "tiny"})
    assert r.status_code == 201 and r.json()["state"] == "uploading"
    mid = r.json()["id"]
    files = tiny_model_files() | {"sub/dir/vocab.txt": b"a\nb\n", "chat_template.jinja": b"{{ x }}"}
    for name, data in files.items():
        # a generator body: chunked transfer, no Content-Length
        r = c.put(f"/v1/models/{mid}/files/{name}", content=iter([data[:10], data[10:]]))
        assert r.status_code == 201, r.text
        assert r.json()["size"] == len(data) and r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    # replacing a file keeps one row and drops the old object
    r = c.put(f"/v1/models/{mid}/files/config.json", content=b'{"model_type": "bert"}')
    assert r.status_code == 201
    detail = c.get(f"/v1/models/{mid}").json()
    assert sorted(f["path"] for f in detail["files"]) == sorted(files)
    assert len(server.objects(t.id)) == len(files)
    assert c.delete(f"/v1/models/{mid}/files/chat_template.jinja").status_code == 204
    r = c.post(f"/v1/models/{mid}/finalize")
    assert r.status_code == 200, r.text
    m = r.json()
    expect = sum(len(v) for k, v in files.items() if k not in ("config.json", "chat_template.jinja")) + 22
    assert m["state"] == "ready" and m["total_bytes"] == expect and m["file_count"] == len(files) - 1
    # a ready model is immutable
    r = c.put(f"/v1/models/{mid}/files/extra.json", content=b"{}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_uploading"
    assert c.post(f"/v1/models/{mid}/finalize").status_code == 409
    page = c.get("/v1/models", params={"state": "ready"}).json()
    assert [x["id"] for x in page["items"]] == [mid] and page["items"][0]["file_count"] == len(files) - 1
    assert c.get("/v1/models", params={"state": "uploading"}).json()["items"] == []
    # stored objects are the bytes that were sent
    with server.db() as s:
        row = s.scalars(select(ModelFile).where(ModelFile.model_id == mid, ModelFile.path == "model.safetensors")).one()
        assert read_all(server.store, row.key) == files["model.safetensors"]
    assert c.delete(f"/v1/models/{mid}").status_code == 204
    assert c.get(f"/v1/models/{mid}").status_code == 404
    _assert_clean(server, t.id, mid)


GOOD_HEADER = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
BAD_FILES: list[tuple[str, str, bytes, int, str]] = [
    ("truncated-length", "model.safetensors", b"\x10\x00\x00", 422, "invalid_safetensors"),
    ("empty", "model.safetensors", b"", 422, "invalid_safetensors"),
    ("garbage-header", "model.safetensors", raw_safetensors(b"{not json at all", b""), 422, "invalid_safetensors"),
    ("header-not-object", "model.safetensors", raw_safetensors(b"[1, 2, 3]      "), 422, "invalid_safetensors"),
    ("header-length-too-big", "model.safetensors", raw_safetensors(GOOD_HEADER, b"\0" * 16, length=1 << 40), 422,
     "invalid_safetensors"),
    ("header-truncated", "model.safetensors", raw_safetensors(GOOD_HEADER, b"\0" * 16)[:30], 422,
     "invalid_safetensors"),
    ("offsets-beyond-file", "model.safetensors", raw_safetensors(GOOD_HEADER, b"\0" * 8), 422, "invalid_safetensors"),
    ("offsets-too-short-for-shape", "model.safetensors",
     raw_safetensors({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16), 422,
     "invalid_safetensors"),
    ("overlapping", "model.safetensors", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24), 422, "invalid_safetensors"),
    ("gap", "model.safetensors", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16), 422, "invalid_safetensors"),
    ("trailing-bytes", "model.safetensors", raw_safetensors(GOOD_HEADER, b"\0" * 20), 422, "invalid_safetensors"),
    ("bad-dtype", "model.safetensors",
     raw_safetensors({"w": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), 422,
     "invalid_safetensors"),
    ("negative-shape", "model.safetensors",
     raw_safetensors({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), 422,
     "invalid_safetensors"),
    ("pickle-bin", "pytorch_model.bin", b"\x80\x04K\x01.", 422, "pickle_refused"),
    ("pickle-pt", "model.pt", b"PK\x03\x04", 422, "pickle_refused"),
    ("pickle-pth", "weights.pth", b"x", 422, "pickle_refused"),
    ("pickle-pkl", "state.pkl", b"x", 422, "pickle_refused"),
    ("pickle-ckpt", "last.ckpt", b"x", 422, "pickle_refused"),
    ("python-file", "modeling_custom.py", b"import os", 422, "file_type_not_allowed"),
    ("no-suffix", "weights", b"x", 422, "file_type_not_allowed"),
    ("traversal", "%2E%2E%2Fescape.json", b"{}", 400, "invalid_path"),
    ("traversal-nested", "a%2F..%2F..%2Fescape.json", b"{}", 400, "invalid_path"),
    ("hidden", ".env.json", b"{}", 400, "invalid_path"),
    ("backslash", "a%5C..%5Cb.json", b"{}", 400, "invalid_path"),
    ("control-char", "a%0Ab.json", b"{}", 404, "not_found"),  # no route matches a path with a newline
    ("space", "my%20config.json", b"{}", 400, "invalid_path"),
    ("empty-segment", "a%2F%2Fb.json", b"{}", 400, "invalid_path"),
    ("too-deep", "a/b/c/d/e.json", b"{}", 400, "invalid_path"),
    ("trust-remote-code", "config.json", json.dumps({"auto_map": {"AutoModel": "x.Y"}}).encode(), 422,
     "trust_remote_code_refused"),
    ("trust-remote-code-flag", "config.json", json.dumps({"trust_remote_code": True}).encode(), 422,
     "trust_remote_code_refused"),
    ("tokenizer-auto-map", "tokenizer_config.json",
     json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}).encode(), 422, "trust_remote_code_refused"),
    ("config-not-json", "config.json", b"{'python': 'dict'}", 422, "invalid_config"),
    ("config-not-object", "config.json", b"[1]", 422, "invalid_config"),
    ("config-not-utf8", "config.json", b"\xff\xfe{}", 422, "invalid_config"),
    ("index-names-pickle", "model.safetensors.index.json",
     json.dumps({"weight_map": {"w": "pytorch_model.bin"}}).encode(), 422, "invalid_config"),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), [b[1:] for b in BAD_FILES],
                         ids=[b[0] for b in BAD_FILES])
def test_bad_uploads_leave_nothing(server: ApiServer, name: str, data: bytes, status: int, code: str) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "bad"}).json()["id"]
    r = c.put(f"/v1/models/{mid}/files/{name}", content=data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    _assert_clean(server, t.id, mid)
    # the same names are refused on the multipart route, before any part is sent
    if status == 400 or code in ("pickle_refused", "file_type_not_allowed"):
        from urllib.parse import unquote

        r = c.post(f"/v1/models/{mid}/uploads", json={"path": unquote(name), "size": 10})
        assert r.status_code == status and r.json()["error"]["code"] == code
        _assert_clean(server, t.id, mid)


@pytest.mark.parametrize("name", ["a\nb.json", "a\x00b.json", "../x.json", "/etc/passwd.json", "C:x.json",
                                  "a/./b.json", "ü/../x.json", "x" * 600 + ".json"])
def test_unsafe_names_in_multipart(server: ApiServer, name: str) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "x"}).json()["id"]
    r = c.post(f"/v1/models/{mid}/uploads", json={"path": name, "size": 10})
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["code"] in ("invalid_path", "validation_error")
    _assert_clean(server, t.id, mid)


def test_oversize_uploads(server: ApiServer, small_limit: int) -> None:  # noqa: F811
    """The per-file limit (16 MiB in these tests) and the tenant quota: 413 with or without Content-Length."""
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "big"}).json()["id"]
    big = safetensors_bytes(n=2100)  # ≈ 17.6 MB
    assert len(big) > 16 * MiB
    r = c.put(f"/v1/models/{mid}/files/model.safetensors", content=big)  # Content-Length: refused up front
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    assert r.json()["error"]["detail"] == {"max_bytes": 16 * MiB}
    _assert_clean(server, t.id, mid)
    chunks = [big[i: i + MiB] for i in range(0, len(big), MiB)]
    r = c.put(f"/v1/models/{mid}/files/model.safetensors", content=iter(chunks))  # chunked: refused mid-stream
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    _assert_clean(server, t.id, mid)
    r = c.post(f"/v1/models/{mid}/uploads", json={"path": "model.safetensors", "size": 17 * MiB})
    assert r.status_code == 413
    _assert_clean(server, t.id, mid)
    # the tenant's storage quota
    q = server.new_tenant(max_storage_bytes=100_000)
    cq = server.client(q.token)
    qm = cq.post("/v1/models", json={"name": "q"}).json()["id"]
    r = cq.put(f"/v1/models/{qm}/files/model.safetensors", content=iter([safetensors_bytes(n=200)]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "storage_quota_exceeded"
    _assert_clean(server, q.id, qm)
    assert cq.put(f"/v1/models/{qm}/files/model.safetensors", content=safetensors_bytes(n=64)).status_code == 201


def test_finalize_checks(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "x"}).json()["id"]
    r = c.post(f"/v1/models/{mid}/finalize")
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_weights"
    c.put(f"/v1/models/{mid}/files/model-00001-of-00002.safetensors", content=safetensors_bytes(1))
    r = c.post(f"/v1/models/{mid}/finalize")
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_config"
    c.put(f"/v1/models/{mid}/files/config.json", content=b'{"model_type": "llama"}')
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    c.put(f"/v1/models/{mid}/files/model.safetensors.index.json", content=json.dumps(index).encode())
    r = c.post(f"/v1/models/{mid}/finalize")
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_shards"
    assert r.json()["error"]["detail"] == {"missing": ["model-00002-of-00002.safetensors"]}
    up = c.post(f"/v1/models/{mid}/uploads", json={"path": "model-00002-of-00002.safetensors", "size": 100}).json()
    r = c.post(f"/v1/models/{mid}/finalize")
    assert r.status_code == 409 and r.json()["error"]["code"] == "uploads_open"
    assert r.json()["error"]["detail"]["upload_ids"] == [up["upload_id"]]
    assert c.delete(f"/v1/models/{mid}/uploads/{up['upload_id']}").status_code == 204
    assert server.open_uploads(t.id) == []
    c.put(f"/v1/models/{mid}/files/model-00002-of-00002.safetensors", content=safetensors_bytes(2))
    r = c.post(f"/v1/models/{mid}/finalize")
    assert r.status_code == 200 and r.json()["state"] == "ready"


# ----------------------------------------------------------------------------- multipart


@pytest.fixture
def small_limit(server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> int:  # noqa: F811
    """A per-file upload limit of 16 MiB (the servers' settings object is read at each request)."""
    monkeypatch.setattr(server.settings, "upload_max_bytes", 16 * MiB)
    return 16 * MiB


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """The server proposes 5 MiB parts (the S3 minimum) instead of 64 MiB, so a 12 MiB file has 3 parts."""
    monkeypatch.setattr(model_service, "DEFAULT_PART_SIZE", 5 * MiB)
    return 5 * MiB


def _put(url: str, data: bytes) -> httpx.Response:
    with httpx.Client(timeout=60) as h:  # no API key: the presigned URL authorizes the part
        return h.put(url, content=data)


def test_multipart_upload_and_resume(server: ApiServer, small_parts: int) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "mp"}).json()["id"]
    data = safetensors_bytes(seed=3, n=1770)  # ≈ 12.5 MB: parts of 5, 5 and 2.5 MiB
    r = c.post(f"/v1/models/{mid}/uploads", json={"path": "model.safetensors", "size": len(data)})
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["part_size"] == small_parts and up["part_count"] == 3
    uid = up["upload_id"]
    parts = {}
    urls = {p["part_number"]: p["url"] for p in
            c.post(f"/v1/models/{mid}/uploads/{uid}/parts", json={"part_numbers": [1, 2]}).json()["parts"]}
    for n in (1, 2):
        r = _put(urls[n], data[(n - 1) * small_parts: n * small_parts])
        assert r.status_code == 200, r.text
        parts[n] = r.headers["etag"]
    # "the client crashed": it resumes from the upload id, asks for the missing part's URL and finishes
    assert c.get(f"/v1/models/{mid}/uploads/{uid}").json() == up
    url3 = c.post(f"/v1/models/{mid}/uploads/{uid}/parts", json={"part_numbers": [3]}).json()["parts"][0]["url"]
    r = _put(url3, data[2 * small_parts:])
    parts[3] = r.headers["etag"]
    assert c.post(f"/v1/models/{mid}/uploads/{uid}/parts", json={"part_numbers": [4]}).status_code == 422
    # a wrong ETag is refused and the upload stays open for a corrected completion
    r = c.post(f"/v1/models/{mid}/uploads/{uid}/complete",
               json={"parts": [{"part_number": 1, "etag": parts[2]}, {"part_number": 2, "etag": parts[2]},
                               {"part_number": 3, "etag": parts[3]}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parts", r.text
    r = c.post(f"/v1/models/{mid}/uploads/{uid}/complete",
               json={"parts": [{"part_number": n, "etag": e} for n, e in sorted(parts.items())]})
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(data) and r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert server.open_uploads(t.id) == []
    assert c.get(f"/v1/models/{mid}/uploads/{uid}").status_code == 404
    c.put(f"/v1/models/{mid}/files/config.json", content=b"{}")
    assert c.post(f"/v1/models/{mid}/finalize").json()["total_bytes"] == len(data) + 2


@pytest.mark.parametrize("case", ["invalid-header", "size-mismatch", "over-limit", "abort"])
def test_multipart_failures_leave_nothing(
    server: ApiServer, small_parts: int, small_limit: int, case: str  # noqa: F811
) -> None:
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "mp"}).json()["id"]
    good = safetensors_bytes(seed=4, n=1300)  # ≈ 6.8 MB, 2 parts
    data = {"invalid-header": b"\xff" * 8 + good[8:], "size-mismatch": good[:-1000], "over-limit": good,
            "abort": good}[case]
    declared = len(good)
    if case == "over-limit":
        # the declared size passes; the parts sent carry more (a presigned PUT cannot be capped by the store)
        declared = 16 * MiB
        data = good + b"\0" * (16 * MiB - len(good) + 10)
    up = c.post(f"/v1/models/{mid}/uploads", json={"path": "model.safetensors", "size": declared}).json()
    uid, ps = up["upload_id"], up["part_size"]
    numbers = list(range(1, -(-len(data) // ps) + 1))
    urls = c.post(f"/v1/models/{mid}/uploads/{uid}/parts", json={"part_numbers": numbers}).json()
    urls = {p["part_number"]: p["url"] for p in urls["parts"]}
    chunks = [data[i * ps: (i + 1) * ps] for i in range(len(numbers))]
    etags = [_put(urls[n], chunk).headers["etag"] for n, chunk in zip(numbers, chunks, strict=True)]
    if case == "abort":
        assert c.delete(f"/v1/models/{mid}/uploads/{uid}").status_code == 204
    else:
        r = c.post(f"/v1/models/{mid}/uploads/{uid}/complete",
                   json={"parts": [{"part_number": n, "etag": e} for n, e in zip(numbers, etags, strict=True)]})
        expected = {"invalid-header": (422, "invalid_safetensors"), "size-mismatch": (422, "size_mismatch"),
                    "over-limit": (413, "upload_too_large")}[case]
        assert (r.status_code, r.json()["error"]["code"]) == expected, r.text
    _assert_clean(server, t.id, mid)
    assert c.get(f"/v1/models/{mid}/uploads/{uid}").status_code == 404


def test_model_delete_aborts_open_uploads(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "x"}).json()["id"]
    c.put(f"/v1/models/{mid}/files/config.json", content=b"{}")
    c.post(f"/v1/models/{mid}/uploads", json={"path": "model.safetensors", "size": 6 * MiB})
    assert server.open_uploads(t.id) and server.objects(t.id)
    assert c.delete(f"/v1/models/{mid}").status_code == 204
    _assert_clean(server, t.id, mid)
    with server.db() as s:
        assert s.get(Model, mid) is None


def test_real_model_through_the_client(server: ApiServer, minilm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """all-MiniLM-L6-v2 (90 MB of safetensors) uploaded by the Python client; the weights go multipart."""
    t = server.new_tenant()
    with NWCClient(server.base_url, t.token, multipart_threshold=32 * MiB) as nwc:
        seen: list[str] = []
        m = nwc.upload_model_dir(minilm_dir, "minilm", on_file=lambda rel, size: seen.append(rel))
    assert m.state == "ready"
    assert "model.safetensors" in seen and "1_Pooling/config.json" in seen and "README.md" not in seen
    local = {p.relative_to(minilm_dir).as_posix(): p for p in minilm_dir.rglob("*") if p.is_file()}
    for f in m.files:
        assert f.size == local[f.path].stat().st_size
    st = next(f for f in m.files if f.path == "model.safetensors")
    with local["model.safetensors"].open("rb") as fh:
        assert st.sha256 == hashlib.file_digest(fh, "sha256").hexdigest()
