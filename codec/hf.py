"""Load an NWC bundle directly with transformers: ``from_pretrained(bundle_dir)`` decodes at load time.

    import codec.hf  # registers quant_method "nwc" with transformers (idempotent)
    model = AutoModelForCausalLM.from_pretrained("runs/smollm2-4bit", dtype=torch.float32)

A bundle directory holds ``model.nwc``, the source's config.json / tokenizer files and report.json, and no
safetensors weights. `write_quantization_config` adds ``"quantization_config": {"quant_method": "nwc", ...}``
to its config.json; importing this module registers `NWCConfig` and `NWCHfQuantizer` under that method with
``transformers.quantizers.register_quantization_config`` / ``register_quantizer``.

Mechanism (transformers 5.23). `PreTrainedModel.from_pretrained` resolves weight files *before* it builds
the model and insists on finding safetensors (or ``.bin``) files; no quantizer hook supplies a state dict
(only ``gguf_file=`` does, and only when passed explicitly). What a quantizer can do, in this order:

1. ``update_attn_implementation(config)`` runs before the files are resolved, outside the meta-device and
   default-dtype contexts transformers builds the model in, with ``config._name_or_path`` naming the local
   directory. `NWCHfQuantizer` decodes the bundle there with `codec.pipeline.decompress_model` (the code of
   ``nwc decompress``; one dense shard at a time in memory) into a private temporary directory under
   ``$TMPDIR``, and sets ``config.transformers_weights`` to a placeholder name, ``model.nwc.safetensors``,
   which transformers accepts for a local directory without opening it. (``config.dtype`` is filled from the
   container when the config has none, since ``dtype="auto"`` would otherwise open the placeholder.)
2. ``preprocess_model(..., checkpoint_files=[<dir>/model.nwc.safetensors])`` runs once the model skeleton
   exists. The quantizer checks that the list is exactly the placeholder (otherwise transformers behaves
   differently from 5.23 and it raises instead of guessing) and replaces the list's contents, in place, by
   the decoded shards, which transformers then loads through its ordinary safetensors path (dtype casting,
   tied weights, device maps, missing-key report).
3. ``postprocess_model`` removes the temporary directory (loaded tensors that are memory-mapped from it stay
   valid on POSIX) and the quantization state: the result is an ordinary dense model (``model.is_quantized``
   is False; ``config.quantization_config`` and ``config.transformers_weights`` are gone), so
   ``save_pretrained`` writes a plain dense checkpoint. A load that fails half-way removes it when the
   quantizer is garbage-collected, at the latest at interpreter exit.

Decoding goes through the same code as ``nwc decompress``, so the loaded weights equal its output exactly,
and a damaged ``model.nwc`` raises the container's own error (`codec.container.CorruptTensorError` naming the
tensor, `ContainerError` for a bad header or table) out of ``from_pretrained``; nothing is loaded half-way.

Without ``import codec.hf`` transformers 5.23 logs "Unknown quantization type, got nwc ... we will skip the
quantization" and then raises ``OSError: Error no file named model.safetensors ... found in directory``:
a bundle never loads as random weights. A directory produced by ``nwc decompress`` from a bundle whose
config.json still names ``nwc`` (dense safetensors, no ``model.nwc``) loads normally with the import too.
Only local directories are supported (download a Hub repository with ``snapshot_download`` first).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import transformers
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from codec.container import FORMAT_VERSION, ContainerReader
from codec.pipeline import BUNDLE_FILE, decompress_model
from codec.tensors import DTYPES

__all__ = [
    "QUANT_METHOD", "NWCConfig", "NWCHfQuantizer", "config_marker", "dense_config_text", "register",
    "strip_quantization_config", "with_quantization_config", "write_quantization_config",
]

QUANT_METHOD = "nwc"
PLACEHOLDER_SUFFIX = ".safetensors"  # transformers only accepts explicit weight names ending like this
DENSE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
log = logging.getLogger(__name__)


class NWCConfig(QuantizationConfigMixin):
    """``config.json["quantization_config"]`` of an NWC bundle.

    bundle_file: the container's file name inside the bundle directory (a plain name, no path).
    codec_id: the learned codec the bundle was written with (checked against the container header).
    format_version: container format version (docs/FORMAT.md); a newer one than this reader knows is refused.
    """

    def __init__(self, bundle_file: str = BUNDLE_FILE, codec_id: str = "", format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"NWCConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if kwargs:
            log.info("NWCConfig: ignoring unknown keys %s", sorted(kwargs))
        self.quant_method = QUANT_METHOD
        self.bundle_file = bundle_file
        self.codec_id = codec_id
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        name = self.bundle_file
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"NWCConfig: bundle_file must be a plain file name, got {name!r}")
        if not isinstance(self.codec_id, str):
            raise ValueError(f"NWCConfig: codec_id must be a string, got {self.codec_id!r}")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise ValueError(f"NWCConfig: format_version must be an integer, got {self.format_version!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"NWCConfig: the bundle uses container format version {self.format_version}, this nwc reads "
                f"version {FORMAT_VERSION}; upgrade nwc to load it"
            )


class NWCHfQuantizer(HfQuantizer):
    """Decodes an NWC bundle during ``from_pretrained`` (see the module docstring for the hooks used)."""

    requires_calibration = True  # only loads bundles; NWCConfig cannot quantize a dense model on the fly
    quantization_config: NWCConfig

    def __init__(self, quantization_config: NWCConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._bundle_dir: Path | None = None
        self._shards: list[str] | None = None  # decoded dense shards (None: a dense directory naming nwc)
        self._cleanup: weakref.finalize | None = None

    @property
    def placeholder(self) -> str:
        return self.quantization_config.bundle_file + PLACEHOLDER_SUFFIX

    # -- 1. before the weight files are resolved (and outside transformers' meta-device / default-dtype contexts)

    def update_attn_implementation(self, config):
        config = super().update_attn_implementation(config)
        root = str(getattr(config, "_name_or_path", "") or "")
        name = self.quantization_config.bundle_file
        if not root or not os.path.isdir(root):
            raise ValueError(
                f"NWC bundles load from a local directory (got {root or 'no path'!r}); download the repository "
                f"first, e.g. with huggingface_hub.snapshot_download, and pass its directory"
            )
        bundle = Path(root) / name
        if not bundle.is_file():
            if any((Path(root) / f).is_file() for f in DENSE_WEIGHT_FILES):
                log.info("%s has dense weights and no %s: loading them as they are", root, name)
                return config
            raise FileNotFoundError(f"NWC bundle file {bundle} not found (config.json names quant_method 'nwc')")
        self._check_header(bundle)
        tmp = Path(tempfile.mkdtemp(prefix="nwc-load-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(tmp), True)
        try:
            log.info("decoding %s", bundle)
            dense = decompress_model(bundle, tmp / "dense", progress=False)
        except BaseException:
            self._cleanup()
            raise
        self._bundle_dir = Path(root)
        self._shards = sorted(str(f) for f in dense.glob("*.safetensors"))  # decompress writes no other weights
        config.transformers_weights = self.placeholder
        if getattr(config, "dtype", None) is None:  # dtype="auto" would otherwise open the placeholder
            config.dtype = _container_float_dtype(bundle)
        return config

    # -- 2. model skeleton built, weight files resolved

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
        if self._shards is None:
            return model
        expected = os.path.abspath(self._bundle_dir / self.placeholder)
        if (not isinstance(checkpoint_files, list) or len(checkpoint_files) != 1
                or os.path.abspath(checkpoint_files[0]) != expected):
            raise RuntimeError(
                f"codec.hf: transformers {transformers.__version__} resolved the weight files {checkpoint_files!r} "
                f"instead of the placeholder {expected!r}; this way of loading is not supported (subfolder=?, "
                f"another transformers version?): use `nwc decompress` and load the dense directory"
            )
        checkpoint_files[:] = self._shards  # the list transformers loads from next
        return model

    def _check_header(self, bundle: Path) -> None:
        want = self.quantization_config.codec_id
        with ContainerReader(bundle) as reader:  # validates preamble, header and table
            got = reader.header.codec_id
        if want and got and want != got:
            raise ValueError(f"{bundle}: written with codec {got!r}, but config.json names codec {want!r}")

    # -- 3. weights loaded

    def postprocess_model(self, model, **kwargs):
        if self._cleanup is not None:
            self._cleanup()  # mmapped tensors stay valid after the files are unlinked
        self.remove_quantization_config(model)  # a dense model now: save_pretrained writes plain weights
        for cfg in (model.config, getattr(model.config, "get_text_config", lambda **_: None)(decoder=True)):
            if cfg is not None and "transformers_weights" in cfg:
                delattr(cfg, "transformers_weights")
            if cfg is not None and hasattr(cfg, "_is_quantized"):
                cfg._is_quantized = False
        return model

    def is_serializable(self) -> bool:
        return False  # never reached after postprocess_model; the model saves as a dense checkpoint

    @property
    def is_trainable(self) -> bool:
        return True


def _container_float_dtype(bundle: Path):
    with ContainerReader(bundle) as reader:
        for e in reader.entries:
            dt = DTYPES.get(e.dtype)
            if dt is not None and dt.is_floating_point:
                return dt
    return None


def register() -> None:
    """Register quant_method "nwc" with transformers. Idempotent; refuses to replace a foreign registration."""
    for mapping, cls, fn in ((AUTO_QUANTIZATION_CONFIG_MAPPING, NWCConfig, register_quantization_config),
                             (AUTO_QUANTIZER_MAPPING, NWCHfQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is None:
            fn(QUANT_METHOD)(cls)
        elif current.__module__ == __name__ and current.__qualname__ == cls.__qualname__:
            mapping[QUANT_METHOD] = cls  # this module was reloaded
        else:
            raise RuntimeError(f"quant_method {QUANT_METHOD!r} is already registered to {current!r}")


def quantization_config_dict(bundle_dir: Path, codec_id: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` entry for a bundle (codec id read from the container when not given)."""
    bundle = Path(bundle_dir) / BUNDLE_FILE
    if codec_id is None:
        with ContainerReader(bundle) as reader:
            codec_id = reader.header.codec_id
    return NWCConfig(bundle_file=BUNDLE_FILE, codec_id=codec_id, format_version=FORMAT_VERSION).to_dict()


