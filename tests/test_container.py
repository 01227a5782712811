"""Bundle container: round trips, random access, streaming and every failure mode on real files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest

from codec.container import (
    END_MAGIC,
    FOOTER_SIZE,
    MAGIC,
    PREAMBLE_SIZE,
    BadMagicError,
    ContainerError,
    ContainerHeader,
    ContainerReader,
    ContainerWriter,
    CorruptHeaderError,
    CorruptTensorError,
    TensorRecord,
    TruncatedContainerError,
    UnsupportedVersionError,
)

HEADER = ContainerHeader(
    codec_id="nwc-w128-d2-v1",
    codec_sha256=hashlib.sha256(b"codec weights").hexdigest(),
    created_by="nwc 0.1.0",
    attrs={"source_model": "tiny-test", "target_bits": "3.5"},
)


def _records() -> list[TensorRecord]:
    rng = np.random.default_rng(0)
    return [
        TensorRecord(
            name="layer0.weight",
            shape=(4, 8),
            dtype="bfloat16",
            method="nwc",
            meta={"rows": 4, "cols": 8, "segment_cols": 8, "ratio": 0.25, "flag": True, "tag": "x"},
            segments={
                "scales": rng.standard_normal(4).astype(np.float16).tobytes(),
                "levels": bytes([1, 2, 3, 4, 5, 6, 7, 8]),
                "ans": rng.integers(0, 2**32, 5, dtype=np.uint32).tobytes(),
                "escapes": b"",  # empty segment
            },
        ),
        TensorRecord(
            name="layer0.bias",
            shape=(8,),
            dtype="float32",
            method="raw",
            meta={"ids": [1, 2, 3], "weights": [0.5, 1.5]},
            segments={"data": np.arange(8, dtype=np.float32).tobytes()},
        ),
        TensorRecord(name="step", shape=(), dtype="int64", method="raw", meta={},
                     segments={"data": np.int64(7).tobytes()}),
        TensorRecord(name="tied.weight", shape=(4, 8), dtype="bfloat16", method="alias",
                     meta={"target": "layer0.weight"}, segments={}),
        TensorRecord(name="empty", shape=(0, 3), dtype="float16", method="raw", meta={},
                     segments={"data": b""}),
        TensorRecord(name="ünïcode.λ", shape=(3,), dtype="uint8", method="raw", meta={"note": "ok ✓"},
                     segments={"data": bytearray(b"\x01\x02\x03")}),
    ]


def _write(path: Path, records: list[TensorRecord] | None = None) -> list[TensorRecord]:
    records = _records() if records is None else records
    with ContainerWriter(path, HEADER) as writer:
        for record in records:
            writer.add(record)
    return records


def _normalized(record: TensorRecord) -> TensorRecord:
    # Segments may be given as any bytes-like object; they always come back as bytes.
    return TensorRecord(record.name, tuple(record.shape), record.dtype, record.method, record.meta,
                        {k: bytes(v) for k, v in record.segments.items()})


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@contextmanager
def _flipped(path: Path, offset: int) -> Iterator[None]:
    """Flip one byte in place and restore it afterwards (cheaper than rewriting the file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        original = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([original[0] ^ 0x40]), offset)
        try:
            yield
        finally:
            os.pwrite(fd, original, offset)
    finally:
        os.close(fd)


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, list[TensorRecord]]:
    path = tmp_path / "model.nwc"
    return path, _write(path)


