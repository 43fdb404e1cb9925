#!/usr/bin/env bash
# Formatting and lint check of the TypeScript/JSON sources (Biome, configured in biome.jsonc); writes nothing.
# Fix formatting with `bunx biome format --write .`, lint fixes with `bunx biome lint --write .`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.bun/bin:$PATH"
exec bunx biome ci . "$@"
