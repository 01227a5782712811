"""Calibration texts a tenant uploads for its jobs (UTF-8 .txt, or .jsonl with a "text" field per line).

They live only in the object store, under keys.calibration_prefix(tenant, id)/<name>: the id is
random (cal_ + 128 bits) and the tenant is part of the key, so a lookup can never reach another
tenant's text, and listing needs no table.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets

from api.errors import ApiError
from api.schemas.jobs import CalibrationOut
from api.services import keys
from api.storage import ObjectInfo, ObjectStore, PutResult
from api.storage.base import CHUNK

__all__ = ["MAX_CALIBRATION_BYTES", "new_calibration_id", "check_name", "check_text", "find_calibration",
           "list_calibration", "to_out"]

MAX_CALIBRATION_BYTES = 64 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,150}\.(txt|jsonl)$")
_ID_RE = re.compile(r"^cal_[0-9a-f]{32}$")


def new_calibration_id() -> str:
    return f"cal_{secrets.token_hex(16)}"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ApiError(422, "invalid_calibration_name", "calibration name must end in .txt or .jsonl and use only "
                       "letters, digits and . _ + - (starting with a letter or digit)")
    return name


def check_text(store: ObjectStore, key: str, name: str) -> None:
    """UTF-8 all the way through, some non-blank text; for .jsonl every line an object with a string "text"."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    f = store.open(key)
    nonblank = False
    line_no = 0
    pending = ""
    jsonl = name.endswith(".jsonl")
    try:
        while True:
            chunk = f.read(CHUNK)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise ApiError(422, "invalid_calibration_text", f"{name}: not UTF-8 text ({e.reason})") from None
            nonblank = nonblank or bool(text.strip())
            if jsonl:
                pending += text
                *lines, pending = pending.split("\n")
                if not chunk:
                    lines.append(pending)
                for line in lines:
                    line_no += 1
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        obj = None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise ApiError(422, "invalid_calibration_text",
                                       f"{name}: line {line_no} is not a JSON object with a string field \"text\"")
            if not chunk:
                break
    finally:
        f.close()
    if not nonblank:
        raise ApiError(422, "invalid_calibration_text", f"{name}: the text is empty")


def find_calibration(store: ObjectStore, tenant_id: str, cal_id: str) -> ObjectInfo:
    """The stored object of a calibration text of this tenant, else 404."""
    if _ID_RE.match(cal_id):
        for obj in store.list_objects(keys.calibration_prefix(tenant_id, cal_id)):
            return obj
    raise ApiError(404, "not_found", f"calibration text {cal_id!r} not found")


def to_out(obj: ObjectInfo | PutResult) -> CalibrationOut:
    parts = obj.key.split("/")
    return CalibrationOut(id=parts[-2], name=parts[-1], size=obj.size, sha256=getattr(obj, "sha256", None))


def list_calibration(store: ObjectStore, tenant_id: str) -> list[CalibrationOut]:
    return [to_out(o) for o in store.list_objects(keys.calibration_prefix(tenant_id))]
