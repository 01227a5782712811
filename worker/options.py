"""Job options: what `Job.method`, `Job.target_bits` and the free-form `Job.options` JSON mean to the worker.

`Job.options` keys (all optional; keys the worker does not know, such as the API's request_sha256, are ignored):

    calibration      null | "none" | "wiki" | "cal_<id>" (an uploaded text; then calibration_key is its object key)
                     | {"key": "<object key>"}     (null/"none": model-free; methods gptq and rtn need calibration)
    calibration_key  object-store key of the uploaded .txt/.jsonl text (must be under tenants/<the job's tenant>/)
    outputs          subset of ["bundle", "dense", "report", "plots"] to publish (default bundle, dense, report;
                     "plots" is accepted and produces nothing yet)
    calib_seqs, calib_len, eval_tokens, seed, finetune_epochs, allocation, allocation_strength, act_order,
    sparsity, pattern
                     the API's JobTuning fields (api/schemas/jobs.py: their bounds and defaults, checked here too)
    codec_id         a registered codec id (default: the newest)

Verification is not optional: a job whose bundle does not decode, load and generate in a fresh process fails.
The API can call `JobOptions.parse(...)` to refuse bad options with a 422 before creating the job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from api.schemas.jobs import MODEL_FREE_METHODS, PRUNE_METHODS, JobTuning
from api.services.keys import tenant_prefix

__all__ = ["JobOptions", "InvalidJobOptions", "METHODS", "OUTPUTS", "DEFAULT_OUTPUTS"]

METHODS = ("nwc", "gptq", "rtn", "nowag-vq", *PRUNE_METHODS)
OUTPUTS = ("bundle", "dense", "report", "plots")
DEFAULT_OUTPUTS = ("bundle", "dense", "report")


class InvalidJobOptions(ValueError):
    """The job cannot run with these options (a permanent failure, never retried)."""


_TUNING = JobTuning()  # the defaults


@dataclass(frozen=True)
class JobOptions:
    method: str
    bits: float | None  # None: a pruning method (sparsity or pattern instead)
    calibration: str | None = None  # None | "wiki" | "store" (then calibration_key is set)
    calibration_key: str | None = None
    calib_seqs: int = _TUNING.calib_seqs
    calib_len: int = _TUNING.calib_len
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    eval_tokens: int = _TUNING.eval_tokens
    seed: int = _TUNING.seed
    finetune_epochs: int = _TUNING.finetune_epochs
    allocation: str | None = _TUNING.allocation  # None: codec.calibrated.CalibOptions' default
    allocation_strength: float | None = _TUNING.allocation_strength
    act_order: bool = _TUNING.act_order
    sparsity: float | None = None
    pattern: str | None = None
    codec_id: str | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def parse(cls, method: str, bits: float | None, options: dict[str, Any] | None, tenant_id: str | None = None
              ) -> JobOptions:
        o = dict(options or {})
        if method not in METHODS:
            raise InvalidJobOptions(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if method in PRUNE_METHODS:
            if bits is not None:
                raise InvalidJobOptions(f"{method} prunes and takes no target bits")
            if (o.get("sparsity") is None) == (o.get("pattern") is None):
                raise InvalidJobOptions(f"{method} needs exactly one of sparsity and pattern")
        else:
            try:
                bits = float(bits)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InvalidJobOptions(f"target bits must be a number, got {bits!r}") from None
            if not 0.5 <= bits <= 16:
                raise InvalidJobOptions(f"target bits must be in [0.5, 16], got {bits}")
            if o.get("sparsity") is not None or o.get("pattern") is not None:
                raise InvalidJobOptions(f"sparsity and pattern are for {' and '.join(PRUNE_METHODS)}, not {method}")

        cal = o.get("calibration")
        key = o.get("calibration_key")
        if isinstance(cal, dict):
            if set(cal) - {"key"} or not isinstance(cal.get("key"), str):
                raise InvalidJobOptions('calibration must be null, "none", "wiki" or {"key": "<object key>"}')
            key = cal["key"]
        if key is not None:
            if not isinstance(key, str) or not key:
                raise InvalidJobOptions("calibration key must be a non-empty string")
            if tenant_id is not None and not key.startswith(tenant_prefix(tenant_id)):
                raise InvalidJobOptions("the calibration text must be an object of this tenant")
            if not key.lower().endswith((".txt", ".jsonl")):
                raise InvalidJobOptions("an uploaded calibration text must be a .txt or .jsonl object")
            calibration: str | None = "store"
        elif isinstance(cal, str) and cal.startswith("cal_"):
            raise InvalidJobOptions(f"calibration {cal} has no calibration_key (the uploaded text's object key)")
        elif cal in (None, "none", ""):
            calibration = None
        elif cal == "wiki":
            calibration = "wiki"
        else:
            raise InvalidJobOptions(f'calibration must be null, "none", "wiki" or {{"key": ...}}; got {cal!r}')
        if method not in MODEL_FREE_METHODS and calibration is None:
            raise InvalidJobOptions(f"method {method} needs calibration data (calibration: \"wiki\" or an upload)")

        outputs = o.get("outputs", list(DEFAULT_OUTPUTS))
        if (not isinstance(outputs, list | tuple) or not outputs
                or any(x not in OUTPUTS for x in outputs)):
            raise InvalidJobOptions(f"outputs must be a non-empty subset of {list(OUTPUTS)}")
        outputs = tuple(x for x in OUTPUTS if x in outputs)

        try:  # strict: stored JSON has real ints and bools, so "3" or true for an integer is an error
            tuning = JobTuning.model_validate({k: o[k] for k in JobTuning.model_fields if k in o}, strict=True)
        except ValidationError as e:
            raise InvalidJobOptions("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                              for err in e.errors())) from None
        codec_id = o.get("codec_id")
        if codec_id is not None and not isinstance(codec_id, str):
            raise InvalidJobOptions("codec_id must be a string")
        return cls(method=method, bits=bits, calibration=calibration, calibration_key=key, outputs=outputs,
                   codec_id=codec_id, **tuning.model_dump())
