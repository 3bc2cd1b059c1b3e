"""The pieces of the installed ``bfcl_eval`` that slmshift uses, imported without vendor SDKs or tree-sitter.

``bfcl_eval`` is installed without its dependencies: its model registry (``constants.model_config``) imports
every vendor SDK, and its Java/JS parsers need tree-sitter; neither is used for Python-syntax grading, so both
are stubbed before the first import.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
import types
from typing import Any

__all__ = ["bfcl_api"]

_MODEL_NAME = "slmshift"  # only used by BFCL to look up underscore_to_dot (False for prompting)


class _AnyModelConfig(dict):
    """Stub MODEL_CONFIG_MAPPING: every model is a prompting model keeping dotted names."""

    def __missing__(self, key: str) -> Any:
        return types.SimpleNamespace(underscore_to_dot=False, is_fc_model=False)


def round_robin_sample(categories: list[str], tasks_of: Any, salt: str, seed: int, n: int | None) -> list:
    """A deterministic sample spread over the categories: each category's tasks shuffled by (salt, seed, category),
    then taken one per category in turn, so any prefix mixes the categories evenly."""
    import random

    pools = []
    for cat in dict.fromkeys(categories):  # de-duplicate, keep order
        pool = list(tasks_of(cat))
        random.Random(f"{salt}:{seed}:{cat}").shuffle(pool)
        pools.append(pool)
    out: list = []
    for i in range(max(len(p) for p in pools)):
        out.extend(p[i] for p in pools if i < len(p))
    return out if n is None else out[:n]


def read_data_jsonl(*parts: str) -> list[dict]:
    """One JSONL data file shipped in bfcl_eval's `data/`; a missing package is an exit-2 error with the fix."""
    import json

    from slmshift.platform.assets import require_data_package

    path = require_data_package("bfcl_eval").joinpath("data", *parts)
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@functools.lru_cache(maxsize=None)
def bfcl_api() -> types.SimpleNamespace:
    """Import the pieces of bfcl_eval we use, without vendor SDKs or tree-sitter."""
    from slmshift.platform.assets import require_data_package

    require_data_package("bfcl_eval")  # before any import: a missing package names its fix
    # bfcl_eval creates result/score/lock folders under this root at import time (default:
    # site-packages); one fixed scratch folder, so Ray workers don't each leave a new one.
    os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(tempfile.gettempdir(), "slmshift_bfcl_root"))
    if "bfcl_eval.constants.model_config" not in sys.modules:
        stub = types.ModuleType("bfcl_eval.constants.model_config")
        stub.MODEL_CONFIG_MAPPING = _AnyModelConfig()
        sys.modules[stub.__name__] = stub
    if importlib.util.find_spec("tree_sitter") is None:
        for mod, fn in (("java_parser", "parse_java_function_call"), ("js_parser", "parse_javascript_function_call")):
            name = f"bfcl_eval.model_handler.parser.{mod}"
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                setattr(sys.modules[name], fn, _unsupported)
    from bfcl_eval.constants.default_prompts import DEFAULT_SYSTEM_PROMPT_FORMAT
    from bfcl_eval.constants.enums import Language, ReturnFormat
    from bfcl_eval.eval_checker.ast_eval import ast_checker as checker_mod
    from bfcl_eval.model_handler import utils as handler_utils
    from bfcl_eval import utils as bfcl_utils

    mapping, model_name = checker_mod.MODEL_CONFIG_MAPPING, _MODEL_NAME
    if not isinstance(mapping, _AnyModelConfig):  # the real registry was imported elsewhere
        keep_dots = (k for k, c in mapping.items() if "_" not in k and not getattr(c, "underscore_to_dot", 1))
        model_name = next(keep_dots, _MODEL_NAME)
    return types.SimpleNamespace(
        ast_checker=checker_mod.ast_checker,
        decode=handler_utils.default_decode_ast_prompting,
        system_prompt_pre_processing=handler_utils.system_prompt_pre_processing_chat_model,
        formulate_system_prompt=handler_utils.formulate_system_prompt,
        language_hint=bfcl_utils._func_doc_language_specific_pre_processing,
        is_call_format=bfcl_utils.is_function_calling_format_output,
        is_empty_output=bfcl_utils.is_empty_output,
        DEFAULT_SYSTEM_PROMPT_FORMAT=DEFAULT_SYSTEM_PROMPT_FORMAT,
        Language=Language,
        ReturnFormat=ReturnFormat,
        model_name=model_name,
    )


def _unsupported(*_: Any, **__: Any) -> Any:
    raise NotImplementedError("Java/JavaScript decoding needs tree-sitter")
