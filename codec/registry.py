"""Registry of trained codecs shipped in codec/weights/: id -> file, sha256, config and how it was trained.

A checkpoint is one safetensors file holding the network weights AND the integer CDF tables, so the
sha256 in the registry pins exactly what encoder and decoder use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from codec.entropy import CdfTables, tabulate
from codec.model import CodecConfig, NWCModel

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGISTRY = WEIGHTS_DIR / "registry.json"


class CodecNotFoundError(LookupError):
    pass


class CodecIntegrityError(ValueError):
    pass


@dataclass(frozen=True)
class CodecInfo:
    id: str
    file: str
    sha256: str
    config: dict
    training: dict


@dataclass
class LoadedCodec:
    info: CodecInfo
    model: NWCModel
    tables: CdfTables


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_registry(path: Path = REGISTRY) -> dict:
    if not path.exists():
        return {"default": None, "codecs": []}
    return json.loads(path.read_text())


def list_codecs(path: Path = REGISTRY) -> list[CodecInfo]:
    return [CodecInfo(**c) for c in read_registry(path)["codecs"]]


def codec_info(codec_id: str | None = None, path: Path = REGISTRY) -> CodecInfo:
    reg = read_registry(path)
    want = codec_id or reg["default"]
    for c in reg["codecs"]:
        if c["id"] == want:
            return CodecInfo(**c)
    known = ", ".join(c["id"] for c in reg["codecs"]) or "none"
    raise CodecNotFoundError(f"codec {want!r} is not in the registry (known: {known})")


def export_codec(model: NWCModel, codec_id: str, training: dict, weights_dir: Path = WEIGHTS_DIR,
                 make_default: bool = True) -> CodecInfo:
    """Tabulate the density, write weights + tables as safetensors, and record it in registry.json."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tables = tabulate(model.density, cfg.n_levels, cfg.latent)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update(tables.tensors())
    path = weights_dir / f"{codec_id}.safetensors"
    save_file(tensors, str(path), metadata={"codec_id": codec_id, "config": json.dumps(cfg.to_dict())})
    info = CodecInfo(codec_id, path.name, sha256_file(path), cfg.to_dict(), training)
    reg_path = weights_dir / "registry.json"
    reg = read_registry(reg_path)
    reg["codecs"] = [c for c in reg["codecs"] if c["id"] != codec_id] + [asdict(info)]
    if make_default or not reg["default"]:
        reg["default"] = codec_id
    reg_path.write_text(json.dumps(reg, indent=1) + "\n")
    return info


_CACHE: dict[str, LoadedCodec] = {}


def load_codec(codec_id: str | None = None, registry: Path = REGISTRY) -> LoadedCodec:
    """Load a registered codec after checking its sha256 (cached per process)."""
    info = codec_info(codec_id, registry)
    if info.id in _CACHE:
        return _CACHE[info.id]
    path = registry.parent / info.file
    if not path.exists():
        raise CodecNotFoundError(f"codec file {path} is missing")
    digest = sha256_file(path)
    if digest != info.sha256:
        raise CodecIntegrityError(f"codec {info.id}: sha256 {digest} does not match the registry's {info.sha256}")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = NWCModel(CodecConfig(**info.config))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("tables.")})
    tables = CdfTables.from_tensors({k: v for k, v in tensors.items() if k.startswith("tables.")})
    loaded = LoadedCodec(info, model.eval(), tables)
    _CACHE[info.id] = loaded
    return loaded