def config_marker(qc: dict[str, Any]) -> str:
    """The exact text `write_quantization_config` inserts before config.json's closing brace; removing it
    gives back the source's config.json byte for byte (what `nwc decompress` should do for a dense copy)."""
    return ',\n  "quantization_config": ' + json.dumps(qc)


def with_quantization_config(text: str, qc: dict[str, Any]) -> str:
    """config.json text with ``quantization_config`` = `qc` added (or replacing an earlier nwc one), every other
    byte kept where the JSON allows; re-serialized with indent 2 only when it does not."""
    cfg = json.loads(text)
    base: str | None = text
    old = cfg.pop("quantization_config", None)
    if old is not None:
        marker = config_marker(old) if isinstance(old, dict) else ""
        base = text.replace(marker, "", 1) if marker and text.count(marker) == 1 else None
    want = {**cfg, "quantization_config": qc}
    if base is not None and cfg:
        body = base.rstrip()
        if body.endswith("}"):
            head = body[:-1]
            core = head.rstrip()
            new = core + config_marker(qc) + head[len(core):] + base[len(body) - 1:]
            try:
                parsed = json.loads(new)
            except json.JSONDecodeError:
                parsed = None
            if parsed == want and list(parsed) == list(want):
                return new
    return json.dumps(want, indent=2, ensure_ascii=False) + "\n"


