"""Bundle container: one binary file holding many compressed tensors.

Layout (byte-exact description in docs/FORMAT.md)::

    preamble (16 B) | header JSON | record 0 | record 1 | ... | tensor table JSON | footer (56 B)

The table sits at the end so the writer can stream each record to disk as soon as it is
produced (the model never has to fit in memory); the fixed-size footer lets a reader find
the table with one seek from the end and then fetch any single record with one more seek.
The container does not interpret payloads: a record is a list of named byte segments plus
small JSON metadata, and the codec defines what they mean per `method`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import operator
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

__all__ = [
    "MAGIC",
    "END_MAGIC",
    "FORMAT_VERSION",
    "PREAMBLE_SIZE",
    "FOOTER_SIZE",
    "MetaValue",
    "ContainerError",
    "BadMagicError",
    "UnsupportedVersionError",
    "TruncatedContainerError",
    "CorruptTensorError",
    "CorruptHeaderError",
    "ContainerHeader",
    "TensorRecord",
    "TensorEntry",
    "ContainerWriter",
    "ContainerReader",
    "prefix_size",
]

# \x00 stops C-string handling, \r\n is altered by text-mode newline translation and \x1a
# (Ctrl-Z) ends a file for DOS text reads, so a mangled copy fails the magic check loudly.
MAGIC = b"NWCB\x00\r\n\x1a"
END_MAGIC = b"NWCE\x00\r\n\x1a"
FORMAT_VERSION = 1

_PREAMBLE = struct.Struct("<8sHHI")  # magic, format version, reserved (0), header length
_FOOTER = struct.Struct("<QQ32s8s")  # table offset, table length, metadata sha256, end magic
PREAMBLE_SIZE = _PREAMBLE.size  # 16
FOOTER_SIZE = _FOOTER.size  # 56

_HASH_CHUNK = 1 << 20  # verify() hashes in 1 MiB pieces so a huge record never sits in memory
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_HEX = frozenset("0123456789abcdef")

MetaValue = int | float | str | bool | list[int] | list[float]


# ----------------------------------------------------------------------------- errors


class ContainerError(Exception):
    """Base class: the file is not a valid container, or not one this version can read."""


class BadMagicError(ContainerError):
    """The file does not start with the container magic (wrong file type or text-mode mangled)."""


class UnsupportedVersionError(ContainerError):
    """The preamble names a format version this reader does not implement."""


class TruncatedContainerError(ContainerError):
    """The file ends before the data the preamble/footer/table says is there."""


class CorruptHeaderError(ContainerError):
    """The header or tensor table is unparsable, fails its checksum, or is inconsistent."""


class CorruptTensorError(ContainerError):
    """One record's payload fails its checksum; other tensors may still be readable."""

    def __init__(self, tensor_name: str, message: str) -> None:
        # Both parts go to args so the exception pickles (worker processes pass errors back).
        super().__init__(tensor_name, message)
        self.tensor_name = tensor_name
        self.message = message

    def __str__(self) -> str:
        return f"tensor {self.tensor_name!r}: {self.message}"


class _Invalid(ValueError):
    """A field failed validation. Writers raise it as-is (a ValueError: caller's bad input);
    readers wrap it in CorruptHeaderError (the file is bad)."""