def test_round_trip(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, records = bundle
    with ContainerReader(path) as reader:
        assert reader.header == HEADER
        assert [e.name for e in reader.entries] == [r.name for r in records]
        assert reader.file_size == path.stat().st_size
        for record in records:
            got = reader.read(record.name)
            assert got == _normalized(record)
            assert all(type(v) is bytes for v in got.segments.values())
            assert list(got.segments) == list(record.segments)  # segment order preserved
        assert reader.read("step").shape == ()
        assert reader.entry("layer0.weight").segments["escapes"][1] == 0
        assert reader.entry("tied.weight").length == 0
        assert reader.verify() == []
        assert len(reader) == len(records) and "step" in reader and "nope" not in reader


def test_layout_accounts_for_every_byte(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    raw = path.read_bytes()
    assert raw[:8] == MAGIC and raw[-8:] == END_MAGIC
    version, reserved, header_len = struct.unpack_from("<HHI", raw, 8)
    assert (version, reserved) == (1, 0)
    assert json.loads(raw[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len])["codec_id"] == HEADER.codec_id
    table_offset, table_len, digest = struct.unpack_from("<QQ32s", raw, len(raw) - FOOTER_SIZE)
    assert table_offset + table_len + FOOTER_SIZE == len(raw)
    metadata = raw[:PREAMBLE_SIZE + header_len] + raw[table_offset:-FOOTER_SIZE]
    assert digest == hashlib.sha256(metadata).digest()
    with ContainerReader(path) as reader:
        payload = sum(e.nbytes for e in reader.entries)
        assert PREAMBLE_SIZE + header_len + payload + table_len + FOOTER_SIZE == len(raw)
        for entry in reader.entries:
            assert hashlib.sha256(raw[entry.offset:entry.offset + entry.length]).hexdigest() == entry.sha256


def test_writer_returns_entries_and_counts_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.nwc"
    with ContainerWriter(path, HEADER) as writer:
        entries = [writer.add(r) for r in _records()]
        before_close = writer.bytes_written
        assert not path.exists()  # only the .partial exists until close()
        assert path.with_name("m.nwc.partial").exists()
    assert writer.bytes_written == path.stat().st_size > before_close
    assert not path.with_name("m.nwc.partial").exists()
    with ContainerReader(path) as reader:
        assert reader.entries == entries
    assert entries[0].numel == 32 and entries[2].numel == 1


def test_streaming_iteration_in_file_order(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, records = bundle
    with ContainerReader(path) as reader:
        it = iter(reader)
        assert next(it) == _normalized(records[0])  # lazy: yields before reading the rest
        assert [r.name for r in it] == [r.name for r in records[1:]]
        assert [r.name for r in reader] == [r.name for r in records]


class _CountingFile:
    """Stands in for the reader's file handle to record every read it makes."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner, self.bytes_read, self.reads = inner, 0, []

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        pos = self.inner.tell()
        data = self.inner.read(n)
        self.reads.append((pos, len(data)))
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self.inner.close()


def test_random_access_reads_only_that_record(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    with ContainerReader(path) as reader:
        counter = _CountingFile(reader._file)  # type: ignore[arg-type]
        reader._file = counter  # type: ignore[assignment]
        entry = reader.entry("layer0.bias")
        reader.read("layer0.bias")
        assert counter.bytes_read == entry.length
        assert all(entry.offset <= pos and pos + n <= entry.offset + entry.length for pos, n in counter.reads)


def test_random_access_survives_corruption_elsewhere(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, records = bundle
    with ContainerReader(path) as reader:
        victim = reader.entry("layer0.weight")
    _flip(path, victim.offset + victim.length - 1)
    with ContainerReader(path) as reader:
        assert reader.read("layer0.bias") == _normalized(records[1])
        with pytest.raises(CorruptTensorError) as info:
            reader.read("layer0.weight")
        assert info.value.tensor_name == "layer0.weight"
        assert "layer0.weight" in str(info.value)
        assert reader.verify() == ["layer0.weight"]
        with pytest.raises(CorruptTensorError):
            list(reader)


def test_flipped_payload_byte_names_each_tensor(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    pristine = path.read_bytes()
    with ContainerReader(path) as reader:
        entries = [e for e in reader.entries if e.length]
    for entry in entries:
        for offset in (entry.offset, entry.offset + entry.length // 2, entry.offset + entry.length - 1):
            with _flipped(path, offset), ContainerReader(path) as reader:
                with pytest.raises(CorruptTensorError) as info:
                    reader.read(entry.name)
                assert info.value.tensor_name == entry.name
                assert reader.verify() == [entry.name]
    assert path.read_bytes() == pristine


def test_flipped_byte_in_table_or_header_is_corrupt_header(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    pristine = path.read_bytes()
    table_offset, table_len = struct.unpack_from("<QQ", pristine, len(pristine) - FOOTER_SIZE)
    header_len = struct.unpack_from("<I", pristine, 12)[0]
    targets = list(range(table_offset, table_offset + table_len, 5))
    targets += list(range(PREAMBLE_SIZE, PREAMBLE_SIZE + header_len, 5))
    targets += list(range(len(pristine) - FOOTER_SIZE + 16, len(pristine) - 8))  # the digest itself
    for offset in targets:
        with _flipped(path, offset), pytest.raises(CorruptHeaderError):
            ContainerReader(path)


def test_any_single_flipped_byte_never_returns_wrong_data(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, records = bundle
    pristine = path.read_bytes()
    expected = {r.name: _normalized(r) for r in records}
    for offset in range(len(pristine)):
        with _flipped(path, offset):
            try:
                with ContainerReader(path) as reader:
                    for entry in reader.entries:
                        try:
                            assert reader.read(entry.name) == expected[entry.name]
                        except CorruptTensorError as e:
                            assert e.tensor_name == entry.name
            except ContainerError:
                pass
    assert path.read_bytes() == pristine


def test_truncation_anywhere_raises(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    pristine = path.read_bytes()
    cuts = sorted({0, 1, 7, 8, 15, 16, len(pristine) - 1, len(pristine) - FOOTER_SIZE}
                  | set(range(0, len(pristine), 7)))
    for cut in cuts:
        path.write_bytes(pristine[:cut])
        with pytest.raises((TruncatedContainerError, CorruptHeaderError)):
            ContainerReader(path)
    path.write_bytes(pristine[:0])
    with pytest.raises(TruncatedContainerError):
        ContainerReader(path)


def test_file_shrinking_after_open_is_truncation(tmp_path: Path) -> None:
    path = tmp_path / "m.nwc"
    # Large enough that the payload is not already in the reader's I/O buffer.
    big = TensorRecord("big", (1 << 16,), "uint8", "raw", {}, {"data": bytes(1 << 16)})
    _write(path, [*_records(), big])
    with ContainerReader(path) as reader:
        last_payload = [e for e in reader.entries if e.length][-1]
        with open(path, "r+b") as f:
            f.truncate(last_payload.offset + 1)
        with pytest.raises(TruncatedContainerError):
            reader.read(last_payload.name)
        with pytest.raises(TruncatedContainerError):
            reader.verify()


def test_bad_magic(tmp_path: Path, bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    pristine = path.read_bytes()
    # Text-mode mangling: \r\n -> \n shifts everything and breaks the magic.
    path.write_bytes(pristine.replace(b"\r\n", b"\n"))
    with pytest.raises(BadMagicError):
        ContainerReader(path)
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b'{"not": "a container"}' * 10)
    with pytest.raises(BadMagicError):
        ContainerReader(other)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"PK")
    with pytest.raises(BadMagicError):
        ContainerReader(tiny)


def test_unsupported_version(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersionError, match="version 2"):
        ContainerReader(path)


def _rewrite_table(path: Path, edit: Callable[[list[Any]], object]) -> None:
    """Re-encode the table with `edit` applied and a valid digest: simulates a buggy writer."""
    raw = path.read_bytes()
    header_len = struct.unpack_from("<I", raw, 12)[0]
    table_offset, table_len = struct.unpack_from("<QQ", raw, len(raw) - FOOTER_SIZE)
    table = json.loads(raw[table_offset:table_offset + table_len])
    edit(table)
    new_table = json.dumps(table).encode()
    digest = hashlib.sha256(raw[:PREAMBLE_SIZE + header_len] + new_table).digest()
    footer = struct.pack("<QQ32s8s", table_offset, len(new_table), digest, END_MAGIC)
    path.write_bytes(raw[:table_offset] + new_table + footer)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[1].update(offset=t[1]["offset"] + 1), "layer0.bias"),
        (lambda t: t[0].update(length=t[0]["length"] + 1), "layer0.weight"),
        (lambda t: t[0]["segments"].update(ans=[0, 4]), "'ans'"),
        (lambda t: t[1].update(shape=[-1]), r"shape\[0\]"),
        (lambda t: t[1].update(shape=[True]), r"shape\[0\]"),
        (lambda t: t[1].update(shape="8"), "shape"),
        (lambda t: t[1].update(name=t[0]["name"]), "twice"),
        (lambda t: t[1].update(dtype=3), "dtype"),
        (lambda t: t[1].update(meta={"ids": {"nested": 1}}), "meta"),
        (lambda t: t[1].update(sha256="xyz"), "sha256"),
        (lambda t: t[1].update(extra=1), "unexpected keys"),
        (lambda t: t[1].pop("method"), "missing keys"),
        (lambda t: t.pop(), "records end"),
        (lambda t: t.__setitem__(0, "not an object"), "entry 0"),
    ],
)
def test_inconsistent_table_is_corrupt_header(
    bundle: tuple[Path, list[TensorRecord]], edit: Callable[[list[Any]], object], match: str
) -> None:
    path, _ = bundle
    _rewrite_table(path, edit)
    with pytest.raises(CorruptHeaderError, match=match):
        ContainerReader(path)


def test_duplicate_json_keys_and_nan_rejected(bundle: tuple[Path, list[TensorRecord]]) -> None:
    path, _ = bundle
    raw = path.read_bytes()
    header_len = struct.unpack_from("<I", raw, 12)[0]
    table_offset, table_len = struct.unpack_from("<QQ", raw, len(raw) - FOOTER_SIZE)
    table = raw[table_offset:table_offset + table_len]
    for bad_table in (table.replace(b'"method":"raw"', b'"method":"raw","method":"raw"', 1),
                      table.replace(b'"ratio":0.25', b'"ratio":NaN', 1),
                      table.replace(b'"ratio":0.25', b'"ratio":1e999', 1),
                      b"\xff" + table):
        assert bad_table != table
        digest = hashlib.sha256(raw[:PREAMBLE_SIZE + header_len] + bad_table).digest()
        footer = struct.pack("<QQ32s8s", table_offset, len(bad_table), digest, END_MAGIC)
        path.write_bytes(raw[:table_offset] + bad_table + footer)
        with pytest.raises(CorruptHeaderError):
            ContainerReader(path)


def test_writer_exception_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "m.nwc"
    with pytest.raises(RuntimeError, match="boom"), ContainerWriter(path, HEADER) as writer:
        writer.add(_records()[0])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="aborted"):
        writer.add(_records()[1])


def test_writer_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "m.nwc"
    records = _write(path)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt), ContainerWriter(path, HEADER) as writer:
        writer.add(records[1])
        raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nwc"]


def test_duplicate_and_invalid_records_rejected_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "m.nwc"
    records = _records()
    with ContainerWriter(path, HEADER) as writer:
        writer.add(records[0])
        size = writer.bytes_written
        with pytest.raises(ValueError, match="duplicate tensor name 'layer0.weight'"):
            writer.add(records[0])
        bad = [
            TensorRecord("", (1,), "float32", "raw", {}, {}),
            TensorRecord("a", (-1,), "float32", "raw", {}, {}),
            TensorRecord("a", (1.0,), "float32", "raw", {}, {}),  # type: ignore[arg-type]
            TensorRecord("a", (1,), "", "raw", {}, {}),
            TensorRecord("a", (1,), "float32", "raw", {"x": float("nan")}, {}),
            TensorRecord("a", (1,), "float32", "raw", {"x": [1, "2"]}, {}),  # type: ignore[list-item]
            TensorRecord("a", (1,), "float32", "raw", {"x": {"y": 1}}, {}),  # type: ignore[dict-item]
            TensorRecord("a", (1,), "float32", "raw", {"x": 2**70}, {}),
            TensorRecord("a", (1,), "float32", "raw", {}, {"d": "text"}),  # type: ignore[dict-item]
            TensorRecord("a", (1,), "float32", "raw", {}, {"d": np.zeros((4, 4))[:, 0]}),  # type: ignore[dict-item]
            TensorRecord("\ud800", (1,), "float32", "raw", {}, {}),
        ]
        for record in bad:
            with pytest.raises(ValueError):
                writer.add(record)
        assert writer.bytes_written == size  # nothing was written for rejected records
        # numpy arrays (any C-contiguous buffer) are accepted as segments, numpy ints in shapes.
        segments = {"d": np.zeros(2, np.float32), "m": np.ones((2, 2), np.float16), "z": np.zeros((0, 3))}
        writer.add(TensorRecord("a", (np.int64(2),), "float32", "raw", {}, segments))  # type: ignore[arg-type]
    with ContainerReader(path) as reader:
        assert [e.name for e in reader.entries] == ["layer0.weight", "a"]
        got = reader.read("a")
        assert got.shape == (2,) and type(got.shape[0]) is int
        assert got.segments == {k: v.tobytes() for k, v in segments.items()}


def test_invalid_header_rejected(tmp_path: Path) -> None:
    for header in (
        ContainerHeader("x", "not-hex", "nwc", {}),
        ContainerHeader("x", "", "nwc", {"k": 1}),  # type: ignore[dict-item]
        ContainerHeader(1, "", "nwc", {}),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError):
            ContainerWriter(tmp_path / "h.nwc", header)
    assert list(tmp_path.iterdir()) == []


def test_empty_container_and_missing_name(tmp_path: Path) -> None:
    path = tmp_path / "empty.nwc"
    header = ContainerHeader(codec_id="", codec_sha256="", created_by="nwc 0.1.0", attrs={})
    with ContainerWriter(path, header):
        pass
    with ContainerReader(path) as reader:
        assert reader.entries == [] and reader.header == header and reader.verify() == []
    _write(path)
    with ContainerReader(path) as reader, pytest.raises(KeyError, match="layer0.weight"):
        reader.entry("layer0.weigth")


def test_corrupt_tensor_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(CorruptTensorError("a.b", "payload sha256 mismatch")))
    assert err.tensor_name == "a.b" and str(err) == "tensor 'a.b': payload sha256 mismatch"


def test_close_is_idempotent_and_add_after_close_fails(tmp_path: Path) -> None:
    writer = ContainerWriter(tmp_path / "m.nwc", HEADER)
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add(_records()[0])
