#!/usr/bin/env bash
# Every figure the README and the model card quote about the embedded model, measured again on the weights in
# models/reform-tiny (run it after shipping new weights; each figure must come from the same weights).
#
#   bash scripts/measure-model.sh [OUT_DIR (default bench-out/measure-<date>)] [--quick]
#
# Writes one log per step to OUT_DIR and prints where. About 20 minutes on 2 CPU cores (--quick: the held-out
# evaluation and the CI quality test only). Steps:
#   1 evaluate.py      held-out in-window recall per task at 256 and 435 tokens, n = 40 (the model card's table)
#   2 quality test     test/quality.test.ts: REFORM answers 16K-token needles, streaming does not
#   3 window sweep     bench/window-sweep.ts: the default smoothing window, gathered needles at 16K / 128K / 1M
#   4 ruler            bench/ruler.ts at 2K / 16K / 128K (6 samples, 20 for full), then 1M (4 samples, reform)
#   5 walk-through     a 3 MiB document with 3 facts, uploaded in pieces by `bun run ask`, three questions
#   6 inline           bench/inline.ts: a ~200K-token document inside one OpenAI chat message, two questions
#   7 web page         test/webui.test.ts, its screenshot copied to docs/webui.png
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.bun/bin:$PATH"
QUICK=0
OUT=""
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    *) OUT="$a" ;;
  esac
done
OUT="${OUT:-bench-out/measure-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
PY=/usr/bin/python3
step() { echo "[measure] $1 -> $OUT/$2" >&2; }

step "held-out evaluation (n=40)" evaluate.txt
$PY training/evaluate.py --model models/reform-tiny --n 40 --lengths 256,435 >"$OUT/evaluate.txt" 2>&1
step "quality test" quality.txt
bun test test/quality.test.ts >"$OUT/quality.txt" 2>&1 || echo "[measure] quality test FAILED (see $OUT/quality.txt)" >&2
[ "$QUICK" = 1 ] && { cat "$OUT/evaluate.txt"; exit 0; }

step "smoothing window sweep" window-sweep.txt
bun bench/window-sweep.ts --lengths 16k,128k,1m --samples 6 >"$OUT/window-sweep.txt" 2>&1
step "ruler 2K-128K" ruler.txt
bun bench/ruler.ts --lengths 2k,16k,128k --samples 6 --full-samples 20 --json "$OUT/ruler.json" >"$OUT/ruler.txt" 2>&1
step "ruler 1M" ruler-1m.txt
bun bench/ruler.ts --lengths 1m --samples 4 --methods reform --json "$OUT/ruler-1m.json" >"$OUT/ruler-1m.txt" 2>&1

step "walk-through (3 MiB, 3 facts)" walkthrough.txt
PORT=8099
bun run serve --port $PORT >"$OUT/walkthrough-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
DOC="$OUT/doc.txt"
bun bench/make-document.ts --mb 3 --out "$DOC" >"$OUT/walkthrough-facts.tsv"
{
  cat "$OUT/walkthrough-facts.tsv"
  ctx=""
  while IFS=$'\t' read -r q want; do
    if [ -z "$ctx" ]; then
      bun run ask "$DOC" "$q" --server "http://127.0.0.1:$PORT" --keep 2>"$OUT/ask.err" || true
      cat "$OUT/ask.err"
      ctx=$(grep -o 'ctx_[0-9a-f]*' "$OUT/ask.err" | head -1)
    else
      bun run ask --context "$ctx" "$q" --server "http://127.0.0.1:$PORT" --keep 2>>"$OUT/ask.err" || true
    fi
    echo "(expected: $want)"
  done <"$OUT/walkthrough-facts.tsv"
  [ -n "$ctx" ] && curl -sf -X DELETE "http://127.0.0.1:$PORT/v1/contexts/$ctx" >/dev/null && echo "deleted $ctx"
} >"$OUT/walkthrough.txt" 2>&1
kill $SERVER 2>/dev/null || true
rm -f "$DOC"

step "inline document" inline.txt
bun bench/inline.ts >"$OUT/inline.txt" 2>&1
step "web page" webui.txt
bun test test/webui.test.ts >"$OUT/webui.txt" 2>&1 && cp test-output/webui.png docs/webui.png
echo "[measure] done: $OUT" >&2
