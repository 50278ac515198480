#!/usr/bin/env bash
# Interop check of `compress convert`: the HF folder converted from the SmolLM2 GGUF must
# give the same perplexity as the GGUF (within 0.05%), and HF transformers must load it as
# LlamaForCausalLM and score the first 512 tokens like `compress eval --protocol hf`
# (within 0.05%). The transformers part needs torch from PyPI (~2.8 GB, see
# check_hf_load.sh); set SKIP_HF=1 to run only the perplexity comparison.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
need_data wikitext-2-raw/wiki.test.raw
CHUNKS="${CHUNKS:-32}"
TEXT="$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw"
MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="${OUT:-models/smollm2-135m-hf-check}"

bash scripts/get-smollm2.sh >/dev/null
cargo build --release -p compress >/dev/null 2>&1 || cargo build --release -p compress
BIN="$ROOT/target/release/compress"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$BIN" convert "$MODEL" "$OUT" --dtype f32 --force
"$BIN" eval "$MODEL" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force --json "$TMP/gguf.json" >/dev/null
"$BIN" eval "$OUT" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force --json "$TMP/hf.json" >/dev/null
python3 - "$TMP/gguf.json" "$TMP/hf.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["perplexity"]["value"]
b = json.load(open(sys.argv[2]))["perplexity"]["value"]
rel = abs(a - b) / a
print(f"check_convert: GGUF ppl {a:.4f}, converted HF ppl {b:.4f}, relative difference {rel:.2e}")
sys.exit(0 if rel <= 5e-4 else 1)
PY
if [ "${SKIP_HF:-0}" = 1 ]; then
    echo "check_convert: SKIP_HF=1, transformers check skipped"
    exit 0
fi
"$BIN" eval "$OUT" --ppl "$TEXT" --ctx 512 --chunks 1 --protocol hf --force --json "$TMP/ours1.json" >/dev/null
bash scripts/check_hf_load.sh "$OUT" --text "$TEXT" --max-tokens 512 | tail -1 > "$TMP/torch.json"
python3 - "$TMP/ours1.json" "$TMP/torch.json" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))["perplexity"]["value"]
torch = json.load(open(sys.argv[2]))["ppl"]
rel = abs(ours - torch) / torch
print(f"check_convert: transformers ppl {torch:.4f} vs ours {ours:.4f} on the first 512 tokens, relative difference {rel:.2e}")
sys.exit(0 if rel <= 5e-4 else 1)
PY
