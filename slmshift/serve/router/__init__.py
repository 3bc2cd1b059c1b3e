"""The router: per call, which tier (and adapter) serves it. Policies register by kind; `build_policy` makes one.

Options (validated config) live in `slmshift.platform.policies`; behaviour lives here, one module per family:
`fixed` (llm, slm, call_kind, random), `scored` (threshold, learned, adapters: policies that place a call in an S3
task cluster), `cascade`; `placement` places a call in its cluster for every policy given a `registry`.
"""

from slmshift.serve.router.base import RouterPolicy, build_policy, register_policy
from slmshift.serve.router import cascade, fixed, scored  # noqa: F401  fill the registry

__all__ = ["RouterPolicy", "build_policy", "register_policy"]
