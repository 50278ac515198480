#!/usr/bin/env bash
# `compress run` killed with SIGKILL in the middle of a quantization stage, on SmolLM2: a
# two-stage recipe (Wanda 50% on 32 x 512 wikitext tokens, then GPTQ W4 g128 on the same
# calibration) runs once uninterrupted, then again in another folder, killed (kill -9, the
# whole process group) when GPTQ has run for half its uninterrupted time, and started again.
# The two runs must end with the same sha256 for every file of OUT/model and OUT/stages that
# the run writes deterministically (the model weights and config); the script fails otherwise.
#   OUT (default /tmp/recipe-resume), RESUME (1 keeps a finished uninterrupted run), BUILD,
#   COMPRESS_BIN.
set -euo pipefail
OUT="${OUT:-/tmp/recipe-resume}"
source "$(dirname "$0")/lib.sh"
say() { echo "[$(date +%T)] $*" >&2; }
RECIPE="$OUT/recipe.toml"
cat >"$RECIPE" <<EOF
teacher = "$ROOT/$MODEL"

[[stage]]
kind = "prune"
method = "wanda"
sparsity = 0.5
calib = "$CALIB"
calib_samples = 32
calib_len = 512

[[stage]]
kind = "quant"
method = "gptq"
bits = 4
group = 128
calib = "$CALIB"
calib_samples = 32
calib_len = 512
format = "dense"
EOF
rm -rf "$OUT/b"
# RESUME=1 keeps a finished uninterrupted run (compress run itself keeps its stages).
[[ "${RESUME:-0}" == 1 ]] || rm -rf "$OUT/a"

say "uninterrupted run"
"$BIN" run "$RECIPE" --out "$OUT/a" >"$OUT/a.log" 2>&1
# The GPTQ stage's own wall time, from its manifest.
GPTQ_S=$(python3 -c "import json;m=json.load(open('$OUT/a/model/manifest.json'));print(m['stages'][-1]['wall_seconds'])")
HALF=$(python3 -c "print(max(5, int(float('$GPTQ_S') / 2)))")
say "GPTQ stage took ${GPTQ_S}s; killing the second run ${HALF}s into it"

setsid "$BIN" run "$RECIPE" --out "$OUT/b" >"$OUT/b1.log" 2>&1 &
PID=$!
# Wait for stage 2 to start (stage 1 done), then for half the GPTQ time.
until grep -q "stage 2/2" "$OUT/b1.log" 2>/dev/null; do
    kill -0 "$PID" 2>/dev/null || { echo "error: the second run ended before stage 2" >&2; exit 1; }
    sleep 1
done
sleep "$HALF"
kill -9 -- "-$PID"
wait "$PID" 2>/dev/null || true
[[ -d "$OUT/b/model" ]] && { echo "error: OUT/model exists after the kill: stage 2 was not interrupted" >&2; exit 1; }
say "killed; stale temporary entries left: $(find "$OUT/b" -name '.*tmp*' | wc -l)"
say "resumed run"
"$BIN" run "$RECIPE" --out "$OUT/b" >"$OUT/b2.log" 2>&1
grep -q "stage 1/2 (prune): done before, kept" "$OUT/b2.log" || { echo "error: stage 1 was not kept" >&2; exit 1; }

hashes() { (cd "$1" && sha256sum model/model.safetensors model/config.json stages/01-prune/model.safetensors stages/01-prune/config.json); }
if diff <(hashes "$OUT/a") <(hashes "$OUT/b") >"$OUT/diff.txt"; then
    hashes "$OUT/b" >&2
    say "ok: the resumed run ends with the uninterrupted run's hashes"
else
    cat "$OUT/diff.txt" >&2
    echo "error: hashes differ" >&2
    exit 1
fi
