#!/usr/bin/env bash
# Quantization-aware training on SmolLM2-135M-Instruct (issue 12): W3 g128 asym QAT from RTN
# and from GPTQ, with frozen and with learned scales, and W4 g128 QAT from GPTQ, beside the
# PTQ students they start from (RTN, GPTQ, AWQ W3; GPTQ W4), all evaluated by `compress eval`
# (wikitext-2 test, ctx 512, CHUNKS chunks). Training: forward KL to the teacher on
# wiki.valid.tokens, TOKENS tokens in optimizer steps of BATCH_TOKENS (the defaults of
# `compress qat` otherwise: seq 512, lr 1e-4 cosine). Every SAVE_EVERY steps a checkpoint is
# kept and evaluated: a checkpoint's model is the fake-quantized (on-grid) student, so the
# points are the perplexity of the quantized model against tokens seen, written to
# OUT/curve.csv and drawn in OUT/curve.svg (step 0 is the PTQ start). Rows go to
# OUT/rows.jsonl; a table is printed and saved to OUT/table.md.
#   OUT (default /tmp/qat-bench), TOKENS (default 98304: about 30 minutes of training on
#   2 cores), BATCH_TOKENS (2048), SAVE_EVERY
#   (12 steps), CALIB_SAMPLES (128) x 512 calibration tokens for GPTQ/AWQ, CHUNKS (32), ROWS
#   (space-separated globs of row keys; default all), RESUME (1 keeps OUT/rows.jsonl and
#   skips rows measured there), KEEP_CHECKPOINTS (default 0: a row's scored checkpoints, ~2 GB
#   each, are deleted), BUILD / COMPRESS_BIN (see lib.sh).
# Rows `qat-gptq-latent-*` start from GPTQ's unrounded weights (`--gptq-latent`), the others
# from the dequantized PTQ model.
# About 40 minutes per QAT row on 2 cores at the defaults (30 of training, 4 evaluations).
set -euo pipefail
OUT="${OUT:-/tmp/qat-bench}"
TOKENS="${TOKENS:-98304}"
BATCH_TOKENS="${BATCH_TOKENS:-2048}"
SAVE_EVERY="${SAVE_EVERY:-12}"
CALIB_SAMPLES="${CALIB_SAMPLES:-128}"
ROWS="${ROWS:-}"
RESUME="${RESUME:-0}"
KEEP_CHECKPOINTS="${KEEP_CHECKPOINTS:-0}"
source "$(dirname "$0")/lib.sh"
ROWS_FILE="$OUT/rows.jsonl"
CURVE="$OUT/curve.csv"
if [[ "$RESUME" != 1 ]]; then
    : >"$ROWS_FILE"
    echo "key,step,tokens,perplexity,stderr" >"$CURVE"
fi
[[ -f "$CURVE" ]] || echo "key,step,tokens,perplexity,stderr" >"$CURVE"
CAL=(--calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len 512)

measured() { python3 -c "import json,sys;sys.exit(0 if any(json.loads(l)['key']==sys.argv[2] for l in open(sys.argv[1]) if l.strip()) else 1)" "$ROWS_FILE" "$1"; }
begin() {
    want "$1" || return 1
    if [[ "$RESUME" == 1 ]] && measured "$1"; then
        echo "[$(date +%T)] $1: measured before (RESUME=1)" >&2
        return 1
    fi
    echo "[$(date +%T)] $1" >&2
}
# timed LOG CMD...: runs CMD, its "wall user sys maxrss_kib" in $OUT/time.
timed() {
    local log=$1
    shift
    /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$@" >"$log" 2>&1
}
# evaluate MODEL -> "ppl se" (also writes $OUT/eval.json).
evaluate() {
    "$BIN" eval "$1" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force --json "$OUT/eval.json" >/dev/null 2>"$OUT/eval.err"
    python3 -c "import json;p=json.load(open('$OUT/eval.json'))['perplexity'];print(p['value'],p['stderr'])"
}
# record KEY KIND BITS START LABEL PPL SE [TRAIN_TOKENS]: a row, with the last `timed` command's cost.
record() {
    python3 - "$@" "$OUT/time" >>"$ROWS_FILE" <<'EOF'
import json, sys
key, kind, bits, start, label, ppl, se = sys.argv[1:8]
tokens = int(sys.argv[8]) if len(sys.argv) > 9 else 0
wall, user, sys_, rss = open(sys.argv[-1]).read().split()[-4:]
print(json.dumps({"key": key, "kind": kind, "bits": int(bits), "start": start, "label": label,
                  "ppl": float(ppl), "ppl_se": float(se), "train_tokens": tokens,
                  "wall_s": float(wall), "cpu_s": float(user) + float(sys_),
                  "rss_mib": int(rss) / 1024}))
EOF
}
# ptq_ppl KEY: the perplexity of a measured PTQ row (the curve's step 0).
ptq_ppl() { python3 -c "import json,sys;[print(r['ppl'],r['ppl_se']) for r in map(json.loads,open(sys.argv[1])) if r['key']==sys.argv[2]]" "$ROWS_FILE" "$1" | tail -1; }