def dense_config_text(text: str) -> str:
    """The inverse of `with_quantization_config`, for a dense copy of a bundle: config.json text without nwc's
    ``quantization_config`` (the source's bytes when the inserted entry is intact). Other text is returned as is."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError:
        return text
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return text
    del cfg["quantization_config"]
    marker = config_marker(qc)
    if text.count(marker) == 1:
        stripped = text.replace(marker, "")
        try:
            if json.loads(stripped) == cfg:
                return stripped
        except json.JSONDecodeError:
            pass
    return json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"


def strip_quantization_config(model_dir: Path) -> bool:
    """Remove nwc's ``quantization_config`` from ``model_dir/config.json`` (a directory of dense weights is not
    a bundle); atomic. Returns whether the file changed."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    new = dense_config_text(text)
    if new == text:
        return False
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
    return True


def write_quantization_config(bundle_dir: Path, codec_id: str | None = None) -> bool:
    """Add ``"quantization_config": {"quant_method": "nwc", ...}`` to the bundle's config.json, keeping the
    source's text otherwise verbatim (see `config_marker`); atomic, idempotent. Returns False and changes nothing
    when there is no config.json, it is not a transformers config (a JSON object with ``model_type``), or it
    already names another quantization method (the source was a quantized checkpoint whose tensors need that
    method; such a bundle still decompresses with `nwc decompress`)."""
    path = Path(bundle_dir) / "config.json"
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: not adding quantization_config", path)
        return False
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        return False
    existing = cfg.get("quantization_config")
    if existing is not None and (not isinstance(existing, dict) or existing.get("quant_method") != QUANT_METHOD):
        log.warning("%s already has quantization_config %r: not adding nwc's", path, existing)
        return False
    new = with_quantization_config(text, quantization_config_dict(bundle_dir, codec_id))
    if new != text:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
    return True


register()
