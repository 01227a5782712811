"""Models (the weights a tenant brings): upload, multipart upload, Hub import."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = [
    "ModelCreate",
    "HubImport",
    "ModelFileOut",
    "ModelOut",
    "ModelDetail",
    "UploadCreate",
    "UploadOut",
    "PartUrlsRequest",
    "PartUrl",
    "PartUrlsOut",
    "CompletedPartIn",
    "UploadComplete",
    "ModelStateName",
    "MODEL_FILE_SUFFIXES",
    "ALLOWED_SUFFIXES",
    "PICKLE_SUFFIXES",
]

ModelStateName = Literal["uploading", "importing", "ready", "failed"]

# The files of a model directory that uploads (api.client) and Hub imports send: weights, JSON configs,
# tokenizer files, chat templates. The server also accepts a model card (.md), and refuses pickle-based
# checkpoints (they run arbitrary code when loaded) by name, before a byte is read.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")
ALLOWED_SUFFIXES = frozenset({*MODEL_FILE_SUFFIXES, ".md"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})

_FILE_EXAMPLE = {
    "path": "model.safetensors",
    "size": 538090408,
    "sha256": "5b1c0a3e2f4d6c8b9a7e1f2d3c4b5a6978e1f2d3c4b5a69788e1f2d3c4b5a697",
    "created_at": "2026-11-23T10:15:02Z",
}
_MODEL_EXAMPLE = {
    "id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b",
    "name": "SmolLM2-135M-Instruct",
    "source": "upload",
    "hub_id": None,
    "hub_revision": None,
    "state": "ready",
    "total_bytes": 541883320,
    "file_count": 6,
    "error": None,
    "created_at": "2026-11-23T10:14:40Z",
    "updated_at": "2026-11-23T10:15:09Z",
}


class ModelCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "SmolLM2-135M-Instruct"}]})

    name: str = Field(min_length=1, max_length=300, description="A label for the model (not unique).")


class HubImport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
                {"hub_id": "meta-llama/Llama-3.2-1B", "revision": "main", "token": "hf_…"},
            ]
        }
    )

    hub_id: str = Field(
        min_length=1, max_length=96, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        description="Hugging Face model id, `owner/name`.",
    )
    revision: str = Field(
        default="main", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Branch, tag or commit sha.",
    )
    token: SecretStr | None = Field(
        default=None,
        description="Your Hugging Face token, for gated or private models. Used for this import only, never stored.",
    )
    endpoint: str | None = Field(
        default=None, max_length=300,
        description="Hub endpoint; accepted only when the deployment allows it (NWC_HF_ALLOW_REQUEST_ENDPOINT). "
        "Default: the deployment's NWC_HF_ENDPOINT, else huggingface.co.",
    )
    name: str | None = Field(default=None, max_length=300, description="Label; defaults to the hub id.")


class ModelFileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [_FILE_EXAMPLE]})

    path: str
    size: int
    sha256: str
    created_at: datetime


class ModelOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_MODEL_EXAMPLE]})

    id: str
    name: str
    source: Literal["upload", "hub"]
    hub_id: str | None = None
    hub_revision: str | None = Field(default=None, description="For imports: the resolved commit sha.")
    state: ModelStateName = Field(
        description="`uploading` (files arriving; finalize when done), `importing` (Hub download running), "
        "`ready` (jobs may use it), `failed` (see `error`)."
    )
    total_bytes: int
    file_count: int
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class ModelDetail(ModelOut):
    model_config = ConfigDict(json_schema_extra={"examples": [{**_MODEL_EXAMPLE, "files": [_FILE_EXAMPLE],
                                                                        "parameter_count": 134515008}]})

    files: list[ModelFileOut]
    parameter_count: int | None = Field(
        default=None,
        description="Parameters in the model's safetensors files, summed from their headers (what a job's "
        "output size follows: about target_bits × parameter_count / 8 bytes); null when no header could be read.",
    )


class UploadCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"path": "model-00001-of-00004.safetensors", "size": 4_976_698_672}]}
    )

    path: str = Field(min_length=1, max_length=512, description="File name inside the model directory.")
    size: int = Field(gt=0, description="Total size in bytes (checked against the limits before any part arrives).")


class UploadOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "upload_id": "upl_6f1e2d3c4b5a69788e1f2d3c4b5a6978",
                    "path": "model-00001-of-00004.safetensors",
                    "size": 4_976_698_672,
                    "part_size": 67_108_864,
                    "part_count": 75,
                }
            ]
        }
    )

    upload_id: str
    path: str
    size: int
    part_size: int = Field(description="Send parts of exactly this size (the last one may be smaller).")
    part_count: int


class PartUrlsRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"part_numbers": [1, 2, 3]}]})

    part_numbers: list[int] = Field(min_length=1, max_length=1000, description="1-based part numbers (≤ 10000).")


class PartUrl(BaseModel):
    part_number: int
    url: str = Field(description="HTTP PUT the part's bytes here; keep the response's ETag header.")
    expires_at: datetime


class PartUrlsOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "parts": [
                        {
                            "part_number": 1,
                            "url": "http://127.0.0.1:8000/v1/store/eyJleHAiOjE3…",
                            "expires_at": "2026-11-23T10:30:00Z",
                        }
                    ]
                }
            ]
        }
    )

    parts: list[PartUrl]


class CompletedPartIn(BaseModel):
    part_number: int = Field(ge=1, le=10000)
    etag: str = Field(min_length=1, max_length=200)


class UploadComplete(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"parts": [{"part_number": 1, "etag": '"9b2cf535f27731c974343645a3985328"'}]}]}
    )

    parts: list[CompletedPartIn] = Field(min_length=1, max_length=10000)
