"""Validation at the door: file names, safetensors headers, model configs.

Nothing here reads tensor data. A safetensors file is checked from its header and its size: the
header is handed to the `safetensors` library itself over a sparse stand-in file of the real size
(the library checks the JSON, shapes, dtypes and offsets, and that the data fills the file exactly),
then its dtypes must be ones the codec reads, the same calls codec/source.py makes on a local
directory. (codec.source itself needs the whole file on disk and imports torch; the API sees
streams in an object store and stays light.) So a file accepted here is one the worker's
`safe_open` opens.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import unicodedata
from collections.abc import Callable
from contextlib import closing
from pathlib import PurePosixPath
from typing import Any

from api.errors import ApiError
from api.schemas.models import ALLOWED_SUFFIXES, PICKLE_SUFFIXES

__all__ = [
    "ST_DTYPES",
    "MAX_AUX_BYTES",
    "MAX_HEADER_BYTES",
    "sanitize_path",
    "check_safetensors",
    "check_json_file",
    "check_content",
    "MAX_JSON_READ",
    "max_bytes_for",
    "is_safetensors",
    "read_exact",
]

# Exactly the dtypes the codec reads (codec.source.ST_DTYPES, which imports torch; a test keeps them equal).
ST_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"})
MAX_AUX_BYTES = 64 << 20  # non-weight files (same bound as codec.source)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
MAX_JSON_READ = 16 << 20  # JSON files up to this size are parsed when they arrive (finalize rereads config.json)
# JSON files whose content matters to loading; parsed and checked (others only need to be JSON text).
_CONFIG_FILES = {"config.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
                 "processor_config.json", "model.safetensors.index.json"}
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_DEPTH = 4
_MAX_SEGMENT = 200
_MAX_PATH = 512


def sanitize_path(raw: str) -> str:
    """A safe relative path inside a model directory (NFC, '/'-separated), or ApiError 400/422.

    Segments start with a letter or digit and use only letters, digits and ``._+-``: no '..', no
    hidden files, no absolute paths, backslashes, control characters or spaces. Pickle files get
    their own refusal (422 pickle_refused) and other unknown file types 422 file_type_not_allowed.
    """
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, "invalid_path", "empty file name")
    path = unicodedata.normalize("NFC", raw)
    shown = path[:120]
    if len(path.encode("utf-8")) > _MAX_PATH:
        raise ApiError(400, "invalid_path", f"file name longer than {_MAX_PATH} bytes")
    if path.startswith("/") or "\\" in path or ":" in path.split("/")[0]:
        raise ApiError(400, "invalid_path", f"{shown!r}: absolute paths and backslashes are not allowed")
    segments = path.split("/")
    if len(segments) > _MAX_DEPTH:
        raise ApiError(400, "invalid_path", f"{shown!r}: at most {_MAX_DEPTH} directory levels")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise ApiError(400, "invalid_path", f"{shown!r}: empty, '.' or '..' path segments are not allowed")
        if len(seg) > _MAX_SEGMENT or not _SEGMENT_RE.match(seg):
            raise ApiError(
                400,
                "invalid_path",
                f"{shown!r}: each part of a file name must start with a letter or digit and use only "
                "letters, digits and . _ + - (no spaces, hidden files or control characters)",
            )
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ApiError(
            422,
            "pickle_refused",
            f"{shown!r}: pickle-based weight files ({', '.join(sorted(PICKLE_SUFFIXES))}) can run arbitrary "
            "code when loaded and are refused; convert the model to safetensors",
        )
    if suffix not in ALLOWED_SUFFIXES:
        raise ApiError(
            422,
            "file_type_not_allowed",
            f"{shown!r}: file type {suffix or '(none)'} is not accepted; a model directory may hold "
            f"{', '.join(sorted(ALLOWED_SUFFIXES))} files",
        )
    return path


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def max_bytes_for(path: str, limit: int) -> int:
    """Size limit for one file: the upload limit for weights, MAX_AUX_BYTES for everything else."""
    return limit if is_safetensors(path) else min(limit, MAX_AUX_BYTES)


Reader = Callable[[int], bytes]  # read(n) -> up to n bytes, b"" at the end


def read_exact(read: Reader, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = read(min(n - got, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def check_safetensors(name: str, read: Reader, file_size: int) -> None:
    """Check a safetensors file from its first bytes (`read`) and its size; ApiError 422 invalid_safetensors."""

    def bad(why: str, detail: Any = None) -> ApiError:
        return ApiError(422, "invalid_safetensors", f"{name}: not a valid safetensors file: {why}", detail)

    # Only enough to know how many bytes to read; the library checks the header itself.
    if file_size < 8:
        raise bad(f"{file_size} bytes, shorter than the 8-byte header length")
    head = read_exact(read, 8)
    if len(head) < 8:
        raise bad("truncated before the header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise bad(f"header length {n} is over {MAX_HEADER_BYTES} or runs past the end of the {file_size}-byte file")
    raw = read_exact(read, n)
    if len(raw) < n:
        raise bad("file truncated inside the header")
    from safetensors import SafetensorError, safe_open

    fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="nwc-hdr-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head + raw)
            f.truncate(file_size)  # sparse: costs no disk
        try:
            with safe_open(tmp, framework="numpy") as f:
                dtypes = {t: f.get_slice(t).get_dtype() for t in f.keys()}
        except SafetensorError as e:
            raise bad(str(e)) from None
    finally:
        os.unlink(tmp)
    for tname, dtype in dtypes.items():
        if dtype not in ST_DTYPES:
            raise bad(f"tensor {tname!r} has dtype {dtype}; accepted: {', '.join(sorted(ST_DTYPES))}",
                      {"tensor": tname, "dtype": dtype})


def check_content(path: str, open_: Callable[[], Any], size: int) -> None:
    """A file's content as it arrives (upload or Hub import): the safetensors header, or the JSON of a .json
    file. `open_()` gives a binary readable of the file's bytes; ApiError when refused."""
    if is_safetensors(path):
        with closing(open_()) as f:
            check_safetensors(path, f.read, size)
    elif path.lower().endswith(".json") and size <= MAX_JSON_READ:
        with closing(open_()) as f:
            check_json_file(path, f.read(MAX_JSON_READ + 1))