# PTQ starting points and references.
for spec in rtn:3 gptq:3 awq:3 gptq:4; do
    M=${spec%%:*} B=${spec#*:}
    KEY="ptq-$M-w$B"
    begin "$KEY" || continue
    C=()
    [[ "$M" != rtn ]] && C=("${CAL[@]}")
    timed "$OUT/$KEY.log" "$BIN" quant "$MODEL" --method "$M" --bits "$B" --group 128 "${C[@]}" \
        --out "$OUT/$KEY" --force
    read -r P SE < <(evaluate "$OUT/$KEY")
    record "$KEY" ptq "$B" - "$M W$B g128 (PTQ)" "$P" "$SE"
done

# QAT rows.
for spec in rtn:3:frozen rtn:3:learned gptq:3:frozen gptq:3:learned gptq:4:frozen \
    gptq-latent:3:frozen gptq-latent:3:learned gptq-latent:4:frozen; do
    IFS=: read -r V B S <<<"$spec"
    KEY="qat-$V-w$B-$S"
    begin "$KEY" || continue
    M=${V%-latent}
    C=()
    [[ "$M" != rtn ]] && C=("${CAL[@]}")
    [[ "$V" == *-latent ]] && C+=(--gptq-latent)
    L=()
    [[ "$S" == learned ]] && L=(--learn-scales)
    D="$OUT/$KEY"
    rm -rf "$D" "$D.checkpoints"
    timed "$OUT/$KEY.log" "$BIN" qat --teacher "$MODEL" --method "$M" --bits "$B" --group 128 \
        "${C[@]}" "${L[@]}" --data "$CALIB" --max-tokens "$TOKENS" --batch-tokens "$BATCH_TOKENS" \
        --save-every "$SAVE_EVERY" --save-limit 0 --keep-checkpoints --out "$D" --force
    cp "$OUT/time" "$OUT/$KEY.time"
    read -r P SE < <(evaluate "$D")
    cp "$OUT/$KEY.time" "$OUT/time"
    record "$KEY" qat "$B" "$V" "QAT from $V W$B g128, $S scales" "$P" "$SE" "$TOKENS"
    # The curve: the PTQ start at step 0, every kept checkpoint, the final model.
    read -r P0 SE0 < <(ptq_ppl "ptq-$M-w$B") || true
    [[ -n "${P0:-}" ]] && echo "$KEY,0,0,$P0,$SE0" >>"$CURVE"
    for ck in $(ls -d "$D.checkpoints"/checkpoint-* 2>/dev/null | sort -V); do
        step=${ck##*-}
        read -r CP CSE < <(evaluate "$ck")
        echo "$KEY,$step,$((step * BATCH_TOKENS)),$CP,$CSE" >>"$CURVE"
    done
    STEPS=$(python3 -c "import json;print(json.load(open('$D/distill_report.json'))['steps'])")
    grep -q "^$KEY,$STEPS," "$CURVE" || echo "$KEY,$STEPS,$TOKENS,$P,$SE" >>"$CURVE"
    # Scored checkpoints hold the f32 student plus AdamW state (~2 GB each here): drop them.
    [[ "$KEEP_CHECKPOINTS" == 1 ]] || rm -rf "$D.checkpoints" "$D.ptq-start"
done

python3 "$ROOT/scripts/bench/qat_plot.py" "$ROWS_FILE" "$CURVE" "$OUT/curve.svg" | tee "$OUT/table.md"
echo "curve: $CURVE, $OUT/curve.svg" >&2