# ----------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ContainerHeader:
    codec_id: str  # e.g. "nwc-w128-d2-v1", or "" when no learned codec was used
    codec_sha256: str  # lowercase hex sha256 of the codec weights, or "" with codec_id ""
    created_by: str  # e.g. "nwc 0.1.0"
    attrs: dict[str, str] = field(default_factory=dict)  # small free-form metadata


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str  # original dtype name, e.g. "float32", "bfloat16"
    method: str  # "nwc" | "raw" | "alias" | ...; the container does not interpret it
    meta: dict[str, MetaValue]  # small, JSON-safe; stored in the table, not the payload
    segments: dict[str, bytes]  # named blobs, stored back to back in this order


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table: everything about a record except its payload bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    meta: dict[str, MetaValue]
    offset: int  # absolute file offset of the record's first byte
    length: int  # record payload length in bytes (sum of segment lengths)
    segments: dict[str, tuple[int, int]]  # segment name -> (offset from record start, length)
    sha256: str  # lowercase hex sha256 over the record payload bytes

    @property
    def nbytes(self) -> int:
        """Bytes the record occupies in the file (its payload; metadata lives in the table)."""
        return self.length

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor (1 for a 0-d tensor)."""
        return math.prod(self.shape)


# ----------------------------------------------------------------------------- validation
# Small explicit validators rather than a schema library: the format is tiny, error messages
# can name the exact tensor/field, and the module stays dependency-free.


def _type_name(value: object) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_str(value: object, what: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be a str, got {_type_name(value)}")
    if nonempty and not value:
        raise _Invalid(f"{what} must be a non-empty str")
    try:
        value.encode("utf-8")  # lone surrogates would only fail later, while writing the table
    except UnicodeEncodeError as e:
        raise _Invalid(f"{what} is not encodable as UTF-8: {e}") from None
    return value


def _check_int(value: object, what: str, *, minimum: int | None = 0) -> int:
    # bool is an int subclass but never a valid count/offset.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{what} must be an int, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise _Invalid(f"{what} must be >= {minimum}, got {value}")
    return value


def _check_sha256_hex(value: object, what: str, *, allow_empty: bool = False) -> str:
    text = _check_str(value, what)
    if allow_empty and text == "":
        return text
    if len(text) != 64 or not set(text) <= _HEX:
        raise _Invalid(f"{what} must be 64 lowercase hex digits, got {text[:80]!r}")
    return text


def _check_keys(obj: Mapping[str, Any], expected: tuple[str, ...], what: str) -> None:
    # Unknown keys are rejected: new fields need a format version bump (attrs/meta are the
    # extension points), so a v1 reader never silently ignores something it should obey.
    missing = [k for k in expected if k not in obj]
    extra = [k for k in obj if k not in expected]
    if missing or extra:
        raise _Invalid(f"{what}: missing keys {missing}, unexpected keys {extra[:10]}")


def _check_number(value: object, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"{what} must be a number, got {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"{what} must be finite, got {value}")
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        raise _Invalid(f"{what} is outside the int64 range")
    return value


def _check_meta_value(value: object, what: str) -> MetaValue:
    if isinstance(value, bool | str):
        if isinstance(value, str):
            _check_str(value, what)
        return value
    if isinstance(value, int | float):
        return _check_number(value, what)
    if isinstance(value, list):
        return [_check_number(x, f"{what}[{i}]") for i, x in enumerate(value)]
    raise _Invalid(f"{what} must be int, float, str, bool or a list of numbers, got {_type_name(value)}")


def _check_meta(meta: object, what: str) -> dict[str, MetaValue]:
    if not isinstance(meta, dict):
        raise _Invalid(f"{what} must be a dict, got {_type_name(meta)}")
    out: dict[str, MetaValue] = {}
    for key, value in meta.items():
        _check_str(key, f"{what} key", nonempty=True)
        out[key] = _check_meta_value(value, f"{what}[{key!r}]")
    return out


def _check_attrs(attrs: object, what: str) -> dict[str, str]:
    if not isinstance(attrs, dict):
        raise _Invalid(f"{what} must be a dict, got {_type_name(attrs)}")
    for key, value in attrs.items():
        _check_str(key, f"{what} key", nonempty=True)
        _check_str(value, f"{what}[{key!r}]")
    return dict(attrs)


def _check_header(header: ContainerHeader) -> ContainerHeader:
    return ContainerHeader(
        codec_id=_check_str(header.codec_id, "header.codec_id"),
        codec_sha256=_check_sha256_hex(header.codec_sha256, "header.codec_sha256", allow_empty=True),
        created_by=_check_str(header.created_by, "header.created_by"),
        attrs=_check_attrs(header.attrs, "header.attrs"),
    )


def _header_to_json(header: ContainerHeader) -> dict[str, Any]:
    return {
        "codec_id": header.codec_id,
        "codec_sha256": header.codec_sha256,
        "created_by": header.created_by,
        "attrs": header.attrs,
    }


_HEADER_KEYS = ("codec_id", "codec_sha256", "created_by", "attrs")
_ENTRY_KEYS = ("name", "shape", "dtype", "method", "meta", "offset", "length", "segments", "sha256")


def _header_from_json(obj: object) -> ContainerHeader:
    if not isinstance(obj, dict):
        raise _Invalid(f"header must be a JSON object, got {_type_name(obj)}")
    _check_keys(obj, _HEADER_KEYS, "header")
    return _check_header(
        ContainerHeader(
            codec_id=obj["codec_id"],
            codec_sha256=obj["codec_sha256"],
            created_by=obj["created_by"],
            attrs=obj["attrs"],
        )
    )


def _entry_to_json(entry: TensorEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "shape": list(entry.shape),
        "dtype": entry.dtype,
        "method": entry.method,
        "meta": {k: list(v) if isinstance(v, list) else v for k, v in entry.meta.items()},  # detach
        "offset": entry.offset,
        "length": entry.length,
        "segments": {k: [o, n] for k, (o, n) in entry.segments.items()},
        "sha256": entry.sha256,
    }


def _entry_from_json(obj: object, index: int) -> TensorEntry:
    if not isinstance(obj, dict):
        raise _Invalid(f"table entry {index} must be a JSON object, got {_type_name(obj)}")
    raw_name = obj.get("name")
    label = f"tensor {raw_name!r}" if isinstance(raw_name, str) else f"table entry {index}"
    _check_keys(obj, _ENTRY_KEYS, label)
    name = _check_str(obj["name"], f"{label} name", nonempty=True)
    shape_obj = obj["shape"]
    if not isinstance(shape_obj, list):
        raise _Invalid(f"{label} shape must be a list, got {_type_name(shape_obj)}")
    shape = tuple(_check_int(d, f"{label} shape[{i}]") for i, d in enumerate(shape_obj))
    length = _check_int(obj["length"], f"{label} length")
    segs_obj = obj["segments"]
    if not isinstance(segs_obj, dict):
        raise _Invalid(f"{label} segments must be an object, got {_type_name(segs_obj)}")
    segments: dict[str, tuple[int, int]] = {}
    pos = 0
    for seg_name, span in segs_obj.items():
        what = f"{label} segment {seg_name!r}"
        _check_str(seg_name, f"{label} segment name", nonempty=True)
        if not isinstance(span, list) or len(span) != 2:
            raise _Invalid(f"{what} must be [offset, length]")
        seg_off = _check_int(span[0], f"{what} offset")
        seg_len = _check_int(span[1], f"{what} length")
        # Segments tile the record exactly, in order: no gaps, overlaps or bytes past its end.
        if seg_off != pos:
            raise _Invalid(f"{what} starts at {seg_off}, expected {pos} (segments must be contiguous)")
        if seg_off + seg_len > length:
            raise _Invalid(f"{what} ends at {seg_off + seg_len}, past the record length {length}")
        segments[seg_name] = (seg_off, seg_len)
        pos += seg_len
    if pos != length:
        raise _Invalid(f"{label} segments cover {pos} bytes but the record length is {length}")
    return TensorEntry(
        name=name,
        shape=shape,
        dtype=_check_str(obj["dtype"], f"{label} dtype", nonempty=True),
        method=_check_str(obj["method"], f"{label} method", nonempty=True),
        meta=_check_meta(obj["meta"], f"{label} meta"),
        offset=_check_int(obj["offset"], f"{label} offset"),
        length=length,
        segments=segments,
        sha256=_check_sha256_hex(obj["sha256"], f"{label} sha256"),
    )


def prefix_size(header: ContainerHeader) -> int:
    """Bytes of preamble + header JSON a container with this header starts with."""
    return PREAMBLE_SIZE + len(_dumps(_header_to_json(_check_header(header))))


def table_row_bytes(record: TensorRecord, offset: int, length: int) -> int:
    """Bytes the table row of `record` will take (+1 separator), given its offset and payload length:
    lets a writer budget a file before its tensors are coded. Exact up to the digits of segment offsets."""
    entry = TensorEntry(record.name, tuple(record.shape), record.dtype, record.method, record.meta, offset,
                        length, {k: (length, length) for k in record.segments}, "0" * 64)
    return len(_dumps(_entry_to_json(entry))) + 1


# ----------------------------------------------------------------------------- JSON helpers


def _dumps(obj: object) -> bytes:
    # Compact, deterministic (insertion order), UTF-8, and strictly standard JSON (no NaN).
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys silently; a duplicate is always a corrupt file.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    raise _Invalid(f"non-standard JSON constant {token}")


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # e.g. 1e999 overflows to inf without hitting parse_constant
        raise _Invalid(f"JSON number {token[:40]} overflows a float")
    return value


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_pairs_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
        )
    except _Invalid as e:
        raise CorruptHeaderError(f"{what}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise CorruptHeaderError(f"{what} is not valid UTF-8 JSON: {e}") from None


def _as_bytes_view(value: object, what: str) -> memoryview:
    try:
        view = memoryview(value)
    except TypeError:
        raise _Invalid(f"{what} must be bytes-like, got {_type_name(value)}") from None
    if not view.c_contiguous:
        raise _Invalid(f"{what} must be C-contiguous")
    if view.nbytes == 0:
        return memoryview(b"")  # cast() refuses views with a zero in their shape
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# ----------------------------------------------------------------------------- writer


class ContainerWriter:
    """Streams records into ``path + ".partial"``; ``close()`` adds table + footer, fsyncs and
    atomically renames, so ``path`` only ever holds a complete container. Leaving a ``with``
    block by exception (or any failed write) removes the partial file instead."""

    def __init__(self, path: Path | str, header: ContainerHeader) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        header_bytes = _dumps(_header_to_json(_check_header(header)))
        if len(header_bytes) > 0xFFFFFFFF:
            raise ValueError("header JSON does not fit the u32 header length field")
        # Preamble + header are covered by the footer digest together with the table.
        self._prefix = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)) + header_bytes
        self._entries: list[dict[str, Any]] = []  # table rows only: metadata, never payloads
        self._names: set[str] = set()
        self._table_rows_bytes = 0
        self._pos = 0
        self._state = "open"  # -> "closed" | "aborted"
        self._file: BinaryIO | None = open(self._partial, "wb")
        try:
            self._write(self._prefix)
        except BaseException:
            self.abort()
            raise

    @property
    def prefix_bytes(self) -> int:
        """Bytes of preamble + header JSON (written first; records start after them)."""
        return len(self._prefix)

    @property
    def bytes_written(self) -> int:
        """Bytes written so far; after close() this equals the final file size."""
        return self._pos

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._pos += len(data) if isinstance(data, bytes) else data.nbytes

    def _require_open(self) -> BinaryIO:
        if self._file is None:
            raise ValueError(f"container writer for {self.path} is {self._state}")
        return self._file

    def add(self, record: TensorRecord) -> TensorEntry:
        """Validate the record, append its payload to the file and return its table row.

        Validation happens before any byte is written, so a ValueError (bad field, duplicate
        name) leaves the writer usable; an I/O failure mid-write aborts the whole file."""
        self._require_open()
        name = _check_str(record.name, "record name", nonempty=True)
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        label = f"tensor {name!r}"
        if not isinstance(record.shape, tuple | list):
            raise _Invalid(f"{label} shape must be a tuple, got {_type_name(record.shape)}")
        shape: list[int] = []
        for i, dim in enumerate(record.shape):
            if isinstance(dim, bool):
                raise _Invalid(f"{label} shape[{i}] must be an int, got bool")
            try:
                dim = operator.index(dim)  # accept numpy integers from computed shapes
            except TypeError:
                raise _Invalid(f"{label} shape[{i}] must be an int, got {_type_name(dim)}") from None
            shape.append(_check_int(dim, f"{label} shape[{i}]"))
        dtype = _check_str(record.dtype, f"{label} dtype", nonempty=True)
        method = _check_str(record.method, f"{label} method", nonempty=True)
        meta = _check_meta(record.meta, f"{label} meta")
        if not isinstance(record.segments, dict):
            raise _Invalid(f"{label} segments must be a dict, got {_type_name(record.segments)}")
        views: list[tuple[str, memoryview]] = []
        for seg_name, blob in record.segments.items():
            _check_str(seg_name, f"{label} segment name", nonempty=True)
            views.append((seg_name, _as_bytes_view(blob, f"{label} segment {seg_name!r}")))

        offset = self._pos
        segments: dict[str, tuple[int, int]] = {}
        digest = hashlib.sha256()
        try:
            for seg_name, view in views:
                segments[seg_name] = (self._pos - offset, view.nbytes)
                digest.update(view)
                self._write(view)
        except BaseException:
            self.abort()
            raise
        entry = TensorEntry(
            name=name,
            shape=tuple(shape),
            dtype=dtype,
            method=method,
            meta=meta,
            offset=offset,
            length=self._pos - offset,
            segments=segments,
            sha256=digest.hexdigest(),
        )
        row = _entry_to_json(entry)
        self._entries.append(row)
        self._table_rows_bytes += len(_dumps(row))
        self._names.add(name)
        return entry

    @property
    def table_bytes(self) -> int:
        """Size the tensor table would have if the file were closed now (for callers budgeting bytes)."""
        return 2 + self._table_rows_bytes + max(len(self._entries) - 1, 0)

    def close(self) -> None:
        """Write table + footer, fsync, rename into place. Idempotent once it has succeeded."""
        if self._state == "closed":
            return
        f = self._require_open()
        try:
            table = _dumps(self._entries)
            table_offset = self._pos
            self._write(table)
            digest = hashlib.sha256(self._prefix)
            digest.update(table)
            self._write(_FOOTER.pack(table_offset, len(table), digest.digest(), END_MAGIC))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._file = None
            os.replace(self._partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Discard everything written so far; no file is left at path or path.partial."""
        if self._state == "closed":
            return
        self._state = "aborted"
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        try:
            self._partial.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reader


