#!/usr/bin/env bash
# Sets everything up (no server is started), type-checks (tsc --noEmit) and runs the whole test suite.
# Prints a final line `tests: N passed, N failed` (a type error counts as one failure); exits non-zero
# on any failure.
# Tests that need a GPU skip themselves when none is present.
# Extra arguments go to `bun test` (e.g. a file filter: bash scripts/test.sh test/http.test.ts).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! bash scripts/setup.sh; then
  echo "setup failed" >&2
  echo "tests: 0 passed, 1 failed"
  exit 1
fi
export PATH="$HOME/.bun/bin:$PATH"

log=$(mktemp -t reform-tests.XXXXXX)
trap 'rm -f "$log"' EXIT

# Type errors are printed in full; the tests still run so that one report shows everything.
typecheck_failed=0
echo "[test] bunx tsc --noEmit -p ." >&2
if ! bunx tsc --noEmit -p . >&2; then
  typecheck_failed=1
  echo "[test] type check FAILED (errors above)" >&2
fi

# bun test prints its per-test results and summary on stderr.
bun test --timeout "${REFORM_TEST_TIMEOUT_MS:-300000}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

passed=$(sed -n 's/^ *\([0-9][0-9]*\) pass$/\1/p' "$log" | tail -n1)
failed=$(sed -n 's/^ *\([0-9][0-9]*\) fail$/\1/p' "$log" | tail -n1)
errors=$(sed -n 's/^ *\([0-9][0-9]*\) errors\{0,1\}$/\1/p' "$log" | tail -n1)
passed=${passed:-0}
failed=${failed:-0}
errors=${errors:-0}
failed=$((failed + errors + typecheck_failed))
if [[ $rc -ne 0 && $failed -eq 0 ]]; then
  failed=1 # bun test failed without a summary (crash, no test files, ...)
fi
echo
if [[ $typecheck_failed -ne 0 ]]; then echo "type check failed (bunx tsc --noEmit -p .): counted as 1 failure"; fi
echo "tests: ${passed} passed, ${failed} failed"
if [[ $failed -ne 0 || $rc -ne 0 ]]; then exit 1; fi
exit 0
