"""Shapes shared by every route: the error body and pagination."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ErrorInfo", "ErrorResponse", "Page"]

T = TypeVar("T")


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `not_found`, `invalid_safetensors`.")
    message: str = Field(description="What went wrong, in plain words.")
    detail: Any | None = Field(default=None, description="Extra structured information (field errors, limits).")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx response has this body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "not_found", "message": "job 'job_3f2a…' not found", "detail": None}},
                {
                    "error": {
                        "code": "unauthorized",
                        "message": "missing or invalid API key: send 'Authorization: Bearer nwc_…'",
                        "detail": None,
                    }
                },
            ]
        }
    )

    error: ErrorInfo


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` to get the next page; null on the last page."
    )
