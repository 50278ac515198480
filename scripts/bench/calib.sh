#!/usr/bin/env bash
# Calibration sources on SmolLM2-135M-Instruct, GPTQ W4 g128 asym (128 x LEN calibration tokens,
# seed 0) each time:
#   wiki     wikitext-2 valid (the usual calibration text)
#   teacher  data-free: 128 sequences of LEN tokens the teacher samples from BOS
#            (`compress generate --calib 128 --calib-len LEN --seed 0`; T 1.0, top-p 0.95)
#   pubmed   domain text: PubMedQA abstracts (contexts and conclusion) of the 500 PMIDs of
#            ori_pqal.json that are not test items
# and RTN W4 g128 (no calibration) as the floor. Every model is scored on wikitext-2 test
# (ctx 512, CHUNKS chunks) and on the held-out PubMedQA abstracts (the 500 test PMIDs, a file
# this script writes; ctx 512, PUBMED_CHUNKS chunks).
# Writes OUT/summary.md and OUT/rows.tsv (kept under RESUME=1: finished rows are not redone).
#   OUT (default /tmp/calib-bench), LEN (512; 256 makes the generation about 3x faster), CHUNKS (32),
#   PUBMED_CHUNKS (32), RESUME (0), BUILD, COMPRESS_BIN.
set -euo pipefail
OUT="${OUT:-/tmp/calib-bench}"
LEN="${LEN:-512}"
PUBMED_CHUNKS="${PUBMED_CHUNKS:-32}"
RESUME="${RESUME:-0}"
source "$(dirname "$0")/lib.sh"
need_data pubmedqa/ori_pqal.json pubmedqa/test_ground_truth.json
ROWS_FILE="$OUT/rows.tsv"
[[ "$RESUME" == 1 ]] || rm -f "$ROWS_FILE"
touch "$ROWS_FILE"
say() { echo "[$(date +%T)] $*" >&2; }

# The PubMedQA texts: calibration (non-test PMIDs) and held-out evaluation (test PMIDs).
python3 - "$COMPRESS_DATA/pubmedqa" "$OUT" <<'EOF'
import json, sys, os
src, out = sys.argv[1], sys.argv[2]
items = json.load(open(os.path.join(src, "ori_pqal.json")))
test = set(json.load(open(os.path.join(src, "test_ground_truth.json"))))
def abstract(v):
    return "\n".join(v["CONTEXTS"] + [v["LONG_ANSWER"]])
for name, keep in (("pubmed-calib.txt", lambda k: k not in test), ("pubmed-heldout.txt", lambda k: k in test)):
    docs = [abstract(v) for k, v in sorted(items.items()) if keep(k)]
    with open(os.path.join(out, name), "w") as f:
        f.write("\n\n".join(docs) + "\n")
    print(f"{name}: {len(docs)} abstracts", file=sys.stderr)
EOF
HELDOUT="$OUT/pubmed-heldout.txt"

# timed LOG CMD...: runs CMD under /usr/bin/time into OUT/time ("wall user sys maxrss_kib").
timed() {
    local log=$1
    shift
    if ! /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$@" >"$log" 2>&1; then
        echo "error: failed ($log):" >&2
        tail -5 "$log" >&2
        exit 1
    fi
}
# score MODEL TEXT CHUNKS -> "ppl se"
score() {
    "$BIN" eval "$1" --ppl "$2" --ctx 512 --chunks "$3" --force --json "$OUT/eval.json" >/dev/null 2>"$OUT/eval.err" ||
        { echo "error: eval of $1 failed:" >&2; tail -3 "$OUT/eval.err" >&2; exit 1; }
    python3 -c "import json;p=json.load(open('$OUT/eval.json'))['perplexity'];print(p['value'],p['stderr'])"
}
done_row() { [[ "$RESUME" == 1 ]] && grep -q "^$1	" "$ROWS_FILE"; }
# row KEY LABEL MODEL: scores MODEL on both texts and appends a row with the last timed cost.
row() {
    local w p
    w=$(score "$3" "$TEXT" "$CHUNKS")
    p=$(score "$3" "$HELDOUT" "$PUBMED_CHUNKS")
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$w" "$p" "$(cat "$OUT/time" 2>/dev/null || echo '- - - -')" >>"$ROWS_FILE"
}

