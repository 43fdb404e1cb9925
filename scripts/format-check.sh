#!/usr/bin/env bash
# Checks that the C++ / CUDA sources (cuda/, test/native) are formatted as .clang-format says, without changing
# them: exits non-zero and prints each offending place. `--fix` formats them in place instead.
# clang-format is the binary the npm devDependency `clang-format` ships (called directly: its node wrapper adds a
# stack trace to every failure), so CI needs no system package; REFORM_CLANG_FORMAT names another binary.
set -euo pipefail
cd "$(dirname "$0")/.."

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) PLATFORM=linux_x64 ;;
  Darwin-*) PLATFORM=darwin_x64 ;;
  *) PLATFORM=none ;;
esac
CF=${REFORM_CLANG_FORMAT:-node_modules/clang-format/bin/$PLATFORM/clang-format}
if [[ ! -x $CF ]]; then
  echo "[format] no clang-format at $CF (run \`bun install\`; the npm package has no $(uname -s)-$(uname -m) binary:" \
    "set REFORM_CLANG_FORMAT)" >&2
  exit 1
fi
mapfile -t FILES < <(git ls-files 'cuda/*.h' 'cuda/*.cpp' 'cuda/*.cu' 'cuda/*.cuh' 'test/native/*.h' 'test/native/*.cpp')
if [[ ${1:-} == --fix ]]; then
  "$CF" --style=file -i "${FILES[@]}"
  echo "[format] formatted ${#FILES[@]} files"
else
  "$CF" --style=file --dry-run -Werror "${FILES[@]}"
  echo "[format] ${#FILES[@]} C++/CUDA files formatted as .clang-format says"
fi
