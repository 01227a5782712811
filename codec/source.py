"""Model sources: a Hugging Face-style directory of safetensors shards, or one .safetensors file.

Only headers are read up front (validated by the safetensors library); tensors are loaded one at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# Files that never travel into a bundle: pickled weights are refused, the index is regenerated.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
SKIP_FILES = {"model.safetensors.index.json"}
MAX_AUX_BYTES = 64 << 20

ST_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class SourceError(ValueError):
    """The model source is missing, empty or malformed; the message names the file."""


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str  # shard file name
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelSource:
    root: Path
    shards: list[Path]
    aux_files: list[Path]
    tensors: list[SourceTensor]
    shard_metadata: dict[str, dict[str, str]]

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def by_shard(self) -> Iterator[tuple[Path, list[SourceTensor]]]:
        for shard in self.shards:
            yield shard, [t for t in self.tensors if t.file == shard.name]

    def fingerprint(self) -> str:
        """sha256 over each shard's name, size and 64 samples of 4 KiB spread over it: tells different weights
        apart without reading a large model whole, and does not depend on where the files sit."""
        h = hashlib.sha256()
        for shard in self.shards:
            size = shard.stat().st_size
            h.update(f"{shard.name}:{size}:".encode())
            with open(shard, "rb") as f:
                for k in range(64):
                    f.seek(size * k // 64)
                    h.update(f.read(4096))
        return h.hexdigest()

    def load(self, shard: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors of one shard, one at a time (mmap-backed: only the current one is resident)."""
        with safe_open(str(shard), framework="pt") as f:
            for n in names:
                yield n, f.get_tensor(n)


def open_source(src: Path) -> ModelSource:
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src} does not exist")
    if src.is_file():
        if src.suffix != ".safetensors":
            raise SourceError(f"{src.name}: only .safetensors files are accepted (pickle formats are refused)")
        shards, aux, root = [src], [], src.parent
    else:
        root = src
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            pickles = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found pickle files {pickles}: convert them to safetensors)" if pickles else ""
            raise SourceError(f"{src} holds no .safetensors files{hint}")
        aux = sorted(
            p for p in src.iterdir()
            if p.is_file() and p.suffix != ".safetensors" and p.suffix not in PICKLE_SUFFIXES
            and p.name not in SKIP_FILES and not p.name.startswith(".") and p.stat().st_size <= MAX_AUX_BYTES
        )
    tensors, meta, seen = [], {}, set()
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                meta[shard.name] = dict(f.metadata() or {})
                for name in f.keys():
                    sl = f.get_slice(name)
                    dt = ST_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise SourceError(f"{shard.name}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                    if name in seen:
                        raise SourceError(f"{shard.name}: tensor {name!r} appears in more than one shard")
                    seen.add(name)
                    tensors.append(SourceTensor(name, shard.name, tuple(sl.get_shape()), dt))
        except SafetensorError as e:
            raise SourceError(f"{shard.name}: not a valid safetensors file ({e})") from e
    return ModelSource(root, shards, aux, tensors, meta)


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The transformers shard index, only when there is more than one shard."""
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
