"""How a LoRA step computes on the machine it runs on: in which precision (bf16 autocast where the hardware does bf16
natively) and whether it keeps its activations (where they fit in memory). `options` below is a `LoraOptions`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# Memory that keeping activations costs over recomputing them, in bytes per token x hidden unit x layer: measured on
# SmolLM2-135M (bench/lora_memory.py, BENCHMARKS.md 2026-12-06: 8 rows of ~490 tokens took +3.8 GB in bfloat16 and
# +6.2 GB in float32), rounded up.
KEPT_BYTES = {"bfloat16": 64, "float32": 96}
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # (limit, usage): v2, then v1
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return frozenset()
    return frozenset(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def native_bf16(device: Any) -> bool:
    """Whether `device` does bf16 matmuls natively: a CUDA GPU that supports bf16, or a CPU with AMX or AVX512-BF16.
    Elsewhere bf16 is emulated and slower than float32 (vLLM's bf16 ran ~4x slower on an AVX2-only CPU)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return kind == "cpu" and bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def resolved_precision(precision: str, device: Any) -> str:
    """A `lora.precision` setting with auto decided for `device`."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bf16(device) else "float32"


def forward_precision(precision: str, device: Any) -> Any:
    """The context a forward pass runs in: bf16 autocast, or nothing for float32."""
    import contextlib

    import torch

    if precision == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_memory() -> int:
    """Bytes this process may still allocate: the machine's available memory, or less under a container's cgroup
    limit (v2 or v1), which psutil does not see and which kills a worker that crosses it."""
    import psutil

    free = psutil.virtual_memory().available
    for limit, used in CGROUP_MEMORY:
        try:
            cap = Path(limit).read_text().strip()
            if cap.isdigit():  # "max" (v2) means no limit; v1 shows a huge number instead, harmless under min()
                free = min(free, int(cap) - int(Path(used).read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(free, 0)


def keeps_activations(model_config: Any, options: Any, precision: str, available: int | None = None) -> bool:
    """Whether a step keeps its activations (no checkpointing): `options.activation_checkpointing` when set; for
    auto, when a batch of `max_length` rows' activations (`KEPT_BYTES`) fit in half of `available` bytes (default: the
    machine's available memory), leaving the rest to the model, the data and what else runs there."""
    if options.activation_checkpointing != "auto":
        return not options.activation_checkpointing
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden, layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    if not hidden or not layers:  # an architecture we cannot size: recompute, the safe side
        return False
    if available is None:
        available = available_memory()
    need = options.batch_size * options.max_length * hidden * layers * KEPT_BYTES.get(precision, KEPT_BYTES["float32"])
    return need <= available / 2
