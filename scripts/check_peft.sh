#!/usr/bin/env bash
# Interop check of `compress distill --lora-save both`: HF PEFT loads the written adapters
# onto the student (an HF folder) and gives the logits of our merged output (max |diff| <
# 1e-3). Uses the venv of check_hf_load.sh (torch, transformers) and adds peft to it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/data-dir.sh
need_data wikitext-2/wiki.valid.tokens
VENV="${VENV:-$ROOT/.venv-hf}"
BASE="${BASE:-models/smollm2-135m-hf-check}"
bash scripts/get-smollm2.sh >/dev/null
cargo build --release -p compress >/dev/null 2>&1 || cargo build --release -p compress
BIN="$ROOT/target/release/compress"
[ -f "$BASE/model.safetensors" ] || "$BIN" convert models/SmolLM2-135M-Instruct.Q4_1.gguf "$BASE" --dtype f32 --force
# check_hf_load.sh sets the venv up (torch, transformers) when it lacks them.
"$VENV/bin/python" -c 'import torch, transformers' 2>/dev/null ||
    VENV="$VENV" bash scripts/check_hf_load.sh --help >/dev/null 2>&1 || true
"$VENV/bin/python" -c 'import peft' 2>/dev/null || "$VENV/bin/python" -m pip install --disable-pip-version-check -q "peft==0.21.2"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$BIN" distill --student "$BASE" --teacher models/SmolLM2-135M-Instruct.Q4_1.gguf \
    --data "$COMPRESS_DATA/wikitext-2/wiki.valid.tokens" --seq-len 256 --batch-tokens 256 \
    --max-tokens 512 --lora-rank 8 --lora-targets q_proj,v_proj,down_proj --lr 1e-2 \
    --lora-save both --out "$TMP/lora" >/dev/null
"$VENV/bin/python" scripts/check_peft.py "$BASE" "$TMP/lora"
