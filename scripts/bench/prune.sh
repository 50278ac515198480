#!/usr/bin/env bash
# Pruning table on SmolLM2-135M-Instruct: our `compress prune` (magnitude, Wanda, SparseGPT
# at 50% unstructured, 2:4 and 4:8, Wanda and SparseGPT also in true-sequential order and
# with --refit, SparseGPT N:M also with the paper's --nm-select saliency, SparseGPT also
# without its default refit (--refit 0), Wanda 50% and
# SparseGPT 4:8 also with f32 output (the peer's precision); Wanda 50% with
# OWL; structured channels, heads and layers; 2:4 SparseGPT + GPTQ W4 g128 and 50% Wanda +
# RTN GGUF Q4_K_M), and beside them llm-compressor's SparseGPT and Wanda (PyPI `llmcompressor`, in a throwaway venv) on exactly
# the same calibration tokens. For every row: parameters, linear sparsity (exact zeros of the
# decoder linears, measured on the written safetensors), bytes on disk dense and sparse,
# perplexity on wikitext-2 test (ctx 512, CHUNKS chunks) ± stderr, ratio to the teacher,
# ours / peer perplexity, and the whole run's wall and CPU (user+sys) seconds and peak RSS.
# Prints one markdown table (also saved to OUT/table.md).
#   CALIB_SAMPLES (default 128) x CALIB_LEN (512) calibration tokens from wiki.valid.tokens,
#   seed 0; our first calibrated run dumps them to OUT/calib.json for the peer.
#   CHUNKS (default 32), OUT (default /tmp/prune-bench), PEERS (default 1; 0 skips the peer
#   rows), ROWS (space-separated globs of row keys to run, e.g. "wanda-* peer-wanda-*";
#   default all; the teacher row always runs), NICE (default 0: niceness of the runs),
#   BUILD (default 1; 0 skips `cargo build`, see lib.sh), RESUME (default 0; 1 keeps
#   OUT/rows.jsonl and OUT/calib.json and skips every row already measured there, so a run
#   cut short, or one split over several sittings, goes on where it stopped; ROWS_FROM=FILE
#   starts an empty OUT from rows saved elsewhere, e.g. scripts/bench/results/prune-128.jsonl),
#   REFIT (default 30: the --refit steps of the refit rows).
# Takes hours at the defaults (SparseGPT and the peer's f32 runs dominate).
set -euo pipefail
CALIB_SAMPLES="${CALIB_SAMPLES:-128}"
CALIB_LEN="${CALIB_LEN:-512}"
OUT="${OUT:-/tmp/prune-bench}"
PEERS="${PEERS:-1}"
ROWS="${ROWS:-}"
NICE="${NICE:-0}"
RESUME="${RESUME:-0}"
source "$(dirname "$0")/lib.sh"
HERE="$ROOT/scripts/bench"
ROWS_FILE="$OUT/rows.jsonl"
CALIB_IDS="$OUT/calib.json"
mkdir -p "$OUT"
if [[ "$RESUME" != 1 ]]; then
    : >"$ROWS_FILE"
    rm -f "$CALIB_IDS"
elif [[ -n "${ROWS_FROM:-}" && ! -s "$ROWS_FILE" ]]; then
    # Continue from rows kept elsewhere (e.g. committed under scripts/bench/results/).
    cp "$ROWS_FROM" "$ROWS_FILE"
fi
CAL=(--calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len "$CALIB_LEN")

# begin KEY TOOL METHOD PATTERN PAIR: starts a row (false when ROWS leaves it out). The row's
# folder is $D; its step times go to $TIMES; PAIR links one of our rows to its peer row.
begin() {
    want "$1" || return 1
    if [[ "$RESUME" == 1 ]] && python3 "$HERE/prune_rows.py" has "$ROWS_FILE" "$1"; then
        echo "[$(date +%T)] $1: measured before (RESUME=1)" >&2
        return 1
    fi
    KEY=$1 TOOL=$2 METH=$3 PAT=$4 PAIR=$5
    D="$OUT/$KEY"
    TIMES="$OUT/$KEY.times"
    FAIL=
    : >"$TIMES"
    echo "[$(date +%T)] $KEY" >&2
}

