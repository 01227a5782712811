"""Validation at the door: file names, safetensors headers, model configs.

Nothing here reads tensor data. A safetensors file is checked from its header and its size:
the header is parsed and every entry checked here (dtype, shape, offsets, the data region
covering the file exactly), then the same header is handed to the `safetensors` library itself
over a sparse stand-in file of the real size, so a file accepted here is one the worker's
`safe_open` opens. (codec/source.py does the same checks on a local directory, but it needs the
whole file on disk and imports torch; the API sees streams in an object store and stays light.)
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from api.errors import ApiError

__all__ = [
    "ST_DTYPE_BYTES",
    "PICKLE_SUFFIXES",
    "ALLOWED_SUFFIXES",
    "MAX_AUX_BYTES",
    "MAX_HEADER_BYTES",
    "SafetensorsInfo",
    "sanitize_path",
    "check_safetensors",
    "check_json_file",
    "max_bytes_for",
    "is_safetensors",
]

# dtype -> bytes per element: exactly the dtypes the codec reads (codec.source.ST_DTYPES; a test keeps them equal).
ST_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
# Pickle-based checkpoints run arbitrary code when loaded; refused by name before a byte is read.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
# What a model directory may hold: weights (safetensors), configs and tokenizer files, a model card.
ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".md"})
MAX_AUX_BYTES = 64 << 20  # non-weight files (same bound as codec.source)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
# JSON files whose content matters to loading; parsed and checked (others only need to be JSON text).
_CONFIG_FILES = {"config.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
                 "processor_config.json", "model.safetensors.index.json"}
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_DEPTH = 4
_MAX_SEGMENT = 200
_MAX_PATH = 512


def _bad(status: int, code: str, message: str, detail: Any = None) -> ApiError:
    return ApiError(status, code, message, detail)


def sanitize_path(raw: str) -> str:
    """A safe relative path inside a model directory (NFC, '/'-separated), or ApiError 400/422.

    Segments start with a letter or digit and use only letters, digits and ``._+-``: no '..', no
    hidden files, no absolute paths, backslashes, control characters or spaces. Pickle files get
    their own refusal (422 pickle_refused) and other unknown file types 422 file_type_not_allowed.
    """
    if not isinstance(raw, str) or not raw:
        raise _bad(400, "invalid_path", "empty file name")
    path = unicodedata.normalize("NFC", raw)
    shown = path[:120]
    if len(path.encode("utf-8")) > _MAX_PATH:
        raise _bad(400, "invalid_path", f"file name longer than {_MAX_PATH} bytes")
    if path.startswith("/") or "\\" in path or ":" in path.split("/")[0]:
        raise _bad(400, "invalid_path", f"{shown!r}: absolute paths and backslashes are not allowed")
    segments = path.split("/")
    if len(segments) > _MAX_DEPTH:
        raise _bad(400, "invalid_path", f"{shown!r}: at most {_MAX_DEPTH} directory levels")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise _bad(400, "invalid_path", f"{shown!r}: empty, '.' or '..' path segments are not allowed")
        if len(seg) > _MAX_SEGMENT or not _SEGMENT_RE.match(seg):
            raise _bad(
                400,
                "invalid_path",
                f"{shown!r}: each part of a file name must start with a letter or digit and use only "
                "letters, digits and . _ + - (no spaces, hidden files or control characters)",
            )
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _bad(
            422,
            "pickle_refused",
            f"{shown!r}: pickle-based weight files ({', '.join(sorted(PICKLE_SUFFIXES))}) can run arbitrary "
            "code when loaded and are refused; convert the model to safetensors",
        )
    if suffix not in ALLOWED_SUFFIXES:
        raise _bad(
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


@dataclass(frozen=True, slots=True)
class SafetensorsInfo:
    tensors: int
    parameters: int
    dtypes: dict[str, int]  # dtype -> tensor count
    header_bytes: int
    tensor_names: tuple[str, ...]


Reader = Callable[[int], bytes]  # read(n) -> up to n bytes, b"" at the end


def _read_exact(read: Reader, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = read(min(n - got, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def check_safetensors(name: str, read: Reader, file_size: int) -> SafetensorsInfo:
    """Check a safetensors file from its first bytes (`read`) and its size; ApiError 422 invalid_safetensors."""

    def bad(why: str, detail: Any = None) -> ApiError:
        return _bad(422, "invalid_safetensors", f"{name}: not a valid safetensors file: {why}", detail)

    if file_size < 8:
        raise bad(f"{file_size} bytes, shorter than the 8-byte header length")
    head = _read_exact(read, 8)
    if len(head) < 8:
        raise bad("truncated before the header length")
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} is out of range (2..{MAX_HEADER_BYTES})")
    if 8 + n > file_size:
        raise bad(f"header length {n} runs past the end of the {file_size}-byte file")
    raw = _read_exact(read, n)
    if len(raw) < n:
        raise bad("file truncated inside the header")
    if not raw.startswith(b"{"):
        raise bad("header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map strings to strings")
    data_size = file_size - 8 - n
    spans: list[tuple[int, int, str]] = []
    params = 0
    dtypes: dict[str, int] = {}
    for tname, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"entry {tname!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ST_DTYPE_BYTES:
            raise bad(
                f"tensor {tname!r} has dtype {dtype!r}; accepted: {', '.join(ST_DTYPE_BYTES)}",
                {"tensor": tname, "dtype": dtype},
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {tname!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"tensor {tname!r} has invalid data_offsets {offsets!r}")
        numel = math.prod(shape)
        want = numel * ST_DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != want:
            raise bad(
                f"tensor {tname!r}: shape {shape} of {dtype} needs {want} bytes but its offsets span "
                f"{offsets[1] - offsets[0]}",
                {"tensor": tname, "offsets": offsets, "expected_bytes": want},
            )
        if offsets[1] > data_size:
            raise bad(
                f"tensor {tname!r}: data_offsets {offsets} run past the end of the data ({data_size} bytes)",
                {"tensor": tname, "offsets": offsets, "data_bytes": data_size},
            )
        spans.append((offsets[0], offsets[1], tname))
        params += numel
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    spans.sort()
    pos = 0
    for begin, end, tname in spans:
        if begin != pos:
            why = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise bad(f"tensor {tname!r} starting at {begin} {why}")
        pos = end
    if pos != data_size:
        raise bad(f"tensors cover {pos} bytes of data but the file holds {data_size} after the header")
    _library_check(name, head + raw, file_size)
    return SafetensorsInfo(len(spans), params, dtypes, n, tuple(sorted(header)))


def _library_check(name: str, header: bytes, file_size: int) -> None:
    """Let the safetensors library parse the same header over a sparse file of the real size (no data read)."""
    from safetensors import SafetensorError, safe_open

    fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="nwc-hdr-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.truncate(file_size)  # sparse: costs no disk
        try:
            with safe_open(tmp, framework="numpy") as f:
                f.keys()
        except SafetensorError as e:
            raise _bad(422, "invalid_safetensors", f"{name}: rejected by the safetensors library: {e}") from None
    finally:
        os.unlink(tmp)


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
        raise _bad(422, code, f"{path}: not valid JSON ({e})") from None
    if name in _CONFIG_FILES:
        if not isinstance(value, dict):
            raise _bad(422, "invalid_config", f"{path}: must be a JSON object")
        if (hit := _find_remote_code(value)) is not None:
            raise _bad(
                422,
                "trust_remote_code_refused",
                f"{path}: the model needs custom code ({hit}); models that need trust_remote_code are refused",
            )
        if name == "model.safetensors.index.json":
            wm = value.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise _bad(422, "invalid_config", f"{path}: weight_map must map tensor names to shard files")
            for shard in set(wm.values()):
                if not is_safetensors(shard):
                    raise _bad(422, "invalid_config", f"{path}: weight_map names {shard!r}, not a .safetensors file")
                sanitize_path(shard)
    return value
