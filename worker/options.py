"""Job options: what `Job.method`, `Job.target_bits` and the free-form `Job.options` JSON mean to the worker.

`Job.options` keys (all optional; keys the worker does not know, such as the API's request_sha256, are ignored):

    calibration      null | "none" | "wiki" | "cal_<id>" (an uploaded text; then calibration_key is its object key)
                     | {"key": "<object key>"}     (null/"none": model-free; methods gptq and rtn need calibration)
    calibration_key  object-store key of the uploaded .txt/.jsonl text (must be under tenants/<the job's tenant>/)
    calib_seqs       calibration sequences (default 32)
    calib_len        tokens per calibration sequence (default 512)
    outputs          subset of ["bundle", "dense", "report", "plots"] to publish (default bundle, dense, report;
                     "plots" is accepted and produces nothing yet)
    eval_tokens      held-out tokens for the verification's perplexity and KL (default 2048)
    seed             (default 0)
    finetune_epochs  block fine-tuning epochs (calibrated; default 0 = off)
    allocation       "kl" | "relative" | "absolute" | "none" (calibrated nwc; default: the codec's, CalibOptions)
    allocation_strength  (default: the codec's)
    act_order        GPTQ column order (default false)
    codec_id         a registered codec id (default: the newest)

Verification is not optional: a job whose bundle does not decode, load and generate in a fresh process fails.
The API can call `JobOptions.parse(...)` to refuse bad options with a 422 before creating the job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from api.services.keys import tenant_prefix

__all__ = ["JobOptions", "InvalidJobOptions", "METHODS", "OUTPUTS", "DEFAULT_OUTPUTS"]

METHODS = ("nwc", "gptq", "rtn")
OUTPUTS = ("bundle", "dense", "report", "plots")
DEFAULT_OUTPUTS = ("bundle", "dense", "report")


class InvalidJobOptions(ValueError):
    """The job cannot run with these options (a permanent failure, never retried)."""


@dataclass(frozen=True)
class JobOptions:
    method: str
    bits: float
    calibration: str | None = None  # None | "wiki" | "store" (then calibration_key is set)
    calibration_key: str | None = None
    calib_seqs: int = 32
    calib_len: int = 512
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    eval_tokens: int = 2048
    seed: int = 0
    finetune_epochs: int = 0
    allocation: str | None = None  # None: codec.calibrated.CalibOptions' default
    allocation_strength: float | None = None
    act_order: bool = False
    codec_id: str | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def parse(cls, method: str, bits: float, options: dict[str, Any] | None, tenant_id: str | None = None
              ) -> JobOptions:
        o = dict(options or {})
        if method not in METHODS:
            raise InvalidJobOptions(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        try:
            bits = float(bits)
        except (TypeError, ValueError):
            raise InvalidJobOptions(f"target bits must be a number, got {bits!r}") from None
        if not 0.5 <= bits <= 16:
            raise InvalidJobOptions(f"target bits must be in [0.5, 16], got {bits}")

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
        if method != "nwc" and calibration is None:
            raise InvalidJobOptions(f"method {method} needs calibration data (calibration: \"wiki\" or an upload)")

        outputs = o.get("outputs", list(DEFAULT_OUTPUTS))
        if (not isinstance(outputs, list | tuple) or not outputs
                or any(x not in OUTPUTS for x in outputs)):
            raise InvalidJobOptions(f"outputs must be a non-empty subset of {list(OUTPUTS)}")
        outputs = tuple(x for x in OUTPUTS if x in outputs)

        def integer(name: str, default: int, lo: int, hi: int) -> int:
            v = o.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidJobOptions(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        allocation = o.get("allocation")
        if allocation not in (None, "kl", "relative", "absolute", "none"):
            raise InvalidJobOptions(f"allocation must be kl, relative, absolute or none; got {allocation!r}")
        strength = o.get("allocation_strength")
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int | float)
                                     or not 0 <= strength <= 10):
            raise InvalidJobOptions(f"allocation_strength must be a number in [0, 10], got {strength!r}")
        act_order = o.get("act_order", False)
        if not isinstance(act_order, bool):
            raise InvalidJobOptions("act_order must be true or false")
        codec_id = o.get("codec_id")
        if codec_id is not None and not isinstance(codec_id, str):
            raise InvalidJobOptions("codec_id must be a string")
        return cls(
            method=method, bits=bits, calibration=calibration, calibration_key=key,
            calib_seqs=integer("calib_seqs", 32, 1, 4096), calib_len=integer("calib_len", 512, 8, 32768),
            outputs=outputs, eval_tokens=integer("eval_tokens", 2048, 16, 1 << 20), seed=integer("seed", 0, 0, 2**31),
            finetune_epochs=integer("finetune_epochs", 0, 0, 100), allocation=allocation,
            allocation_strength=None if strength is None else float(strength), act_order=act_order, codec_id=codec_id,
        )
