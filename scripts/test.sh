#!/usr/bin/env bash
# Sets everything up, the test-only native libraries included (no server is started), runs the static checks
# (tsc --noEmit, Biome, clang-format) and the whole test suite. Prints the skipped tests by name, then a final line
# `tests: N passed, N failed, N skipped` (a failed check counts as one failure); exits non-zero on any failure.
# Tests that need what this machine lacks (a GPU, nvcc, libasan, python3 with numpy, x86-64) skip themselves.
# Extra arguments go to `bun test` (e.g. a file filter: bash scripts/test.sh test/http.test.ts).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! bash scripts/setup.sh --with-test-libs; then
  echo "setup failed" >&2
  echo "tests: 0 passed, 1 failed, 0 skipped"
  exit 1
fi
export PATH="$HOME/.bun/bin:$PATH"

log=$(mktemp -t reform-tests.XXXXXX)
trap 'rm -f "$log"' EXIT

# Static checks (types, TS/JSON format + lint, C++/CUDA format): each failing one counts as one failure and is
# printed in full; the tests still run so that one report shows everything.
checks_failed=0
failed_checks=()
for check in "bunx tsc --noEmit -p ." "bash scripts/lint.sh" "bash scripts/format-check.sh"; do
  echo "[test] $check" >&2
  if ! $check >&2; then
    checks_failed=$((checks_failed + 1))
    failed_checks+=("$check")
    echo "[test] FAILED: $check (output above)" >&2
  fi
done

# bun test prints its per-test results and summary on stderr.
bun test --timeout "${REFORM_TEST_TIMEOUT_MS:-300000}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

passed=$(sed -n 's/^ *\([0-9][0-9]*\) pass$/\1/p' "$log" | tail -n1)
failed=$(sed -n 's/^ *\([0-9][0-9]*\) fail$/\1/p' "$log" | tail -n1)
errors=$(sed -n 's/^ *\([0-9][0-9]*\) errors\{0,1\}$/\1/p' "$log" | tail -n1)
skipped=$(sed -n 's/^ *\([0-9][0-9]*\) skip$/\1/p' "$log" | tail -n1)
skipped=${skipped:-0}
passed=${passed:-0}
failed=${failed:-0}
errors=${errors:-0}
failed=$((failed + errors + checks_failed))
if [[ $rc -ne 0 && $failed -eq 0 ]]; then
  failed=1 # bun test failed without a summary (crash, no test files, ...)
fi
echo
for check in "${failed_checks[@]}"; do echo "check failed ($check): counted as 1 failure"; done
if [[ $skipped -ne 0 ]]; then
  echo "skipped (this machine lacks what they need; see each test's skip condition):"
  grep -a '^(skip)' "$log" | sed 's/^/  /'
fi
echo "tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
if [[ $failed -ne 0 || $rc -ne 0 ]]; then exit 1; fi
exit 0
