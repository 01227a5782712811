"""Typed Python client of the NWC service (httpx + the API's own pydantic schemas).

    from api.client import NWCClient

    with NWCClient("https://nwc.example.com", api_key="nwc_…") as nwc:
        model = nwc.upload_model_dir("SmolLM2-135M-Instruct/")          # or nwc.import_model("owner/name")
        job = nwc.submit_job(model.id, target_bits=4, calibration="wiki")
        job = nwc.wait_job(job.id)
        paths = nwc.download_artifacts(job.id, "out/")                   # sha256 checked

Files over `multipart_threshold` go up as resumable multipart uploads through presigned part URLs
(parts retried, URLs renewed when they expire); smaller ones stream in one PUT. Nothing is read
into memory whole. Errors from the service raise ApiError with its code, message and detail.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from api.schemas.common import Page
from api.schemas.jobs import ArtifactOut, CalibrationOut, EventOut, JobCreate, JobDetail, JobOut, JobTuning
from api.schemas.models import (
    MODEL_FILE_SUFFIXES,
    PICKLE_SUFFIXES,
    HubImport,
    ModelCreate,
    ModelDetail,
    ModelFileOut,
    ModelOut,
    PartUrlsOut,
    UploadOut,
)

__all__ = [
    "NWCClient",
    "ApiError",
    "ChecksumError",
    "TERMINAL_STATES",
    "model_files",
]

T = TypeVar("T", bound=BaseModel)
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
CHUNK = 1 << 20
DEFAULT_MULTIPART_THRESHOLD = 256 << 20
PART_RETRIES = 4


class ApiError(Exception):
    """An error answer of the service: HTTP status, stable code, message, detail, request id."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None, request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.request_id = request_id


class ChecksumError(Exception):
    """A downloaded artifact does not match the sha256 the service recorded (the partial file is removed)."""


def model_files(directory: Path) -> list[tuple[str, Path]]:
    """(name in the model, local path) of the files upload_model_dir sends, sorted; hidden files are skipped."""
    directory = Path(directory)
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in MODEL_FILE_SUFFIXES:
            out.append((rel.as_posix(), p))
    return out


