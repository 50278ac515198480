#!/usr/bin/env bash
# Interop check of `compress prune --structured`: SmolLM2-135M is pruned three ways (one KV
# group of heads per layer, 25% of the MLP channels, 4 layers), and each pruned folder must
# (1) load in HF transformers as LlamaForCausalLM with every tensor matching its config
# (no missing, unexpected or mis-shaped weights), and (2) score the first 512 tokens of
# wikitext-2 like `compress eval --protocol hf` does (relative difference <= 5e-4), which
# only holds when transformers reads the same head_dim, heads and widths as we do.
#
# Usage: scripts/check_hf_structured.sh [UNIT ...]     (default: heads channels layers)
# Environment: COMPRESS_DATA (the data folder, see scripts/data-dir.sh), OUT_ROOT (models/structured-check), CALIB_SAMPLES (16),
# CALIB_LEN (256), VENV and HF_PIP_SPECS as in scripts/check_hf_load.sh, whose virtualenv
# (torch from PyPI, ~2.8 GB on first use) this script shares.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
need_data wikitext-2-raw/wiki.test.raw wikitext-2/wiki.valid.tokens
TEXT="$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw"
CALIB="$COMPRESS_DATA/wikitext-2/wiki.valid.tokens"
MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT_ROOT="${OUT_ROOT:-models/structured-check}"
CALIB_SAMPLES="${CALIB_SAMPLES:-16}"
CALIB_LEN="${CALIB_LEN:-256}"
UNITS=("$@")
[ ${#UNITS[@]} -eq 0 ] && UNITS=(heads channels layers)

# The same virtualenv and pinned versions as check_hf_load.sh (shared stamp file).
VENV="${VENV:-.venv-hf}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
HF_PIP_SPECS="${HF_PIP_SPECS:-torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "check_hf_structured: creating venv at $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    printf '*\n' > "$VENV/.gitignore"
fi
STAMP="$VENV/.check_hf_load-installed"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HF_PIP_SPECS" ]; then
    echo "check_hf_structured: pip install $HF_PIP_SPECS (first time: ~2.8 GB download)" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q $HF_PIP_SPECS
    printf '%s' "$HF_PIP_SPECS" > "$STAMP"
fi

bash scripts/get-smollm2.sh >/dev/null
cargo build --release -p compress >/dev/null 2>&1 || cargo build --release -p compress
BIN="$ROOT/target/release/compress"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT_ROOT"

fail=0
for unit in "${UNITS[@]}"; do
    case "$unit" in
        heads) amount=(--count 1) ;;
        channels) amount=(--ratio 0.25) ;;
        layers) amount=(--count 4) ;;
        *) echo "check_hf_structured: unknown unit $unit (heads, channels, layers)" >&2; exit 2 ;;
    esac
    out="$OUT_ROOT/$unit"
    "$BIN" prune "$MODEL" --structured "$unit" "${amount[@]}" --calib "$CALIB" \
        --calib-samples "$CALIB_SAMPLES" --calib-len "$CALIB_LEN" --out "$out" --force
    "$BIN" eval "$out" --ppl "$TEXT" --ctx 512 --chunks 1 --protocol hf \
        --force --json "$TMP/$unit.json" >/dev/null
    ours="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["perplexity"]["value"])' "$TMP/$unit.json")"
    if "$VENV/bin/python" scripts/check_hf_structured.py "$out" --text "$TEXT" \
        --max-tokens 512 --expect-ppl "$ours"; then
        echo "check_hf_structured: $unit OK"
    else
        echo "check_hf_structured: $unit FAILED" >&2
        fail=1
    fi
done
exit "$fail"
