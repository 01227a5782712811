"""Cross-layer rate allocation: sensitivities measured on a real block, equal-slope offsets, rate control with
offsets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from codec.allocation import AllocationError, block_sensitivities, level_offsets
from codec.chunking import row_scales
from codec.ratecontrol import LevelSolver, RateController, RateItem


def test_offsets_are_equal_slope_and_clipped():
    sens = {"a": 1.0, "b": 4.0, "c": 0.25, "d": 2.0**10, "e": 2.0**-10}
    got = {s.name: s.offset for s in level_offsets(sens)}
    # geomean of the five is 1: offset = 2·log2(a) levels (½·log2 a bits), clipped to ±8
    assert got == {"a": 0, "b": 4, "c": -4, "d": 8, "e": -8}
    half = {s.name: s.offset for s in level_offsets(sens, strength=0.5)}
    assert half == {"a": 0, "b": 2, "c": -2, "d": 8, "e": -8}
    assert all(s.offset == 0 for s in level_offsets(sens, strength=0.0))
    with pytest.raises(AllocationError):
        level_offsets(sens, strength=-1)


def test_solver_with_offsets_meets_the_budget_and_shifts_levels():
    rng = np.random.default_rng(0)
    L = 28
    base = np.linspace(0.5, 7.5, L)
    curves = np.stack([base + rng.uniform(-0.1, 0.1) for _ in range(6)])
    numels = np.array([1000, 2000, 500, 4000, 1500, 3000])
    offsets = np.array([0, 4, -4, 2, -8, 8])
    solver = LevelSolver(curves, numels, offsets)
    budget = 4.0 * numels.sum()
    t = solver.solve(budget)
    assert solver.total(t, 0) == pytest.approx(budget, rel=1e-6)
    levels = [solver.level(t, i) for i in range(6)]
    assert levels[1] - levels[0] == pytest.approx(4) and levels[0] - levels[2] == pytest.approx(4)
    # clipping at both ends still lets the solver reach every budget between the extremes
    assert solver.total(solver.solve(curves[:, 0] @ numels), 0) == pytest.approx(curves[:, 0] @ numels, rel=1e-6)


def test_controller_levels_follow_offsets():
    L = 28
    curve = np.linspace(1.0, 7.75, L)
    items = [RateItem(f"t{i}", True, 10_000, 100, 50, curve) for i in range(4)]
    rc = RateController(items, 4.0, 40_000, L, 64, 32)
    rc.set_offsets({"t1": 4, "t2": -4})
    written, lv = 64, []
    for i in range(4):  # each tensor costs exactly what its curve predicts: the shared level never moves
        lv.append(rc.advance(f"t{i}", written, 50 * i))
        written += 100 + round(10_000 * np.interp(lv[-1], np.arange(L), curve) / 8)
    assert lv[1] - lv[0] == pytest.approx(4, abs=0.05) and lv[0] - lv[2] == pytest.approx(4, abs=0.05)
    assert abs(8 * (written + 50 * 4 + 32) / 40_000 - 4.0) < 0.01


@pytest.fixture(scope="module")
def block0(smollm2_dir: Path):
    """SmolLM2's first decoder block and its real inputs on 4 calibration sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codec.calibration import load_calibration

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    cs = load_calibration("wiki", AutoTokenizer.from_pretrained(smollm2_dir), n_seq=4, seq_len=128, seed=0)
    hidden = model.model.embed_tokens(cs.input_ids).detach()
    pos = torch.arange(cs.seq_len)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, pos), "position_ids": pos,
              "attention_mask": None}
    return model.model.layers[0], hidden, kwargs


def test_down_proj_sensitivity_matches_its_closed_form(block0):
    """down_proj writes straight into the residual stream, so noise N (std σ·r_i in row i) on it changes the block
    output by exactly x Nᵀ: absolute sensitivity = mean_i(r_i²) · mean_t ||x_t||², x its real inputs."""
    layer, hidden, kwargs = block0
    layer.requires_grad_(False)
    mod = layer.mlp.down_proj
    xs = []
    handle = mod.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach().clone()))
    with torch.no_grad():
        clean = layer(hidden, **kwargs)
    handle.remove()
    clean = clean[0] if isinstance(clean, tuple) else clean
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    r2 = row_scales(mod.weight).float().pow(2).mean()
    expected = float(r2 * x.pow(2).sum(-1).mean())
    gen = torch.Generator().manual_seed(0)
    w0 = mod.weight.detach().clone()
    got = block_sensitivities(layer, {"down": mod, "q": layer.self_attn.q_proj}, hidden, clean, kwargs, 4, gen,
                              "absolute")
    assert torch.equal(mod.weight, w0)  # the weights are restored
    assert got["down"] == pytest.approx(expected, rel=0.1)
    rel = block_sensitivities(layer, {"down": mod}, hidden, clean, kwargs, 4, torch.Generator().manual_seed(0),
                              "relative")
    assert rel["down"] == pytest.approx(got["down"] / float(clean.double().pow(2).mean()), rel=1e-6)
    assert math.isfinite(got["q"]) and got["q"] > 0
