#!/usr/bin/env bash
# Resume on the real model: a KD run of SmolLM2 (the pruned student when OUT/pruned exists,
# else the teacher's HF conversion) killed with SIGKILL after its first checkpoint and
# continued with --resume must write the same weights as the same run left alone.
# Usage: OUT=/tmp/distill-resume [STEPS=4] scripts/bench/distill_resume.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
need_data wikitext-2/wiki.valid.tokens
OUT="${OUT:-/tmp/distill-resume}"
STEPS="${STEPS:-4}"
BIN="${COMPRESS_BIN:-$ROOT/target/release/compress}"
TEACHER="models/SmolLM2-135M-Instruct.Q4_1.gguf"
bash scripts/get-smollm2.sh >/dev/null
[ -x "$BIN" ] || cargo build --release -p compress
mkdir -p "$OUT"
STUDENT="${STUDENT:-$OUT/student}"
[ -f "$STUDENT/model.safetensors" ] || "$BIN" convert "$TEACHER" "$STUDENT" --dtype f32 --force >/dev/null
ARGS=(distill --student "$STUDENT" --teacher "$TEACHER"
    --data "$COMPRESS_DATA/wikitext-2/wiki.valid.tokens" --seq-len 512 --batch-tokens 512
    --max-tokens $((STEPS * 512)) --lr 3e-4 --save-every 1)
rm -rf "$OUT/whole" "$OUT/killed" "$OUT/whole.checkpoints" "$OUT/killed.checkpoints"
"$BIN" "${ARGS[@]}" --out "$OUT/whole" --force
# The binary itself in the background (not a subshell), so SIGKILL reaches it.
"$BIN" "${ARGS[@]}" --out "$OUT/killed" 2>/dev/null &
pid=$!
until [ -d "$OUT/killed.checkpoints/checkpoint-1" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "distill_resume: the run ended before its first checkpoint" >&2; exit 1; }
    sleep 0.2
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
[ ! -e "$OUT/killed" ] || { echo "distill_resume: a killed run left an output" >&2; exit 1; }
"$BIN" "${ARGS[@]}" --out "$OUT/killed" --resume
a=$(sha256sum "$OUT/whole/model.safetensors" | cut -d' ' -f1)
b=$(sha256sum "$OUT/killed/model.safetensors" | cut -d' ' -f1)
echo "distill_resume: uninterrupted $a"
echo "distill_resume: killed+resumed $b"
[ "$a" = "$b" ] && echo "distill_resume: identical after $STEPS steps" || { echo "distill_resume: DIFFERENT" >&2; exit 1; }
