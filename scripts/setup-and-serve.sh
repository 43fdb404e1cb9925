#!/usr/bin/env bash
# One command from a fresh checkout to a running server:
#   ./scripts/setup-and-serve.sh [--port 8080] [--model /path/to/hf-model] [...serve options]
# (without --model: the embedded default model, models/reform-tiny)
# Runs scripts/setup.sh (bun, dependencies, native build), then `bun run serve` with the arguments.
# With nvcc but no GPU to serve on (no `nvidia-smi -L` device), the CUDA library is not built: the server could not use
# it, and nvcc takes a minute (REFORM_REQUIRE_CUDA=1 builds it anyway; scripts/test.sh always builds what exists).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${REFORM_SKIP_CUDA:-} && ${REFORM_REQUIRE_CUDA:-0} != 1 ]] && command -v nvcc >/dev/null 2>&1 &&
  ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  echo "[setup] nvcc found but no GPU to serve on: the CUDA library is not built (REFORM_REQUIRE_CUDA=1 builds it)" >&2
  export REFORM_SKIP_CUDA=1
fi
bash scripts/setup.sh
export PATH="$HOME/.bun/bin:$PATH"
exec bun run src/cli/serve.ts "$@"
