"""A small synthetic checkpoint with awkward shapes and dtypes, shared by test_pipeline.py and test_cli.py.

Weights are seeded Gaussian/Laplacian draws with per-row scales (the statistics of real linear layers),
written with safetensors.torch.save_file so the pipeline reads a real file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TIED = ("embed.weight", "lm_head.weight")


def _weight(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(shape, generator=g)
    # Heavier-than-Gaussian tails and uneven row scales, as in trained layers.
    w = w * torch.empty(shape).exponential_(1.0, generator=g).sqrt()
    row = 0.02 * torch.exp(0.5 * torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=g))
    return (w * row).to(dtype)


def synthetic_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = _weight((256, 64), g)
    tensors = {
        "odd.weight": _weight((37, 50), g),  # 1850 weights: too small to code, stays raw
        "odd_coded.weight": _weight((100, 77), g),  # rows not a multiple of 16, coded
        "bf16.weight": _weight((64, 128), g, torch.bfloat16),
        "fp16.weight": _weight((48, 96), g, torch.float16),
        "bias": torch.randn(96, generator=g),
        "scalar": torch.tensor(0.125),
        "position_ids": torch.arange(512, dtype=torch.int64).reshape(1, 512),
        "conv.weight": _weight((32, 3, 3, 3), g),  # 864 weights: raw
        "conv_coded.weight": _weight((64, 16, 3, 3), g),  # 4-D, coded as (64, 144)
        "empty.weight": torch.zeros((0, 8)),
        TIED[0]: embed,
        TIED[1]: embed.clone(),  # tied: identical bytes; safetensors refuses shared storage
        "big.weight": _weight((4096, 64), g),
    }
    return tensors


def write_synthetic_model(directory: Path, seed: int = 0) -> Path:
    """A model directory: model.safetensors plus a config.json that must travel with the bundle."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(synthetic_tensors(seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "synthetic"}\n')
    return directory
