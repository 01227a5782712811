"""Compare an original safetensors model directory with its decompressed (dense) copy, tensor by tensor.

Tensors are streamed with ``safetensors.safe_open``: one original and one decoded tensor are in memory
at a time, never the whole model. Normalized MSE of a tensor = mean((w - w_hat)^2) / var(w) (for a
constant tensor, / mean(w^2); 0/0 counts as 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name in ``model_dir`` to the safetensors file holding it (sharded or not)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    mapping: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            mapping.update({name: f for name in fh.keys()})
    return mapping


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class TensorDiff:
    name: str
    numel: int
    nmse: float
    max_abs: float


@dataclass
class CompareReport:
    original: Path
    dense: Path
    original_bytes: int
    dense_bytes: int
    bundle: Path | None
    bundle_bytes: int | None
    n_params: int
    tensors: list[TensorDiff] = field(default_factory=list)
    only_original: list[str] = field(default_factory=list)
    only_dense: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float | None:
        """Bundle bits per parameter of the original (all tensors, side info and metadata included)."""
        if self.bundle_bytes is None or self.n_params == 0:
            return None
        return 8 * self.bundle_bytes / self.n_params

    @property
    def weighted_nmse(self) -> float:
        """Element-weighted mean of the per-tensor normalized MSE."""
        total = sum(t.numel for t in self.tensors)
        return sum(t.nmse * t.numel for t in self.tensors) / total if total else float("nan")

    def format(self, worst: int = 5) -> str:
        mib = 1024 * 1024
        lines = [
            f"original   {self.original}: {self.original_bytes / mib:,.1f} MiB safetensors, "
            f"{self.n_params:,} parameters",
            f"dense      {self.dense}: {self.dense_bytes / mib:,.1f} MiB safetensors",
        ]
        if self.bundle is not None and self.bundle_bytes is not None:
            lines.append(f"bundle     {self.bundle}: {self.bundle_bytes / mib:,.2f} MiB = "
                         f"{self.bits_per_weight:.3f} bits per original parameter, every bundle file counted "
                         f"(ratio {self.original_bytes / max(self.bundle_bytes, 1):.1f}x)")
        nmses = sorted(t.nmse for t in self.tensors)
        if nmses:
            exact = sum(1 for v in nmses if v == 0.0)
            median = nmses[len(nmses) // 2]
            lines.append(f"tensors    {len(nmses)} compared ({exact} bit-exact); normalized MSE: "
                         f"weighted mean {self.weighted_nmse:.3e}, median {median:.3e}, max {nmses[-1]:.3e}")
            for t in sorted(self.tensors, key=lambda t: -t.nmse)[:worst]:
                lines.append(f"  worst    {t.name}: nmse {t.nmse:.3e}, max |err| {t.max_abs:.3e}")
        if self.only_original:
            lines.append(f"missing in dense: {len(self.only_original)} tensors, e.g. {self.only_original[:3]}")
        if self.only_dense:
            lines.append(f"only in dense: {len(self.only_dense)} tensors, e.g. {self.only_dense[:3]}")
        return "\n".join(lines)


def compare_dirs(original: Path, dense: Path, bundle: Path | None = None) -> CompareReport:
    """Stream both directories' tensors and report sizes and per-tensor normalized MSE."""
    import torch
    from safetensors import safe_open

    orig_map, dense_map = _tensor_files(original), _tensor_files(dense)
    report = CompareReport(
        original=Path(original), dense=Path(dense),
        original_bytes=sum(_size(f) for f in set(orig_map.values())),
        dense_bytes=sum(_size(f) for f in set(dense_map.values())),
        bundle=Path(bundle) if bundle is not None else None,
        bundle_bytes=_size(bundle) if bundle is not None else None,
        n_params=0,
        only_original=sorted(set(orig_map) - set(dense_map)),
        only_dense=sorted(set(dense_map) - set(orig_map)),
    )
    # Group by (original file, dense file) so each file is opened once.
    pairs: dict[tuple[Path, Path], list[str]] = {}
    for name in sorted(orig_map):
        if name in dense_map:
            pairs.setdefault((orig_map[name], dense_map[name]), []).append(name)
    for fname in set(orig_map.values()):
        with safe_open(fname, framework="pt") as fh:
            report.n_params += sum(math.prod(fh.get_slice(n).get_shape()) for n in fh.keys())
    for (ofile, dfile), names in pairs.items():
        with safe_open(ofile, framework="pt") as fo, safe_open(dfile, framework="pt") as fd:
            for name in names:
                w = fo.get_tensor(name).to(torch.float64)
                w_hat = fd.get_tensor(name).to(torch.float64)
                if w.shape != w_hat.shape:
                    raise ValueError(f"{name}: shape {tuple(w.shape)} vs {tuple(w_hat.shape)}")
                err = w - w_hat
                mse = float(err.square().mean()) if err.numel() else 0.0
                denom = float(w.var(unbiased=False)) if w.numel() > 1 else 0.0
                denom = denom or (float(w.square().mean()) if w.numel() else 0.0)
                nmse = mse / denom if denom else (0.0 if mse == 0.0 else float("inf"))
                report.tensors.append(TensorDiff(name, w.numel(), nmse,
                                                 float(err.abs().max()) if err.numel() else 0.0))
    return report
