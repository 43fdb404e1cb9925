#!/usr/bin/env bash
# Installs everything the server needs on a fresh machine (no server is started):
#   1. bun (via `npm install -g bun`, or the official installer when npm is missing)
#   2. JavaScript dependencies (`bun install`)
#   3. the native engine (`scripts/build-native.sh`: CPU library always, CUDA library when nvcc exists)
# Builds only what serving needs: the test-only libraries (the CUDA source on the CPU emulation, its
# AddressSanitizer variant, the fake cuBLAS) take a newcomer's first minute for nothing, so they are built only
# with --with-test-libs (scripts/test.sh passes it).
# Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

test_libs=0
for arg in "$@"; do
  case $arg in
  --with-test-libs) test_libs=1 ;;
  *)
    echo "usage: scripts/setup.sh [--with-test-libs]" >&2
    exit 2
    ;;
  esac
done

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

if [[ $test_libs == 1 ]]; then
  log "building the native engine and the test libraries"
  bash scripts/build-native.sh >&2
else
  log "building the native engine"
  REFORM_SKIP_EMU=1 bash scripts/build-native.sh >&2
fi
log "done"
