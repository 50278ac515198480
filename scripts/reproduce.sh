#!/usr/bin/env bash
# The standard suite: runs every recipe in recipes/ (smollm2-*.toml) with `compress run` into
# runs/NAME (an interrupted suite continues where it stopped: finished stages are kept), scores
# the teacher the same way, collects the reports with `compress report` into reports/smollm2/
# (table.md, table.csv, table.tex, Pareto SVGs) and rewrites the README's table between the
# markers `<!-- reproduce:begin -->` and `<!-- reproduce:end -->` with what this run measured.
#   RECIPES  recipes to run (default: recipes/smollm2-*.toml, in name order)
#   RUNS     run folders' parent (default: runs)
#   REPORT   report folder (default: reports/smollm2)
#   README   1 (default) rewrites the README block; 0 leaves it
#   THREADS  worker threads (default: all cores)
#   COMPRESS_BIN  a compress binary to use instead of building target/release/compress (so a
#            long suite is not disturbed by rebuilds)
# Needs the teacher (scripts/get-smollm2.sh, run here) and the data (COMPRESS_DATA, see
# scripts/data-dir.sh). On the 2-core reference machine the whole suite takes about an hour and a half
# (the distillation and QAT recipes train on 24,576 tokens each).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
need_data wikitext-2-raw/wiki.test.raw wikitext-2/wiki.valid.tokens
bash scripts/get-smollm2.sh >/dev/null
if [[ -n "${COMPRESS_BIN:-}" ]]; then
    BIN="$COMPRESS_BIN"
else
    cargo build --release -p compress >/dev/null 2>&1 || cargo build --release -p compress
    BIN="$ROOT/target/release/compress"
fi
RUNS="${RUNS:-runs}"
REPORT="${REPORT:-reports/smollm2}"
TEACHER="models/SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS_ARG=()
[[ -n "${THREADS:-}" ]] && THREADS_ARG=(--threads "$THREADS")
mapfile -t LIST < <(if [[ -n "${RECIPES:-}" ]]; then printf '%s\n' $RECIPES; else ls recipes/smollm2-*.toml; fi)
mkdir -p "$RUNS"
say() { echo "[$(date +%T)] $*" >&2; }

# The teacher, scored as the recipes score their students (their [eval] tables agree).
if [[ ! -s "$RUNS/teacher/report.json" ]]; then
    say "teacher"
    mkdir -p "$RUNS/teacher"
    "$BIN" eval "$TEACHER" --ppl "$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw" --ctx 512 --chunks 32 \
        "${THREADS_ARG[@]}" --json "$RUNS/teacher/report.json" --force >"$RUNS/teacher/eval.log" 2>&1
fi
DIRS=("$RUNS/teacher/report.json")
for R in "${LIST[@]}"; do
    NAME=$(basename "$R" .toml)
    say "$NAME"
    # A finished run is kept; an interrupted one resumes; one from another recipe is refused.
    if ! "$BIN" run "$R" --out "$RUNS/$NAME" "${THREADS_ARG[@]}" >"$RUNS/$NAME.log" 2>&1; then
        echo "error: $R failed ($RUNS/$NAME.log):" >&2
        tail -5 "$RUNS/$NAME.log" >&2
        exit 1
    fi
    DIRS+=("$RUNS/$NAME")
done
say "report -> $REPORT"
"$BIN" report "${DIRS[@]}" --out "$REPORT" --force >/dev/null

if [[ "${README:-1}" == 1 ]]; then
    python3 - README.md "$REPORT" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'EOF'
import re, sys, datetime
readme, report, commit = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(readme).read()
begin, end = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
if begin not in text or end not in text:
    sys.exit(f"error: {readme} has no {begin} ... {end} block")
table = open(f"{report}/table.md").read().strip()
block = (f"{begin}\n_Measured by `scripts/reproduce.sh` on {datetime.date.today()}, commit {commit}; "
         f"full table and plots in `{report}/`._\n\n{table}\n\n![perplexity against size]({report}/pareto_ppl.svg)\n{end}")
text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
open(readme, "w").write(text)
print(f"{readme}: table rewritten", file=sys.stderr)
EOF
fi
say "done: $REPORT/table.md"
