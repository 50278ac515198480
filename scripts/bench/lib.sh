# Shared set-up of the SmolLM2 benchmarks (sourced, not run): repo root as the working
# folder, data paths, the teacher fetched, a release build of `compress`, and `ppl`.
#   COMPRESS_DATA (the data folder, see scripts/data-dir.sh), CHUNKS (default 32), OUT (set by the caller),
#   BUILD (default 1; 0 uses target/release/compress as it is, without running cargo),
#   COMPRESS_BIN (default target/release/compress: the binary the benchmarks run).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
CHUNKS="${CHUNKS:-32}"
TEXT="$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw"
CALIB="$COMPRESS_DATA/wikitext-2/wiki.valid.tokens"
MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
need_data wikitext-2-raw/wiki.test.raw wikitext-2/wiki.valid.tokens
bash scripts/get-smollm2.sh >/dev/null
if [[ "${BUILD:-1}" != 0 ]]; then
    cargo build --release -p compress >/dev/null 2>&1 || cargo build --release -p compress
fi
BIN="${COMPRESS_BIN:-$ROOT/target/release/compress}"
[[ -x "$BIN" ]] || { echo "error: $BIN not built (BUILD=0)" >&2; exit 1; }
mkdir -p "$OUT"

# want KEY: whether ROWS (space-separated globs of row keys; empty: all) selects row KEY.
want() {
    [[ -z "${ROWS:-}" ]] && return 0
    local g
    for g in $ROWS; do
        # shellcheck disable=SC2053
        [[ "$1" == $g ]] && return 0
    done
    return 1
}

# ppl MODEL -> "perplexity stderr bytes bits_per_weight" on TEXT, ctx 512, CHUNKS chunks.
ppl() {
    "$BIN" eval "$1" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force --json "$OUT/eval.json" >/dev/null
    python3 -c "import json;d=json.load(open('$OUT/eval.json'));p=d['perplexity'];z=d['size'];print('%.4f %.4f %d %.3f'%(p['value'],p['stderr'],z['bytes'],z['bits_per_weight']))"
}

# ppl_kld MODEL -> "perplexity stderr bytes bits_per_weight kld_mean kld_stderr": as `ppl`, with
# the KL divergence from the teacher MODEL (same windows, same evaluator).
ppl_kld() {
    "$BIN" eval "$1" --teacher "$MODEL" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force --json "$OUT/eval.json" >/dev/null
    python3 -c "import json;d=json.load(open('$OUT/eval.json'));p=d['perplexity'];z=d['size'];k=d['kld'];print('%.4f %.4f %d %.3f %.4f %.4f'%(p['value'],p['stderr'],z['bytes'],z['bits_per_weight'],k['mean'],k['stderr']))"
}