def _file_chunks(f: BinaryIO, length: int, on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
    left = length
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise OSError("file shrank while it was being uploaded")
        left -= len(chunk)
        if on_bytes:
            on_bytes(len(chunk))
        yield chunk


S = TypeVar("S", ModelDetail, JobDetail)


def _wait(fetch: Callable[[], S], until: Collection[str], what: str, timeout: float | None, poll: float,
          on_update: Callable[[S], None] | None = None) -> S:
    """fetch() every `poll` seconds until its state is in `until`; TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        obj = fetch()
        if on_update:
            on_update(obj)
        if obj.state in until:
            return obj
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} still {obj.state} after {timeout} s")
        time.sleep(poll)


class NWCClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("NWC_API_URL") or "http://127.0.0.1:8000"
        api_key = api_key or os.environ.get("NWC_API_KEY")
        if not api_key:
            raise ValueError("an API key is needed: pass api_key or set NWC_API_KEY")
        self.base_url = base_url.rstrip("/")
        self.multipart_threshold = multipart_threshold
        self._http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=timeout, transport=transport)
        # Presigned URLs carry their own authorization: never send the API key to them (S3 would refuse it).
        self._plain = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> NWCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        r.read()
        try:
            err = r.json()["error"]
            code, message, detail = err["code"], err["message"], err.get("detail")
        except (ValueError, KeyError, TypeError):
            code, message, detail = "http_error", r.text[:500] or r.reason_phrase, None
        raise ApiError(r.status_code, code, message, detail, r.headers.get("x-request-id"))

    def _call(self, method: str, path: str, model: type[T] | None = None, **kw: Any) -> Any:
        r = self._http.request(method, path, **kw)
        self._raise(r)
        if model is None:
            return r.json() if r.content else None
        return model.model_validate(r.json())

    # ------------------------------------------------------------------ models

    def create_model(self, name: str) -> ModelOut:
        return self._call("POST", "/v1/models", ModelOut, json=ModelCreate(name=name).model_dump())

    def get_model(self, model_id: str) -> ModelDetail:
        return self._call("GET", f"/v1/models/{model_id}", ModelDetail)

    def list_models(self, *, state: str | None = None, cursor: str | None = None, limit: int = 50) -> Page[ModelOut]:
        params = {k: v for k, v in {"state": state, "cursor": cursor, "limit": limit}.items() if v is not None}
        return self._call("GET", "/v1/models", Page[ModelOut], params=params)

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/v1/models/{model_id}")

    def finalize_model(self, model_id: str) -> ModelDetail:
        return self._call("POST", f"/v1/models/{model_id}/finalize", ModelDetail)

    def upload_file(
        self, model_id: str, local: Path | str, name: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> ModelFileOut:
        """One file into a model being uploaded: a streamed PUT, or multipart above multipart_threshold."""
        local = Path(local)
        name = name or local.name
        size = local.stat().st_size
        if size > self.multipart_threshold:
            return self.upload_file_multipart(model_id, local, name, on_bytes=on_bytes)
        with local.open("rb") as f:
            r = self._http.put(
                f"/v1/models/{model_id}/files/{name}", content=_file_chunks(f, size, on_bytes),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )
        self._raise(r)
        return ModelFileOut.model_validate(r.json())

    def upload_file_multipart(
        self, model_id: str, local: Path | str, name: str | None = None, *,
        on_bytes: Callable[[int], None] | None = None, done: dict[int, str] | None = None,
        upload_id: str | None = None,
    ) -> ModelFileOut:
        """Multipart upload through presigned part URLs. To resume an interrupted one, pass its `upload_id`
        and the `done` parts ({part_number: etag}); `done` is filled in as parts succeed."""
        local = Path(local)
        name = name or local.name
        size = local.stat().st_size
        if upload_id is None:
            up = self._call("POST", f"/v1/models/{model_id}/uploads", UploadOut, json={"path": name, "size": size})
            upload_id, part_size, count = up.upload_id, up.part_size, up.part_count
        else:
            up = self._call("GET", f"/v1/models/{model_id}/uploads/{upload_id}", UploadOut)
            if up.size != size:
                raise ValueError(f"upload {upload_id} was started for {up.size} bytes, the file has {size}")
            part_size, count = up.part_size, up.part_count
        done = {} if done is None else done
        todo = [n for n in range(1, count + 1) if n not in done]
        with local.open("rb") as f:
            for batch_start in range(0, len(todo), 100):
                batch = todo[batch_start: batch_start + 100]
                urls = self._part_urls(model_id, upload_id, batch)
                for n in batch:
                    offset = (n - 1) * part_size
                    length = min(part_size, size - offset)
                    done[n] = self._put_part(model_id, upload_id, n, urls, f, offset, length, on_bytes)
        parts = [{"part_number": n, "etag": done[n]} for n in sorted(done)]
        return self._call("POST", f"/v1/models/{model_id}/uploads/{upload_id}/complete", ModelFileOut,
                          json={"parts": parts})

    def _part_urls(self, model_id: str, upload_id: str, numbers: Sequence[int]) -> dict[int, str]:
        out = self._call("POST", f"/v1/models/{model_id}/uploads/{upload_id}/parts", PartUrlsOut,
                         json={"part_numbers": list(numbers)})
        return {p.part_number: p.url for p in out.parts}

    def _put_part(
        self, model_id: str, upload_id: str, n: int, urls: dict[int, str], f: BinaryIO, offset: int, length: int,
        on_bytes: Callable[[int], None] | None,
    ) -> str:
        last: Exception | None = None
        for attempt in range(PART_RETRIES):
            f.seek(offset)
            try:
                r = self._plain.put(urls[n], content=_file_chunks(f, length),
                                    headers={"Content-Length": str(length)})
                if r.status_code == 403:  # expired URL: get a fresh one and go again
                    urls.update(self._part_urls(model_id, upload_id, [n]))
                    last = ApiError(403, "url_expired", f"part {n}: presigned URL refused")
                    continue
                self._raise(r)
                etag = r.headers.get("etag")
                if not etag:
                    raise ApiError(r.status_code, "no_etag", f"part {n}: the store returned no ETag")
                if on_bytes:
                    on_bytes(length)
                return etag
            except (httpx.TransportError, ApiError) as e:
                if isinstance(e, ApiError) and e.status < 500:
                    raise
                last = e
                time.sleep(min(2**attempt, 10))
        raise RuntimeError(f"part {n} failed after {PART_RETRIES} attempts: {last}")

    def abort_upload(self, model_id: str, upload_id: str) -> None:
        self._call("DELETE", f"/v1/models/{model_id}/uploads/{upload_id}")

    def upload_model_dir(
        self, directory: Path | str, name: str | None = None, *, finalize: bool = True,
        on_file: Callable[[str, int], None] | None = None,
    ) -> ModelDetail:
        """Upload a model directory (safetensors shards, config, tokenizer files) and finalize it."""
        directory = Path(directory)
        files = model_files(directory)
        pickles = [p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if not any(n.endswith(".safetensors") for n, _ in files):
            hint = f" (it has pickle files {pickles}: convert them to safetensors)" if pickles else ""
            raise ValueError(f"{directory} holds no .safetensors files{hint}")
        model = self.create_model(name or directory.resolve().name)
        for rel, path in files:
            if on_file:
                on_file(rel, path.stat().st_size)
            self.upload_file(model.id, path, rel)
        return self.finalize_model(model.id) if finalize else self.get_model(model.id)

    def import_model(
        self, hub_id: str, revision: str = "main", *, token: str | None = None, name: str | None = None,
        endpoint: str | None = None,
    ) -> ModelOut:
        body = HubImport(hub_id=hub_id, revision=revision, token=token, name=name, endpoint=endpoint)  # type: ignore
        payload = body.model_dump(exclude_none=True)
        if token is not None:
            payload["token"] = token
        return self._call("POST", "/v1/models/import", ModelOut, json=payload)

    def wait_model(self, model_id: str, *, timeout: float | None = None, poll: float = 1.0) -> ModelDetail:
        """Poll until the model is ready or failed (imports)."""
        return _wait(lambda: self.get_model(model_id), {"ready", "failed"}, f"model {model_id}", timeout, poll)

    # ------------------------------------------------------------------ calibration

    def upload_calibration(self, local: Path | str, name: str | None = None) -> CalibrationOut:
        local = Path(local)
        size = local.stat().st_size
        with local.open("rb") as f:
            r = self._http.post("/v1/calibration-texts", params={"name": name or local.name},
                                content=_file_chunks(f, size), headers={"Content-Length": str(size)})
        self._raise(r)
        return CalibrationOut.model_validate(r.json())

    # ------------------------------------------------------------------ jobs

    def submit_job(
        self, model_id: str, target_bits: float | None, *, method: str = "nwc", calibration: str | None = None,
        outputs: Sequence[str] | None = None, webhook_url: str | None = None, idempotency_key: str | None = None,
        tuning: JobTuning | None = None,
    ) -> JobDetail:
        body: dict[str, Any] = {"model_id": model_id, "method": method}
        if target_bits is not None:  # None for the pruning methods (tuning.sparsity or tuning.pattern instead)
            body["target_bits"] = target_bits
        if tuning is not None:
            body["tuning"] = tuning.model_dump(exclude_unset=True)
        if calibration is not None:
            body["calibration"] = calibration
        if outputs is not None:
            body["outputs"] = list(outputs)
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        JobCreate.model_validate(body)  # the server's own validation, before the round trip
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", JobDetail, json=body, headers=headers)

    def get_job(self, job_id: str) -> JobDetail:
        return self._call("GET", f"/v1/jobs/{job_id}", JobDetail)

    def list_jobs(
        self, *, state: str | None = None, model_id: str | None = None, method: str | None = None,
        cursor: str | None = None, limit: int = 50,
    ) -> Page[JobOut]:
        params = {"state": state, "model_id": model_id, "method": method, "cursor": cursor, "limit": limit}
        return self._call("GET", "/v1/jobs", Page[JobOut], params={k: v for k, v in params.items() if v is not None})

    def iter_jobs(self, **filters: Any) -> Iterator[JobOut]:
        cursor = None
        while True:
            page = self.list_jobs(cursor=cursor, **filters)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def job_events(self, job_id: str, after: int | None = None) -> list[EventOut]:
        params = {"after": after} if after is not None else {}
        return TypeAdapter(list[EventOut]).validate_python(self._call("GET", f"/v1/jobs/{job_id}/events",
                                                                      params=params))

    def wait_job(
        self, job_id: str, *, timeout: float | None = None, poll: float = 2.0,
        on_update: Callable[[JobDetail], None] | None = None,
    ) -> JobDetail:
        """Poll until the job is succeeded, failed or cancelled; `on_update` sees every poll."""
        return _wait(lambda: self.get_job(job_id), TERMINAL_STATES, f"job {job_id}", timeout, poll, on_update)

    def cancel_job(self, job_id: str) -> JobOut:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel", JobOut)

    def retry_job(self, job_id: str) -> JobOut:
        return self._call("POST", f"/v1/jobs/{job_id}/retry", JobOut)

    def delete_job(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def list_artifacts(self, job_id: str) -> list[ArtifactOut]:
        return TypeAdapter(list[ArtifactOut]).validate_python(self._call("GET", f"/v1/jobs/{job_id}/artifacts"))

    def get_report(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/report")

    def download_artifacts(
        self, job_id: str, dest: Path | str, *, kinds: Sequence[str] | None = None,
        on_file: Callable[[ArtifactOut], None] | None = None,
    ) -> list[Path]:
        """Download a job's artifacts (all, or those of `kinds`) under `dest`, keeping their relative names.

        Each file is streamed to `<name>.part`, its sha256 compared with the service's, then renamed into place;
        a mismatch removes the partial file and raises ChecksumError.
        """
        dest = Path(dest)
        out = []
        for art in self.list_artifacts(job_id):
            if kinds is not None and art.kind not in kinds:
                continue
            rel = PurePosixPath(art.name)
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise ValueError(f"unsafe artifact name {art.name!r}")
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if on_file:
                on_file(art)
            tmp = target.with_name(target.name + ".part")
            h = hashlib.sha256()
            size = 0
            try:
                with self._plain.stream("GET", art.url) as r, tmp.open("wb") as f:
                    self._raise(r)
                    for chunk in r.iter_bytes(CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
                if size != art.size or h.hexdigest() != art.sha256:
                    raise ChecksumError(f"{art.name}: got {size} bytes with sha256 {h.hexdigest()}, expected "
                                        f"{art.size} bytes with sha256 {art.sha256}")
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
            out.append(target)
        return out