if ! done_row teacher; then
    say "teacher"
    echo "- - - -" >"$OUT/time"
    row teacher "teacher (Q4_1 GGUF, dequantized)" "$MODEL"
fi
if ! done_row rtn; then
    say "rtn"
    timed "$OUT/rtn.log" "$BIN" quant "$MODEL" --method rtn --bits 4 --group 128 --format dense --out "$OUT/rtn" --force
    row rtn "RTN W4 g128 (no calibration)" "$OUT/rtn"
fi
GEN="$OUT/teacher-calib.json"
if [[ ! -s "$GEN" || "$RESUME" != 1 ]]; then
    say "generate: 128 x $LEN tokens from the teacher"
    timed "$OUT/generate.log" "$BIN" generate "$MODEL" --calib 128 --calib-len "$LEN" --seed 0 --out "$GEN" --force
    cp "$OUT/time" "$OUT/generate.time"
fi
for SRC in wiki teacher pubmed; do
    done_row "gptq-$SRC" && continue
    case "$SRC" in
    wiki) C="$CALIB" ;;
    teacher) C="$GEN" ;;
    pubmed) C="$OUT/pubmed-calib.txt" ;;
    esac
    say "gptq, calibration $SRC"
    timed "$OUT/gptq-$SRC.log" "$BIN" quant "$MODEL" --method gptq --bits 4 --group 128 \
        --calib "$C" --calib-samples 128 --calib-len "$LEN" --seed 0 --format dense --out "$OUT/gptq-$SRC" --force
    row "gptq-$SRC" "GPTQ W4 g128, calibrated on $SRC" "$OUT/gptq-$SRC"
done

python3 - "$ROWS_FILE" "$OUT/summary.md" "$OUT/generate.time" "$CHUNKS" "$PUBMED_CHUNKS" "$LEN" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
gen = open(sys.argv[3]).read().split() if __import__("os").path.exists(sys.argv[3]) else None
out = [f"GPTQ W4 g128 asym on SmolLM2-135M-Instruct by calibration source (128 x {sys.argv[6]} tokens, seed 0); "
       f"perplexity on wikitext-2 test (ctx 512, {sys.argv[4]} chunks) and on the held-out PubMedQA "
       f"abstracts of the 500 test PMIDs (ctx 512, {sys.argv[5]} chunks).", ""]
if gen:
    out.append(f"Teacher-generated calibration: 128 x {sys.argv[6]} tokens in {float(gen[0]):.0f} s wall, "
               f"{float(gen[1]) + float(gen[2]):.0f} CPU s.")
    out.append("")
out.append("| model | wiki ppl | PubMedQA held-out ppl | quant wall s | quant CPU s | peak RSS MiB |")
out.append("|---|---|---|---|---|---|")
for key, label, w, p, t in rows:
    wv, ws = w.split(); pv, ps = p.split(); t = t.split()
    cost = ["-", "-", "-"] if t[0] == "-" else [f"{float(t[0]):.0f}", f"{float(t[1]) + float(t[2]):.0f}", f"{int(t[3]) / 1024:.0f}"]
    out.append(f"| {label} | {float(wv):.3f} ± {float(ws):.3f} | {float(pv):.3f} ± {float(ps):.3f} | " + " | ".join(cost) + " |")
by = {r[0]: float(r[2].split()[0]) for r in rows}
if "gptq-wiki" in by and "gptq-teacher" in by:
    out += ["", f"Data-free against wiki calibration: {100 * (by['gptq-teacher'] / by['gptq-wiki'] - 1):+.2f}% wiki perplexity."]
pub = {r[0]: float(r[3].split()[0]) for r in rows}
if "gptq-wiki" in pub and "gptq-pubmed" in pub:
    out += [f"PubMedQA calibration against wiki calibration on held-out PubMedQA: {100 * (pub['gptq-pubmed'] / pub['gptq-wiki'] - 1):+.2f}%."]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
