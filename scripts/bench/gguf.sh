#!/usr/bin/env bash
# GGUF export quality on SmolLM2-135M-Instruct: for each type, plain reference rounding
# (`compress convert --type`), importance-weighted rounding from calibration (`compress quant
# --method rtn --calib`, llama.cpp's imatrix idea), AWQ scales plus importance (`--method
# awq`) and GPTQ into each linear's block type (`--method gptq`, K-quants included); each
# file's bytes, bits per weight, perplexity on wikitext-2 test (ctx 512, CHUNKS chunks), its
# ratio to the teacher and the KL divergence from the teacher (KLD=0 leaves it out), export
# wall time and peak RSS. Prints a markdown table.
#   CALIB_SAMPLES (default 128) x CALIB_LEN (512) tokens of wiki.valid.tokens, seed 0;
#   TYPES (default "q4_0 q4_k_m"; `auto` is gguf:auto under AUTO_TARGET, default
#   "--target-bytes 89941248", the tensor bytes of SmolLM2's Q4_0, and has no plain row),
#   HOWS (default "plain imatrix awq gptq"), CHUNKS (default 32), OUT (default /tmp/gguf-bench).
set -euo pipefail
CALIB_SAMPLES="${CALIB_SAMPLES:-128}"
CALIB_LEN="${CALIB_LEN:-512}"
TYPES="${TYPES:-q4_0 q4_k_m}"
HOWS="${HOWS:-plain imatrix awq gptq}"
OUT="${OUT:-/tmp/gguf-bench}"
read -r -a AUTO_ARGS <<< "${AUTO_TARGET:---target-bytes 89941248}"
source "$(dirname "$0")/lib.sh"

read -r T_PPL T_SE _ _ < <(ppl "$MODEL")
echo "Teacher $MODEL: perplexity $T_PPL ± $T_SE (wikitext-2 test, ctx 512, $CHUNKS chunks); calibration $CALIB_SAMPLES x $CALIB_LEN tokens of wiki.valid.tokens, seed 0; $(nproc) threads, $(date -u +%F)"
echo
echo "| type | rounding | file bytes | bpw (all tensors) | perplexity | ratio to teacher | KLD from teacher | export wall s | export peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
for TY in $TYPES; do
    for HOW in $HOWS; do
        F="$OUT/$TY-$HOW"
        EXTRA=()
        if [[ "$TY" == auto ]]; then
            [[ "$HOW" == plain ]] && continue
            EXTRA=("${AUTO_ARGS[@]}")
        fi
        case "$HOW" in
            plain) CMD=("$BIN" convert "$MODEL" "$F.gguf" --type "$TY" --force) ;;
            imatrix) CMD=("$BIN" quant "$MODEL" --method rtn --format "gguf:$TY" --out "$F" --force
                          --calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len "$CALIB_LEN") ;;
            awq) CMD=("$BIN" quant "$MODEL" --method awq --format "gguf:$TY" --out "$F" --force
                      --calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len "$CALIB_LEN") ;;
            gptq) CMD=("$BIN" quant "$MODEL" --method gptq --format "gguf:$TY" --out "$F" --force
                       --calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len "$CALIB_LEN") ;;
        esac
        START=$(date +%s.%N)
        /usr/bin/time -f "%M" -o "$OUT/rss" "${CMD[@]}" ${EXTRA[@]+"${EXTRA[@]}"} >/dev/null
        END=$(date +%s.%N)
        FILE="$F.gguf"; [ "$HOW" = plain ] || FILE="$F/model.gguf"
        if [[ "${KLD:-1}" != 0 ]]; then
            read -r P SE BYTES BPW K KSE < <(ppl_kld "$FILE")
            KCOL="$K ± $KSE"
        else
            read -r P SE BYTES BPW < <(ppl "$FILE")
            KCOL="-"
        fi
        python3 -c "
p, t, s, e = $P, $T_PPL, $START, $END
print(f'| $TY | $HOW | $BYTES | $BPW | {p:.4f} ± $SE | {p/t:.4f} | $KCOL | {e-s:.1f} | {$(tail -1 "$OUT/rss")/1024:.0f} |')"
    done
done
