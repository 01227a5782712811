"""Shared fixtures: the real cached assets (prepared on first use by codec.assets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from codec import assets


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return assets.smollm2_dir()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return assets.minilm_dir()


@pytest.fixture(scope="session")
def calib_text() -> str:
    return assets.calib_text()


@pytest.fixture(scope="session")
def eval_text() -> str:
    return assets.eval_text()


@pytest.fixture(scope="session")
def effnet_dir() -> Path:
    return assets.effnet_dir()