def _find_remote_code(obj: Any) -> str | None:
    if isinstance(obj, dict):
        if obj.get("auto_map"):
            return "auto_map"
        if obj.get("trust_remote_code") is True:
            return "trust_remote_code"
        for key in ("text_config", "vision_config", "encoder", "decoder"):  # nested sub-configs
            if (hit := _find_remote_code(obj.get(key))) is not None:
                return f"{key}.{hit}"
    return None


def check_json_file(path: str, data: bytes) -> Any:
    """A JSON file of a model: must parse; configs must be objects and must not ask for remote code."""
    name = PurePosixPath(path).name
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        code = "invalid_config" if name in _CONFIG_FILES else "invalid_json"
        raise ApiError(422, code, f"{path}: not valid JSON ({e})") from None
    if name in _CONFIG_FILES:
        if not isinstance(value, dict):
            raise ApiError(422, "invalid_config", f"{path}: must be a JSON object")
        if (hit := _find_remote_code(value)) is not None:
            raise ApiError(
                422,
                "trust_remote_code_refused",
                f"{path}: the model needs custom code ({hit}); models that need trust_remote_code are refused",
            )
        if name == "model.safetensors.index.json":
            wm = value.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ApiError(422, "invalid_config", f"{path}: weight_map must map tensor names to shard files")
            for shard in set(wm.values()):
                if not is_safetensors(shard):
                    raise ApiError(422, "invalid_config",
                                   f"{path}: weight_map names {shard!r}, not a .safetensors file")
                sanitize_path(shard)
    return value
