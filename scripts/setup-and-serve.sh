#!/usr/bin/env bash
# One command from a fresh checkout to a running server:
#   ./scripts/setup-and-serve.sh [--port 8080] [--model /path/to/hf-model] [...serve options]
# (without --model: the embedded default model, models/reform-tiny)
# Runs scripts/setup.sh (bun, dependencies, native build), then `bun run serve` with the arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.bun/bin:$PATH"
exec bun run src/cli/serve.ts "$@"
