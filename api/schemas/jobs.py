"""Compression jobs, their progress, events and artifacts; calibration texts."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Method",
    "Output",
    "JobStateName",
    "JobCreate",
    "JobTuning",
    "JobOut",
    "JobDetail",
    "StageOut",
    "EventOut",
    "ArtifactOut",
    "CalibrationOut",
    "METHOD_BITS",
    "PRUNE_METHODS",
    "MODEL_FREE_METHODS",
]

Method = Literal["nwc", "gptq", "rtn", "nowag-vq", "nowag-p", "wanda"]
Output = Literal["bundle", "dense", "report", "plots"]
JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# Accepted target bits per method (the codec's own bounds; nwc checks reachability for the model at run time).
# nowag-vq takes the rates whose subvector length 12 / bits is whole (codec/nowag.py: 2, 3 and 4 documented).
METHOD_BITS: dict[str, tuple[float, float]] = {"nwc": (1.0, 8.0), "gptq": (2.0, 8.99), "rtn": (2.0, 8.99),
                                               "nowag-vq": (1.0, 6.0)}
# Pruning methods take a sparsity or an N:M pattern (JobTuning) and no target_bits.
PRUNE_METHODS = ("nowag-p", "wanda")
# Methods that run without calibration text (data-free: nowag uses diag(H) = 1).
MODEL_FREE_METHODS = ("nwc", "nowag-vq", "nowag-p")
_PATTERN_RE = re.compile(r"^([1-9]|1[0-5]):([2-9]|1[0-6])$")
_CAL_RE = re.compile(r"^cal_[0-9a-f]{32}$")

_JOB_EXAMPLE: dict[str, Any] = {
    "id": "job_8d0e6f4a2b1c4d3e9f8a7b6c5d4e3f2a",
    "model_id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b",
    "method": "nwc",
    "target_bits": 4.0,
    "calibration": "wiki",
    "outputs": ["bundle", "dense", "report"],
    "tuning": {"calib_seqs": 32, "calib_len": 512, "finetune_epochs": 0, "allocation": None,
               "allocation_strength": None, "act_order": False, "eval_tokens": 2048, "seed": 0},
    "webhook_url": "https://ci.example.com/hooks/nwc",
    "idempotency_key": "release-2026-11-23-smollm2-4bit",
    "state": "running",
    "stage": "compress",
    "progress": 0.42,
    "eta_at": "2026-11-23T10:31:10Z",
    "eta_seconds": 312.5,
    "attempts": 1,
    "error": None,
    "created_at": "2026-11-23T10:16:00Z",
    "updated_at": "2026-11-23T10:25:47Z",
    "started_at": "2026-11-23T10:16:02Z",
    "finished_at": None,
}


class JobTuning(BaseModel):
    """How a job compresses and checks, beyond method and rate. The bounds are the worker's
    (worker/options.py), so a body valid here is a job the worker runs; defaults are the worker's."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"calib_seqs": 64, "calib_len": 512, "finetune_epochs": 2,
                                         "allocation": "kl", "allocation_strength": 0.5, "eval_tokens": 4096}]},
    )

    calib_seqs: int = Field(default=32, ge=1, le=4096, description="Calibration sequences (calibrated methods).")
    calib_len: int = Field(default=512, ge=8, le=32768, description="Tokens per calibration sequence.")
    finetune_epochs: int = Field(
        default=0, ge=0, le=100,
        description="Calibrated nwc: epochs of block fine-tuning towards the original block's outputs (row scales "
        "of coded layers, weights not yet coded, norms); 0 = off.",
    )
    allocation: Literal["none", "kl", "relative", "absolute"] | None = Field(
        default=None,
        description="Calibrated nwc: how rate is shared across layers (docs/CALIBRATION.md). Default: the codec's.",
    )
    allocation_strength: float | None = Field(default=None, ge=0, le=10, description="Scales the allocation's "
                                              "level offsets (0 = none, 1 = full).")
    act_order: bool = Field(default=False, description="gptq: code columns in order of decreasing Hessian diagonal.")
    eval_tokens: int = Field(default=2048, ge=16, le=1 << 20, description="Held-out tokens the verification's "
                             "perplexity and KL are measured on.")
    seed: int = Field(default=0, ge=0, le=2**31, description="Seed of the calibration sampling.")
    sparsity: float | None = Field(default=None, ge=0, lt=1, description="nowag-p and wanda: fraction of each "
                                   "matrix's weights removed (unstructured). Give this or pattern.")
    pattern: str | None = Field(default=None, description="nowag-p and wanda: N:M semi-structured pattern (N kept "
                                "of every M consecutive inputs, 1 ≤ N < M ≤ 16), such as 2:4 or 4:8.")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _PATTERN_RE.match(v)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise ValueError("pattern must be N:M with 1 ≤ N < M ≤ 16, such as 2:4")
        return v


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model_id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b", "method": "nwc", "target_bits": 4.0,
                 "calibration": "wiki", "outputs": ["bundle", "dense", "report"],
                 "webhook_url": "https://ci.example.com/hooks/nwc"},
                {"model_id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b", "method": "gptq", "target_bits": 4,
                 "calibration": "cal_5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b"},
                {"model_id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b", "method": "nwc", "target_bits": 3.0,
                 "calibration": "wiki", "tuning": {"calib_seqs": 64, "finetune_epochs": 2}},
                {"model_id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b", "method": "nowag-vq", "target_bits": 2,
                 "calibration": "wiki"},
                {"model_id": "mdl_0c4f8e2a9b1d4e7f8a6b5c4d3e2f1a0b", "method": "nowag-p", "calibration": "wiki",
                 "tuning": {"pattern": "2:4"}},
            ]
        },
    )

    model_id: str = Field(min_length=1, max_length=40)
    method: Method = Field(default="nwc", description="nwc (learned codec), gptq or rtn (fixed-length baselines), "
                           "nowag-vq (NoWag vector quantization), nowag-p (NoWag pruning) or wanda (pruning "
                           "baseline). docs/NOWAG.md.")
    target_bits: float | None = Field(
        default=None,
        description="Average bits per weight over the whole file. nwc: 1–8; gptq and rtn: 2 ≤ bits < 9; nowag-vq: "
        "2, 3 or 4 (any b with 12/b whole, 1–6). Not for nowag-p and wanda, which take tuning.sparsity or "
        "tuning.pattern.",
    )
    calibration: str | None = Field(
        default=None,
        description="`wiki` (built-in text), `none` (model-free; nwc only) or the id of an uploaded calibration "
        "text (`cal_…`). Default: `none` for nwc, `wiki` for gptq and rtn.",
    )
    outputs: list[Output] = Field(
        default_factory=lambda: ["bundle", "dense", "report"],
        min_length=1,
        description="bundle (compressed container), dense (decoded safetensors model), report (report.json), "
        "plots (accepted; produces nothing yet).",
    )
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="http(s) URL that receives a POST when the job ends."
    )
    tuning: JobTuning = Field(default_factory=JobTuning, description="Calibration size, fine-tuning, rate "
                              "allocation, evaluation length and seed.")

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("outputs must not repeat")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(c.isspace() or ord(c) < 32 for c in v):
            raise ValueError("webhook_url must not contain whitespace or control characters")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https"):
            raise ValueError("webhook_url must be an http or https URL")
        if not parts.hostname:
            raise ValueError("webhook_url needs a host")
        if parts.username or parts.password:
            raise ValueError("webhook_url must not carry credentials")
        return v

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, v: str | None) -> str | None:
        if v is None or v in ("wiki", "none") or _CAL_RE.match(v):
            return v
        raise ValueError("calibration must be 'wiki', 'none' or an uploaded calibration text id (cal_…)")

    @model_validator(mode="after")
    def _method_bits(self) -> JobCreate:
        pruning = self.tuning.sparsity is not None or self.tuning.pattern is not None
        if self.method in PRUNE_METHODS:
            if self.target_bits is not None:
                raise ValueError(f"{self.method} prunes: give tuning.sparsity or tuning.pattern, not target_bits")
            if (self.tuning.sparsity is None) == (self.tuning.pattern is None):
                raise ValueError(f"{self.method} needs exactly one of tuning.sparsity (such as 0.5) and "
                                 "tuning.pattern (such as 2:4)")
        else:
            if pruning:
                raise ValueError(f"tuning.sparsity and tuning.pattern are for nowag-p and wanda, not {self.method}")
            if self.target_bits is None:
                raise ValueError(f"method {self.method} needs target_bits")
            lo, hi = METHOD_BITS[self.method]
            if not lo <= self.target_bits <= hi:
                raise ValueError(f"target_bits for {self.method} must be in {lo:g}..{hi:g}, got {self.target_bits:g}")
            d = 12 / self.target_bits
            if self.method == "nowag-vq" and abs(d - round(d)) > 1e-9:
                raise ValueError(f"target_bits for nowag-vq must make 12 / bits whole (2, 3, 4, …), "
                                 f"got {self.target_bits:g}")
        if self.calibration is None:
            self.calibration = "none" if self.method == "nwc" else "wiki"
        if self.method not in MODEL_FREE_METHODS and self.calibration == "none":
            raise ValueError(f"method {self.method} needs calibration text: use 'wiki' or an uploaded text")
        return self


class JobOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    model_id: str
    method: str
    target_bits: float | None = Field(description="null for the pruning methods (nowag-p, wanda).")
    calibration: str
    outputs: list[str]
    tuning: JobTuning
    webhook_url: str | None = None
    idempotency_key: str | None = None
    state: JobStateName
    stage: str | None = None
    progress: float = Field(description="Overall progress, 0..1.")
    eta_at: datetime | None = Field(default=None, description="Estimated end (absolute, UTC).")
    eta_seconds: float | None = Field(default=None, description="Seconds from now to eta_at.")
    attempts: int
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class StageOut(BaseModel):
    name: str
    state: Literal["running", "done", "stopped"]
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = Field(default=None, description="Seconds spent so far (running) or in total.")
    progress: float | None = Field(default=None, description="Progress within the stage, 0..1, when reported.")
    eta_seconds: float | None = Field(default=None, description="Running stage: linear estimate of the time left.")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    stage: str | None = None
    kind: str
    message: str
    data: dict[str, Any]
    created_at: datetime


class JobDetail(JobOut):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_JOB_EXAMPLE,
                    "stages": [
                        {"name": "download", "state": "done", "started_at": "2026-11-23T10:16:02Z",
                         "finished_at": "2026-11-23T10:16:40Z", "duration_s": 38.0, "progress": 1.0,
                         "eta_seconds": None},
                        {"name": "compress", "state": "running", "started_at": "2026-11-23T10:16:40Z",
                         "finished_at": None, "duration_s": 547.0, "progress": 0.42, "eta_seconds": 755.3},
                    ],
                    "metrics": {"fetch": {"files": 6, "bytes": 541883320}},
                    "artifact_count": 0,
                }
            ]
        }
    )

    stages: list[StageOut]
    metrics: dict[str, Any] = Field(
        description="Metrics reported so far: the data of each finished stage's event under the stage's name "
        "(e.g. compress.measured_bits), plus the fields of any `metrics` events."
    )
    artifact_count: int


class ArtifactOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "art_1f2e3d4c5b6a79880f1e2d3c4b5a6978",
                    "kind": "bundle",
                    "name": "model.nwc",
                    "size": 81234567,
                    "sha256": "9f2c…",
                    "created_at": "2026-11-23T10:31:02Z",
                    "url": "https://s3.example.com/nwc/tenants/…?X-Amz-Signature=…",
                    "url_expires_at": "2026-11-23T10:46:02Z",
                }
            ]
        }
    )

    id: str
    kind: Literal["bundle", "dense", "report", "plot"]
    name: str
    size: int
    sha256: str
    created_at: datetime
    url: str = Field(description="Short-lived presigned download URL (no API key needed).")
    url_expires_at: datetime


class CalibrationOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "cal_5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b", "name": "support-tickets.jsonl", "size": 5242880,
                 "sha256": "0b1c…"}
            ]
        }
    )

    id: str
    name: str
    size: int
    sha256: str | None = None