# step LOG CMD...: runs CMD under /usr/bin/time (wall, user, sys, peak RSS KiB appended to
# $TIMES); on failure sets FAIL to the last line CMD printed and returns 1.
step() {
    local log=$1
    shift
    if nice -n "$NICE" /usr/bin/time -f "%e %U %S %M" -o "$TIMES.step" "$@" >"$log" 2>&1; then
        tail -1 "$TIMES.step" >>"$TIMES"
        return 0
    fi
    FAIL=$(grep -v -e '^Command exited' -e '^[[:space:]]*$' "$log" | tail -1 || true)
    FAIL="${FAIL:-$(head -1 "$TIMES.step" | sed 's/^Command exited with non-zero/exit/')}"
    return 1
}

# finish TARGET [key=value...]: evaluates TARGET (unless a step failed) and records the row.
finish() {
    local target=$1
    shift
    if [[ -z "$FAIL" ]] && ! nice -n "$NICE" "$BIN" eval "$target" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" \
        --force --json "$OUT/$KEY.eval.json" >"$OUT/$KEY.eval.log" 2>&1; then
        FAIL="eval: $(tail -1 "$OUT/$KEY.eval.log")"
    fi
    if [[ -n "$FAIL" ]]; then
        echo "  $KEY: $FAIL" >&2
        python3 "$HERE/prune_rows.py" record "$KEY" tool="$TOOL" method="$METH" pattern="$PAT" \
            pair="$PAIR" note="${NOTE:-failed}: ${FAIL//|//}" >>"$ROWS_FILE"
    else
        python3 "$HERE/prune_rows.py" record "$KEY" tool="$TOOL" method="$METH" pattern="$PAT" \
            pair="$PAIR" dir="$D" eval="$OUT/$KEY.eval.json" times="$TIMES" "$@" >>"$ROWS_FILE"
    fi
    NOTE=
}

# calib_args: the calibration flags, with --dump-calib on the first calibrated run.
calib_args() {
    CALA=("${CAL[@]}")
    [[ -f "$CALIB_IDS" ]] || CALA+=(--dump-calib "$CALIB_IDS")
}

# pattern_of SPEC (50%, 2:4 or 4:8): PATL (label), TAG (in row keys), FL (prune flags).
SPECS=(50% 2:4 4:8)
pattern_of() {
    case "$1" in
    50%) PATL=50% TAG=50 FL=(--sparsity 0.5) ;;
    *) PATL=$1 TAG=${1/:/-} FL=(--pattern "$1") ;;
    esac
}

# Teacher.
KEY=teacher TOOL=- METH=- PAT=- PAIR= D="" TIMES="" FAIL= NOTE=
if ! [[ "$RESUME" == 1 ]] || ! python3 "$HERE/prune_rows.py" has "$ROWS_FILE" teacher; then
    finish "$MODEL"
fi

# Ours: unstructured and N:M.
for spec in "${SPECS[@]}"; do
    pattern_of "$spec"
    for M in magnitude wanda sparsegpt; do
        PAIRV=""
        [[ "$M" != magnitude ]] && PAIRV="$M $PATL"
        begin "$M-$TAG" ours "$M" "$PATL" "$PAIRV" || continue
        CALA=()
        [[ "$M" != magnitude ]] && calib_args
        step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method "$M" "${FL[@]}" "${CALA[@]}" \
            --format dense,sparse --out "$D" --force || true
        finish "$D"
    done
done
# nm_select_of METHOD SPEC SELECT: NMS (flags) and NML (label) for SparseGPT's N:M group
# selection (the -seq and -refit rows were measured with the paper's saliency rule, before
# exact selection became the default).
nm_select_of() {
    NMS=() NML=""
    if [[ "$1" == sparsegpt && "$2" != 50% ]]; then
        NMS=(--nm-select "$3") NML=", $3 N:M"
    fi
}
# Ours, SparseGPT N:M with the paper's per-column saliency (--nm-select saliency).
for spec in 2:4 4:8; do
    pattern_of "$spec"
    begin "sparsegpt-$TAG-saliency" ours "sparsegpt, saliency N:M, --refit 0" "$PATL" "sparsegpt $PATL" || continue
    calib_args
    step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method sparsegpt "${FL[@]}" "${CALA[@]}" \
        --nm-select saliency --refit 0 --format dense,sparse --out "$D" --force || true
    finish "$D"
