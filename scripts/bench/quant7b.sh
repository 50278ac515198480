#!/usr/bin/env bash
# Memory of quantization at 7B widths (Llama-2-7B shapes: hidden 4096, intermediate 11008,
# 32 heads, vocab 32000) on synthetic bf16 checkpoints (`cargo run -p model --example synth`):
#   - GGUF export (q4_0, plain rounding) of the full 32-block model;
#   - GPTQ and AWQ W4 g128, Wanda and SparseGPT 50% pruning with 8 x 512 calibration tokens, and calibration-aware GGUF q4_0
#     (imatrix and AWQ), on the same shape cut to LAYERS blocks (default 4): one block is in
#     memory at a time, so peak RSS is the per-block figure and wall time grows linearly with
#     depth (the table gives the per-block time too).
# Prints a markdown table: wall s, CPU s, peak RSS MiB. Random weights: no quality figures.
#   TMPDIR (default /tmp) holds the checkpoints (about 13.5 + 2.2 GB), removed on exit;
#   LAYERS (default 4), SAMPLE_ROWS (default 512): calibration rows kept per linear for AWQ's
#   search and the error report (2048 by default in `compress quant`), RUNS (default
#   "gptq awq wanda sparsegpt imatrix awqgguf convert": which rows to run).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
need_data wikitext-2/wiki.valid.tokens
LAYERS="${LAYERS:-4}"
SAMPLE_ROWS="${SAMPLE_ROWS:-512}"
RUNS=" ${RUNS:-gptq awq wanda sparsegpt imatrix awqgguf convert} "
want() { [[ "$RUNS" == *" $1 "* ]]; }
CALIB="$COMPRESS_DATA/wikitext-2/wiki.valid.tokens"
cargo build --release -p compress >/dev/null 2>&1 || cargo build --release -p compress
cargo build --release -p model --example synth >/dev/null 2>&1 || cargo build --release -p model --example synth
BIN="$ROOT/target/release/compress"
SYNTH="$ROOT/target/release/examples/synth"
W=$(mktemp -d "${TMPDIR:-/tmp}/quant7b.XXXXXX")
trap 'rm -rf "$W"' EXIT

row() { # label, layers, command...
    local label="$1" layers="$2"; shift 2
    /usr/bin/time -f "%e %U %S %M" -o "$W/time" "$@" >/dev/null
    read -r E U S M < "$W/time"
    python3 -c "print(f'| $label | $layers | {$E:.0f} | {$E/$layers:.1f} | {$U+$S:.0f} | {$M/1024:.0f} |')"
}

"$SYNTH" --shape 7b --dtype bf16 --layers "$LAYERS" "$W/cut" 2>/dev/null
echo "Synthetic Llama-2-7B-shaped bf16 checkpoints; calibration 8 x 512 tokens of wiki.valid.tokens; $(nproc) threads, $(date -u +%F)"
echo
echo "| run | blocks | wall s | wall s per block | CPU s | peak RSS MiB |"
echo "|---|---|---|---|---|---|"
C=(--calib "$CALIB" --calib-samples 8 --calib-len 512)
want gptq && row "gptq W4 g128, $SAMPLE_ROWS report rows (dense bf16 out)" "$LAYERS" "$BIN" quant "$W/cut" --method gptq --bits 4 --group 128 "${C[@]}" --sample-rows "$SAMPLE_ROWS" --format dense --out "$W/gptq"
rm -rf "$W/gptq"
want awq && row "awq W4 g128, $SAMPLE_ROWS search rows (dense bf16 out)" "$LAYERS" "$BIN" quant "$W/cut" --method awq --bits 4 --group 128 "${C[@]}" --sample-rows "$SAMPLE_ROWS" --format dense --out "$W/awq"
rm -rf "$W/awq"
want imatrix && row "gguf:q4_0 with importance (rtn --calib)" "$LAYERS" "$BIN" quant "$W/cut" --method rtn --format gguf:q4_0 "${C[@]}" --out "$W/imat"
rm -rf "$W/imat"
want wanda && row "prune wanda 50% (dense bf16 out)" "$LAYERS" "$BIN" prune "$W/cut" --method wanda --sparsity 0.5 "${C[@]}" --sample-rows "$SAMPLE_ROWS" --out "$W/wanda"
rm -rf "$W/wanda"
want sparsegpt && row "prune sparsegpt 50%, default --refit 3 (dense bf16 out)" "$LAYERS" "$BIN" prune "$W/cut" --method sparsegpt --sparsity 0.5 "${C[@]}" --sample-rows "$SAMPLE_ROWS" --out "$W/sgpt"
rm -rf "$W/sgpt"
want awqgguf && row "gguf:q4_0 with AWQ scales + importance, $SAMPLE_ROWS search rows" "$LAYERS" "$BIN" quant "$W/cut" --method awq --format gguf:q4_0 "${C[@]}" --sample-rows "$SAMPLE_ROWS" --out "$W/awqg"
rm -rf "$W/awqg" "$W/cut"
want convert || exit 0
"$SYNTH" --shape 7b --dtype bf16 "$W/full" 2>/dev/null
row "convert --type q4_0 (plain, whole model)" 32 "$BIN" convert "$W/full" "$W/full.q4_0.gguf" --type q4_0
ls -l "$W/full.q4_0.gguf" | awk '{print "q4_0 file bytes: " $5}'
