#!/usr/bin/env bash
# One command from a fresh checkout to a running server:
#   ./scripts/setup-and-serve.sh --model /path/to/hf-model [--port 8080] [...serve options]
# Runs scripts/setup.sh (bun, dependencies, native build), then `bun run serve` with the arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.bun/bin:$PATH"
exec bun run src/cli/serve.ts "$@"