done
# Ours, SparseGPT without its default refit (--refit 0): the sweep's own weights, as the
# paper and llm-compressor.
for spec in "${SPECS[@]}"; do
    pattern_of "$spec"
    begin "sparsegpt-$TAG-refit0" ours "sparsegpt, --refit 0" "$PATL" "sparsegpt $PATL" || continue
    calib_args
    step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method sparsegpt "${FL[@]}" "${CALA[@]}" \
        --refit 0 --format dense,sparse --out "$D" --force || true
    finish "$D"
done
# refit0_of METHOD: R0 (flags) and R0L (label): SparseGPT's comparison rows without its
# default refit.
refit0_of() {
    R0=() R0L=""
    if [[ "$1" == sparsegpt ]]; then
        R0=(--refit 0) R0L=", --refit 0"
    fi
}
# Ours in true-sequential order (--true-sequential; the default is one pass per block).
for spec in "${SPECS[@]}"; do
    pattern_of "$spec"
    for M in wanda sparsegpt; do
        nm_select_of "$M" "$spec" saliency
        refit0_of "$M"
        begin "$M-$TAG-seq" ours "$M true-sequential$R0L$NML" "$PATL" "$M $PATL" || continue
        calib_args
        step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method "$M" "${FL[@]}" "${CALA[@]}" \
            "${NMS[@]}" "${R0[@]}" --true-sequential --format dense,sparse --out "$D" --force || true
        finish "$D"
    done
done
# Ours with the least-squares refit of the kept weights (--refit REFIT, default 30 steps),
# in true-sequential order, where the refit was first measured.
REFIT="${REFIT:-30}"
for spec in "${SPECS[@]}"; do
    pattern_of "$spec"
    for M in wanda sparsegpt; do
        nm_select_of "$M" "$spec" saliency
        begin "$M-$TAG-refit" ours "$M + refit $REFIT, true-sequential$NML" "$PATL" "$M $PATL" || continue
        calib_args
        step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method "$M" "${FL[@]}" "${CALA[@]}" \
            "${NMS[@]}" --true-sequential --refit "$REFIT" --format dense,sparse --out "$D" --force || true
        finish "$D"
    done
done
# Ours at the peer's output precision (--dtype f32; our default output is bf16), for the
# settings where the bf16 rows were above the peer's.
for spec in wanda:50% sparsegpt:4:8; do
    M=${spec%%:*}
    pattern_of "${spec#*:}"
    refit0_of "$M"
    begin "$M-$TAG-f32" ours "$M, f32 output$R0L" "$PATL" "$M $PATL" || continue
    calib_args
    step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method "$M" "${FL[@]}" "${CALA[@]}" \
        "${R0[@]}" --dtype f32 --format dense --out "$D" --force || true
    finish "$D"
done
if begin wanda-50-owl ours wanda "50% OWL" ""; then
    calib_args
    step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --method wanda --sparsity 0.5 --owl "${CALA[@]}" \
        --format dense,sparse --out "$D" --force || true
    finish "$D"
fi

# Ours: structured (whole units removed; a smaller dense bf16 model).
for spec in "channels-0.25:channels:--ratio 0.25" "heads-0.34:heads:--ratio 0.34" \
    "layers-4:layers:--count 4" "channels-100M:channels:--target-params 100M"; do
    IFS=: read -r K UNIT AMT <<<"$spec"
    read -r -a AM <<<"$AMT"
    begin "$K" ours "structured $UNIT" "$AMT" "" || continue
    calib_args
    if ! step "$OUT/$KEY.log" "$BIN" prune "$MODEL" --structured "$UNIT" "${AM[@]}" "${CALA[@]}" \
        --out "$D" --force; then
        grep -qi "not built\|not yet implemented\|unimplemented\|unexpected argument" "$OUT/$KEY.log" && NOTE="skipped (structured pruning not built)"
    fi
    finish "$D"