class ContainerReader:
    """Opens a container and loads only its header and tensor table (validated in full);
    payloads are read on demand, one record at a time."""

    header: ContainerHeader
    entries: list[TensorEntry]  # in file order
    file_size: int

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            self.header, self.entries = self._load()
        except BaseException:
            self._file.close()
            raise
        self._index = {e.name: i for i, e in enumerate(self.entries)}

    # -- loading

    def _read_at(self, offset: int, length: int, what: str) -> bytes:
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != length:  # only possible if the file shrank after it was opened
            raise TruncatedContainerError(
                f"{self.path}: {what} needs bytes [{offset}, {offset + length}) but the file ends at "
                f"{offset + len(data)}"
            )
        return data

    def _load(self) -> tuple[ContainerHeader, list[TensorEntry]]:
        size = self.file_size
        where = str(self.path)
        head = self._read_at(0, min(size, PREAMBLE_SIZE), "preamble")
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            raise BadMagicError(f"{where}: not an NWC container (magic {head[:8]!r}, expected {MAGIC!r})")
        if size < PREAMBLE_SIZE:
            raise TruncatedContainerError(
                f"{where}: {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble"
            )
        _, version, reserved, header_len = _PREAMBLE.unpack(head)
        if version != FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"{where}: format version {version}, this reader supports version {FORMAT_VERSION}"
            )
        if reserved != 0:
            raise CorruptHeaderError(f"{where}: reserved preamble field is {reserved}, expected 0")
        data_start = PREAMBLE_SIZE + header_len
        footer_start = size - FOOTER_SIZE
        if data_start > footer_start:
            raise TruncatedContainerError(
                f"{where}: {size} bytes, too short for a {header_len}-byte header plus the footer"
            )
        table_offset, table_len, table_sha, end_magic = _FOOTER.unpack(
            self._read_at(footer_start, FOOTER_SIZE, "footer")
        )
        if end_magic != END_MAGIC:
            raise TruncatedContainerError(
                f"{where}: footer end magic missing (file truncated or never finished writing)"
            )
        if table_offset < data_start:
            raise CorruptHeaderError(f"{where}: table offset {table_offset} is inside the header")
        if table_offset + table_len > footer_start:
            raise TruncatedContainerError(
                f"{where}: table ends at {table_offset + table_len} but the footer starts at {footer_start}"
            )
        if table_offset + table_len != footer_start:
            gap = footer_start - table_offset - table_len
            raise CorruptHeaderError(f"{where}: {gap} unaccounted bytes between table and footer")
        header_bytes = self._read_at(PREAMBLE_SIZE, header_len, "header")
        table_bytes = self._read_at(table_offset, table_len, "table")
        digest = hashlib.sha256(head)
        digest.update(header_bytes)
        digest.update(table_bytes)
        if digest.digest() != table_sha:
            raise CorruptHeaderError(f"{where}: header/table sha256 mismatch (metadata corrupted)")

        header_obj = _loads(header_bytes, f"{where}: header")
        table_obj = _loads(table_bytes, f"{where}: tensor table")
        try:
            header = _header_from_json(header_obj)
            if not isinstance(table_obj, list):
                raise _Invalid(f"tensor table must be a JSON list, got {_type_name(table_obj)}")
            entries = [_entry_from_json(obj, i) for i, obj in enumerate(table_obj)]
            _check_layout(entries, data_start, table_offset)
        except _Invalid as e:
            raise CorruptHeaderError(f"{where}: {e}") from None
        return header, entries

    # -- access

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[self._index[name]]
        except KeyError:
            close = difflib.get_close_matches(name, self._index, n=3) if isinstance(name, str) else []
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"no tensor named {name!r} in {self.path} ({len(self.entries)} tensors){hint}"
            ) from None

    def read(self, name: str) -> TensorRecord:
        """Random access: one seek plus reads of exactly this record's bytes, sha-verified."""
        return self._read_entry(self.entry(name))

    def _read_entry(self, entry: TensorEntry) -> TensorRecord:
        self._file.seek(entry.offset)
        digest = hashlib.sha256()
        segments: dict[str, bytes] = {}
        # One read per segment so the record is held once, not as a blob plus its slices.
        for seg_name, (_, seg_len) in entry.segments.items():  # contiguous: validated at open
            data = self._file.read(seg_len)
            if len(data) != seg_len:
                raise TruncatedContainerError(
                    f"{self.path}: tensor {entry.name!r} segment {seg_name!r} ends past the end of the file"
                )
            digest.update(data)
            segments[seg_name] = data
        if digest.hexdigest() != entry.sha256:
            raise CorruptTensorError(entry.name, f"payload sha256 mismatch in {self.path}")
        return TensorRecord(
            name=entry.name,
            shape=entry.shape,
            dtype=entry.dtype,
            method=entry.method,
            meta={k: list(v) if isinstance(v, list) else v for k, v in entry.meta.items()},
            segments=segments,
        )

    def __iter__(self) -> Iterator[TensorRecord]:
        """Records in file order; only the current one is held in memory."""
        for entry in self.entries:
            yield self._read_entry(entry)

    def verify(self) -> list[str]:
        """Names of tensors whose payload fails its checksum (hashed in chunks, never whole)."""
        bad: list[str] = []
        for entry in self.entries:
            self._file.seek(entry.offset)
            digest = hashlib.sha256()
            left = entry.length
            while left:
                chunk = self._file.read(min(left, _HASH_CHUNK))
                if not chunk:
                    raise TruncatedContainerError(
                        f"{self.path}: tensor {entry.name!r} ends past the end of the file"
                    )
                digest.update(chunk)
                left -= len(chunk)
            if digest.hexdigest() != entry.sha256:
                bad.append(entry.name)
        return bad

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ContainerReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_layout(entries: list[TensorEntry], data_start: int, table_offset: int) -> None:
    # Records tile [data_start, table_offset) exactly, in table order: every byte of the file
    # belongs to exactly one part, so nothing can hide in gaps and file size == sum of parts.
    pos = data_start
    seen: set[str] = set()
    for entry in entries:
        label = f"tensor {entry.name!r}"
        if entry.name in seen:
            raise _Invalid(f"{label} appears twice in the tensor table")
        seen.add(entry.name)
        if entry.offset != pos:
            raise _Invalid(f"{label} record starts at {entry.offset}, expected {pos}")
        if entry.offset + entry.length > table_offset:
            raise _Invalid(
                f"{label} record ends at {entry.offset + entry.length}, past the table at {table_offset}"
            )
        pos += entry.length
    if pos != table_offset:
        raise _Invalid(f"records end at {pos} but the table starts at {table_offset}")
