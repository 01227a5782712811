"""The `nwc` command line, run as a real subprocess on the synthetic model: the happy path and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from synthetic_model import synthetic_tensors, write_synthetic_model

from codec.container import ContainerReader
from codec.pipeline import BUNDLE_FILE

REPO = Path(__file__).resolve().parent.parent


def nwc(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "codec.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("cli")
    src = write_synthetic_model(root / "src")
    bundle = root / "bundle"
    r = nwc("compress", src, "-o", bundle, "--bits", "4", "--quiet", "--device", "cpu")
    return src, bundle, r


def test_compress_inspect_verify_decompress(cli_bundle, tmp_path: Path) -> None:
    src, bundle, r = cli_bundle
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and "target 4" in r.stdout
    assert (bundle / BUNDLE_FILE).is_file()

    names = sorted(synthetic_tensors())
    r = nwc("inspect", bundle)
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert set(names) <= listed, set(names) - listed
    assert f"{len(names)} tensors" in r.stdout
    assert "verified" not in r.stdout

    r = nwc("inspect", bundle, "--verify")
    assert r.returncode == 0, r.stderr
    assert "all checksums verified" in r.stdout

    out = tmp_path / "dense"
    r = nwc("decompress", bundle, "-o", out, "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    dense = load_file(str(out / "model.safetensors"))
    original = synthetic_tensors()
    assert set(dense) == set(original)
    for name, t in original.items():
        assert (dense[name].shape, dense[name].dtype) == (t.shape, t.dtype), name
    assert (out / "config.json").read_text() == (src / "config.json").read_text()
    # compress also wrote the dense model beside the bundle by default: the same tensors as `nwc decompress`
    default = load_file(str(bundle.parent / f"{bundle.name}-dense" / "model.safetensors"))
    assert default.keys() == dense.keys() and all(default[k].equal(dense[k]) for k in dense)


def test_compress_refuses_to_overwrite_a_dense_output(cli_bundle) -> None:
    src, bundle, _ = cli_bundle
    before = (bundle / BUNDLE_FILE).stat().st_mtime_ns
    r = nwc("compress", src, "-o", bundle, "--bits", "4", "--quiet", "--device", "cpu")
    assert r.returncode == 2 and f"{bundle.name}-dense exists and is not empty" in r.stderr, r.stderr
    assert (bundle / BUNDLE_FILE).stat().st_mtime_ns == before  # refused before anything was written


def test_codecs_lists_the_default() -> None:
    r = nwc("codecs")
    assert r.returncode == 0, r.stderr
    marked = [line for line in r.stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "sha256" in marked[0]


def test_compress_missing_source_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    r = nwc("compress", missing, "-o", tmp_path / "bundle", "--bits", "3", "--quiet")
    assert r.returncode == 2
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert err_lines and str(missing) in err_lines[0] and "does not exist" in err_lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "bundle").exists()


def test_decompress_corrupt_bundle_exits_2_naming_tensor(cli_bundle, tmp_path: Path) -> None:
    _, bundle, r = cli_bundle
    assert r.returncode == 0, r.stderr
    container = tmp_path / "bad.nwc"
    data = bytearray((bundle / BUNDLE_FILE).read_bytes())
    with ContainerReader(bundle / BUNDLE_FILE) as reader:
        e = reader.entry("conv_coded.weight")
    assert e.method == "nwc"
    data[e.offset + e.length // 2] ^= 0xFF
    container.write_bytes(bytes(data))

    out = tmp_path / "dense"
    r = nwc("decompress", container, "-o", out, "--quiet", "--device", "cpu")
    assert r.returncode == 2
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert err_lines and "conv_coded.weight" in err_lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nwc"]

    r = nwc("inspect", container, "--verify")
    assert r.returncode == 2
    assert "conv_coded.weight" in r.stderr and "Traceback" not in r.stderr
    assert "all checksums verified" not in r.stdout


def test_inspect_truncated_bundle_exits_2(cli_bundle, tmp_path: Path) -> None:
    _, bundle, _ = cli_bundle
    container = tmp_path / "cut.nwc"
    data = (bundle / BUNDLE_FILE).read_bytes()
    container.write_bytes(data[: len(data) // 2])
    r = nwc("inspect", container)
    assert r.returncode == 2
    assert any(line.startswith("error:") for line in r.stderr.splitlines()), r.stderr
    assert "Traceback" not in r.stderr