done

# Composition: prune, then quantize the pruned model. Times and peak RSS cover both steps.
# compose_src SRC_KEY PRUNE_FLAGS...: sets SRC to the pruned folder of row SRC_KEY when that
# row ran above (its times counted), else prunes with PRUNE_FLAGS into OUT/KEY.pruned.
compose_src() {
    local src_key=$1
    shift
    SRC="$OUT/$src_key"
    if [[ -f "$SRC/prune_report.json" && -s "$OUT/$src_key.times" ]]; then
        cat "$OUT/$src_key.times" >>"$TIMES"
    else
        calib_args
        SRC="$OUT/$KEY.pruned"
        step "$OUT/$KEY.prune.log" "$BIN" prune "$MODEL" "$@" "${CALA[@]}" --out "$SRC" --force
    fi
}
if begin sparsegpt-2-4+gptq-w4g128 ours "sparsegpt + gptq w4 g128" "2:4" ""; then
    if compose_src sparsegpt-2-4 --method sparsegpt --pattern 2:4; then
        step "$OUT/$KEY.log" "$BIN" quant "$SRC" --method gptq --bits 4 --group 128 "${CAL[@]}" \
            --format dense,packed --out "$D" --force || true
    fi
    finish "$D" source="$SRC"
fi
if begin wanda-50+rtn-q4_k_m ours "wanda + rtn gguf q4_k_m" "50%" ""; then
    if compose_src wanda-50 --method wanda --sparsity 0.5; then
        step "$OUT/$KEY.log" "$BIN" quant "$SRC" --method rtn --format gguf:q4_k_m --out "$D" --force || true
    fi
    finish "$D/model.gguf" source="$SRC"
fi

# Peer: llm-compressor on the f32 HF conversion of the teacher, same calibration tokens.
PEER_LINE=""
if [[ "$PEERS" != 0 ]]; then
    source "$HERE/peer_lib.sh"
    peer_venv
    PEER_LINE="; peer $(peer_versions)"
    TEACHER_HF="$OUT/teacher-f32"
    [[ -f "$TEACHER_HF/config.json" ]] || "$BIN" convert "$MODEL" "$TEACHER_HF" --dtype f32 >/dev/null
    # The peer's starting point, evaluated as a check: its perplexity should be the teacher's.
    if begin teacher-f32 - "f32 HF conversion (peer input)" - ""; then
        finish "$TEACHER_HF"
    fi
    if [[ ! -f "$CALIB_IDS" ]]; then
        # No calibrated row of ours ran (ROWS): draw the same windows with a throwaway prune.
        "$BIN" prune "$MODEL" --method wanda --sparsity 0.5 "${CAL[@]}" --dump-calib "$CALIB_IDS" \
            --out "$OUT/calib-draw" --force >/dev/null
        rm -rf "$OUT/calib-draw"
    fi
    for spec in "${SPECS[@]}"; do
        pattern_of "$spec"
        for M in sparsegpt wanda; do
            begin "peer-$M-$TAG" llmcompressor "$M" "$PATL" "$M $PATL" || continue
            step "$OUT/$KEY.log" "$PEER_PY" "$HERE/peer_prune.py" --model "$TEACHER_HF" \
                --calib-ids "$CALIB_IDS" --method "$M" "${FL[@]}" --out "$D" || true
            finish "$D" params_from="$OUT/$M-$TAG"
        done
    done
fi

T=$(python3 -c "import json,sys;[print('%.4f ± %.4f'%(r['ppl'],r['ppl_se'])) for r in map(json.loads,open(sys.argv[1])) if r['key']=='teacher' and 'ppl' in r]" "$ROWS_FILE")
{
    echo "Teacher $MODEL: perplexity $T (wikitext-2 test, ctx 512, $CHUNKS chunks); calibration $CALIB_SAMPLES x $CALIB_LEN tokens of wiki.valid.tokens, seed 0, the same ids for ours and the peer; $(nproc) threads, $(date -u +%F)$PEER_LINE"
    echo
    python3 "$HERE/prune_rows.py" table "$ROWS_FILE"
} | tee "$OUT/table.md"
